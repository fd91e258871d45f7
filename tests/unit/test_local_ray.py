"""A job stops the local Ray it started, quickly and completely, and leaves alone a Ray it found.

``cli.run_job`` calls ``cli.shutdown_local_ray`` when the job body returns: a Ray that ``init_ray``
started in this process is stopped (its processes gone, the autoscaler monitor killed rather than
given its 1 s SIGTERM grace); a Ray the caller started (a notebook, a test) stays up.
"""

from __future__ import annotations

import pytest

from mlc_ray import cli

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def _local_ray_processes() -> dict:
    import ray

    return dict(ray._private.worker._global_node.all_processes)


def test_run_job_stops_the_ray_it_started_and_not_one_it_found() -> None:
    import ray

    if ray.is_initialized():  # another module's Ray: this test needs the process without one
        ray.shutdown()
    seen: dict = {}

    def body() -> int:
        cli.init_ray(address="local", num_cpus=1, include_dashboard=False)
        seen.update(_local_ray_processes())
        return 0

    assert cli.run_job(body) == 0
    assert not ray.is_initialized()
    assert seen, "init_ray started no local Ray"
    for kind, infos in seen.items():
        for info in infos:
            assert info.process.poll() is not None, f"{kind} (pid {info.process.pid}) still running"

    # a Ray the caller started: the job finds it, uses it, and leaves it up
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        assert cli.run_job(lambda: cli.init_ray()) == 0
        assert ray.is_initialized()
    finally:
        ray.shutdown()

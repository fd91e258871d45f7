"""init_ray: a local embedded Ray starts without its dashboard unless MLC_RAY_DASHBOARD=1; a cluster
(RAY_ADDRESS or an address given) is joined as it is, and a Ray already up is left alone.

``ray.init`` is replaced by a recorder: what is checked is the call the jobs make, not Ray itself.
"""

from __future__ import annotations

from typing import Any

import pytest

from mlc_ray import cli
from mlc_ray.cli import init_ray

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import ray

    seen: list[dict[str, Any]] = []
    # init_ray records that it started a local Ray (run_job stops it): restored after the test
    monkeypatch.setattr(cli, "_STARTED_LOCAL_RAY", False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLC_RAY_DASHBOARD", raising=False)
    return seen


def test_local_ray_starts_without_dashboard(calls) -> None:
    init_ray()
    assert calls == [{"address": None, "log_to_driver": True, "include_dashboard": False}]


def test_an_explicit_local_ray_too(calls) -> None:
    init_ray("local")
    assert calls == [{"address": "local", "log_to_driver": True, "include_dashboard": False}]


@pytest.mark.parametrize("value", ["1", "true"])
def test_mlc_ray_dashboard_keeps_it(calls, monkeypatch, value) -> None:
    monkeypatch.setenv("MLC_RAY_DASHBOARD", value)
    init_ray()
    assert "include_dashboard" not in calls[0]


def test_training_keeps_the_dashboard_of_its_local_ray(calls) -> None:
    # Ray Train's placement-group cleaner polls the state API (served by the dashboard) every second
    # and logs a warning each time it is missing: 111 lines in one `make demo` before this
    init_ray(keep_dashboard=True)
    init_ray("local", keep_dashboard=True)
    assert all("include_dashboard" not in call for call in calls), calls


def test_a_cluster_is_joined_without_dashboard_settings(calls, monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    init_ray()
    init_ray("ray://other:10001")
    assert calls == [
        {"address": "http://head:8265", "log_to_driver": True},
        {"address": "ray://other:10001", "log_to_driver": True},
    ]


def test_caller_settings_win(calls) -> None:
    init_ray(include_dashboard=True, num_cpus=2)
    assert calls[0]["include_dashboard"] is True and calls[0]["num_cpus"] == 2


def test_a_running_ray_is_left_alone(calls, monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    init_ray()
    assert calls == []


@pytest.fixture
def no_gpu(calls, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})


def test_use_gpu_on_a_local_ray_without_gpus_fails_now(no_gpu) -> None:
    from mlc_ray.cli import JobError, check_gpus_for

    init_ray()  # the embedded local Ray: this machine's GPUs, no autoscaler
    with pytest.raises(JobError, match="--use-gpu: the local Ray this job started has no GPU") as err:
        check_gpus_for("--use-gpu")
    assert err.value.exit_code == 2


def test_use_gpu_on_a_cluster_without_gpus_yet_waits_for_its_autoscaler(no_gpu, monkeypatch, caplog) -> None:
    from mlc_ray.cli import check_gpus_for

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster whose GPU group scales from zero
    init_ray()
    with caplog.at_level("WARNING", logger="mlc_ray"):
        check_gpus_for("--use-gpu")
    assert "waiting for its autoscaler" in caplog.text


def test_training_and_tagging_check_the_gpu_before_starting_work(no_gpu, monkeypatch, tmp_path) -> None:
    # seen: jobs/train.py --use-gpu on a CPU machine waited forever for its worker's GPU, a
    # traceback a minute; tagging refused, but also on clusters that add GPU nodes on demand
    from mlc_ray import cli
    from mlc_ray.data.demo import generate_demo
    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.pipeline import run_tagging
    from mlc_ray.train.config import TrainConfig
    from mlc_ray.train.runner import run_training
    from tests.helpers import make_bundle

    started = []

    def fake_init_ray(*args, **kwargs) -> None:  # an embedded local Ray, without starting one
        started.append(kwargs)
        monkeypatch.setattr(cli, "_STARTED_LOCAL_RAY", True)

    monkeypatch.setattr(cli, "init_ray", fake_init_ray)
    monkeypatch.chdir(tmp_path)
    data = generate_demo(str(tmp_path / "demo"), seed=1, num_train=8, num_val=4, image_size=32)
    train = TrainConfig(data=data, storage_path=str(tmp_path / "runs"), model="mobilenet_v1", width=0.25,
                        image_size=32, epochs=1, use_gpu=True, run_name="gpu")  # fmt: skip
    with pytest.raises(cli.JobError, match="--use-gpu: the local Ray"):
        run_training(train)
    tag = TagConfig(
        model=make_bundle(tmp_path / "bundle"), input=data, output=str(tmp_path / "tags"), use_gpu=True
    )
    with pytest.raises(cli.JobError, match="--use-gpu: the local Ray"):
        run_tagging(tag)
    assert len(started) == 2

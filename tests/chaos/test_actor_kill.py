"""Actor death: the inference actors of a running ``run_tagging`` are SIGKILLed at random points.

Fault: a killer thread (seeded RNG) waits for the ``MapWorker(MapBatches(Predictor))`` actor
process, lets it live a random 0.3–1.5 s, SIGKILLs it (as the OOM killer or a lost node would),
waits for Ray to restart it in a new process, and does it again: 3 kills during one run. Each
Predictor call sleeps 0.4 s (``hooks.install_predictor_faults``: the driver maps with a slow
subclass, shipped to the actors by Ray) so the run outlives the kills.

Expected: the run finishes by itself (Ray restarts the actor and retries its batches, within the
pipeline's bounded ``PREDICTOR_MAX_TASK_RETRIES``), the table holds exactly the input set (no
duplicate, no gap, no error row), and afterwards the actor processes are gone and every CPU of
the cluster is free again.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from mlc_ray import storage
from tests.chaos import support
from tests.chaos.hooks import install_predictor_faults
from tests.helpers import predictor_pids, read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

N_IMAGES = 60
KILLS = 3
BUCKET = "chaos-actors"


class ActorKiller(threading.Thread):
    def __init__(self, kills: int, seed: int, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(seed)
        self.kills_wanted = kills
        self.done = done
        self.killed: list[tuple[int, float]] = []  # (pid, seconds it lived before the kill)

    def run(self) -> None:
        dead: set[int] = set()
        while len(self.killed) < self.kills_wanted and not self.done.is_set():
            alive = predictor_pids() - dead
            if not alive:
                time.sleep(0.05)
                continue
            pid = min(alive)
            lifetime = self.rng.uniform(0.3, 1.5)
            if self.done.wait(lifetime):
                return
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                dead.add(pid)
                continue
            dead.add(pid)
            self.killed.append((pid, round(lifetime, 2)))


def test_inference_actors_killed_at_random_points_table_exactly_once(
    s3_server, chaos_ray, tiny_bundle, monkeypatch
) -> None:
    import boto3
    import ray

    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.pipeline import run_tagging

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    uris = sorted(upload_images(BUCKET, "in", N_IMAGES, with_bad=False))
    install_predictor_faults(monkeypatch, delay_s=0.4)
    output = f"s3://{BUCKET}/tags"
    cfg = TagConfig(
        model=tiny_bundle, input=f"s3://{BUCKET}/in/", output=output, shard_size=20, batch_size=5,
        actors="1", threads_per_actor=1,
    )  # fmt: skip
    done = threading.Event()
    killer = ActorKiller(KILLS, seed=11, done=done)
    killer.start()
    try:
        summary = run_tagging(cfg)
    finally:
        done.set()
        killer.join(timeout=10)

    table = read_table(output)
    counts = support.table_counts(table.column("image_uri").to_pylist(), uris)
    support.record(
        "test_inference_actors_killed_at_random_points",
        "SIGKILL of the Predictor actor process at random points (seeded), Ray restarts it",
        len(killer.killed),
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    print("[chaos] killed (pid, lived s):", killer.killed)
    assert len(killer.killed) == KILLS and len({pid for pid, _ in killer.killed}) == KILLS
    assert (counts.rows, counts.duplicates, counts.missing, counts.extra) == (N_IMAGES, 0, 0, 0)
    assert table.column("error").null_count == N_IMAGES and summary.errors == 0
    # resources released: the actor pool is torn down and every CPU is free again
    support.wait_until(lambda: not predictor_pids(), 60, "the Predictor actor processes to exit")
    support.wait_until(lambda: ray.available_resources().get("CPU", 0) == 2.0, 60, "the cluster's CPUs")

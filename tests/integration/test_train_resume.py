"""Fault tolerance of training: a worker killed mid-run resumes from its last checkpoint on S3."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mlc_ray import storage
from mlc_ray.data.demo import generate_demo
from mlc_ray.train.config import TrainConfig
from mlc_ray.train.runner import HEARTBEAT_ENV, run_training

pytestmark = pytest.mark.integration


def _kill_rank0_after_a_checkpoint(
    heartbeat_dir: Path, run_dir: str, killed: dict, timeout: float = 300.0
) -> None:
    """SIGKILL world rank 0's process while it trains a later epoch, once Ray Train has *registered*
    a checkpoint (its snapshot file in storage lists one): a report the controller has not processed
    yet is not a checkpoint to resume from."""
    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            beat = json.loads((heartbeat_dir / "rank-0.json").read_text())
        except (FileNotFoundError, ValueError):
            beat = None
        if (
            beat
            and beat["epoch"] >= 1
            and storage.exists(snapshot)
            and "checkpoint_" in storage.read_text(snapshot)
        ):
            os.kill(int(beat["pid"]), signal.SIGKILL)
            killed.update(beat)
            return
        time.sleep(0.1)


def test_killed_worker_resumes_from_the_last_checkpoint_on_s3(
    ray_local: None,
    s3_bucket: str,
    mlflow_sqlite: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = generate_demo(str(tmp_path / "demo"), seed=1, num_train=96, num_val=24, image_size=48)
    heartbeat = tmp_path / "heartbeat"
    monkeypatch.setenv(HEARTBEAT_ENV, str(heartbeat))
    runs = f"s3://{s3_bucket}/runs"
    cfg = TrainConfig(
        data=data,
        storage_path=runs,
        run_name="killed",
        image_size=32,
        epochs=4,
        batch_size=16,
        warmup_epochs=0.5,
        max_failures=1,
        experiment="test-resume",
    )
    killed: dict = {}
    killer = threading.Thread(
        target=_kill_rank0_after_a_checkpoint, args=(heartbeat, f"{runs}/killed", killed), daemon=True
    )
    killer.start()
    result = run_training(cfg)
    killer.join(timeout=5)

    assert killed, "the worker never reached epoch 1, nothing was killed"
    beat = json.loads((heartbeat / "rank-0.json").read_text())
    assert beat["pid"] != killed["pid"]  # a new worker process finished the run
    # resumed, not restarted: the second start is the epoch after the last checkpoint (>= 1)
    assert len(result.starts) == 2 and result.starts[0] == 0 and result.starts[1] >= 1
    assert result.starts[1] <= killed["epoch"]  # not past the epoch the killed worker was in
    assert result.epochs_trained == cfg.epochs - result.starts[1]
    # checkpoints and the bundle are on the S3 server
    assert result.checkpoint_path.startswith(f"{runs}/killed/checkpoint_")
    keys = [o.uri for o in storage.iter_objects(f"{runs}/killed")]
    assert sum(k.endswith("/state.pt") for k in keys) >= 2
    assert storage.exists(f"{runs}/killed/model/thresholds.json")
    assert len(result.val_indices) == 24

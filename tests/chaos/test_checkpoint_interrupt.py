"""Training faults: a checkpoint save cut off midway, then a worker killed mid-epoch, in one run.

Faults (training checkpoints to the S3 server *through the fault proxy*, ``max_failures=2``):

1. the proxy holds the upload of the second checkpoint's ``state.pt`` (``stall_pattern`` /
   ``stall_nth``: the bytes never reach the store, the connection stays open); once the first
   checkpoint is registered, the test SIGKILLs world rank 0 while it waits inside that upload: the
   save is cut off after Ray Train began persisting the checkpoint and before it registered it;
2. after Ray Train restarted the workers, the new rank 0 is SIGKILLed while it trains a later
   epoch, once one of its own checkpoints is registered.

Expected: the first restart resumes from the *first* checkpoint (epoch 0), which loads with
``weights_only=True``; the interrupted checkpoint is never registered and has no ``state.pt``; the
second restart resumes from the last registered checkpoint (not from scratch, not past the killed
epoch); the run finishes every epoch, its checkpoints and bundle are on S3, and its result (the
best registered checkpoint) loads.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from mlc_ray import storage
from tests.chaos import support

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

BUCKET = "chaos-ckpt"
RUN = "interrupted"


SNAPSHOT = f"s3://{BUCKET}/runs/{RUN}/checkpoint_manager_snapshot.json"


def _registered() -> str:
    return storage.read_text(SNAPSHOT) if storage.exists(SNAPSHOT) else ""


def _beat(heartbeat: Path) -> dict | None:
    try:
        return json.loads((heartbeat / "rank-0.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _killer(proxy: support.FaultProxy, heartbeat: Path, kills: list[dict], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    # [1] rank 0 held in the second checkpoint's upload
    while time.monotonic() < deadline:
        stats = proxy.stats()
        if stats["stalled"]:
            break
        time.sleep(0.1)
    else:
        return
    first_dir = stats["stall_matches"][0].split("/")[-2]
    # Ray Train resumes from a *registered* checkpoint: wait until the controller has recorded the
    # first one (its snapshot names it) while rank 0 is still held in the second save
    support.wait_until(lambda: first_dir in _registered(), 60, "the first checkpoint to be registered")
    beat = _beat(heartbeat)
    os.kill(int(beat["pid"]), signal.SIGKILL)
    kills.append({**beat, "stalled": stats["stalled"][0], "matches": stats["stall_matches"]})
    # the previous checkpoint as it is while the save is cut off (later ones may prune it)
    previous = f"s3://{stats['stall_matches'][0].rsplit('/', 1)[0]}/state.pt"
    (heartbeat / "previous-state.pt").write_bytes(storage.read_bytes(previous))
    time.sleep(1.0)  # the process is gone before its held connection is reset
    proxy.configure(fraction=0.0)  # lets the held write go (reset) and stops stalling
    # [2] the restarted rank 0, mid-epoch, once a checkpoint of its own is registered
    known = set(re.findall(r"checkpoint_[0-9_.-]+", _registered()))
    while time.monotonic() < deadline:
        beat = _beat(heartbeat)
        own = set(re.findall(r"checkpoint_[0-9_.-]+", _registered())) - known
        if beat and beat["pid"] != kills[0]["pid"] and beat["phase"] == "train" and own:
            os.kill(int(beat["pid"]), signal.SIGKILL)
            kills.append(beat)
            return
        time.sleep(0.05)


def test_interrupted_checkpoint_save_and_mid_epoch_kill_resume_from_registered_checkpoints(
    s3_server, chaos_ray, proxy_faults, mlflow_sqlite, tmp_path, monkeypatch
) -> None:
    import boto3
    import torch

    from mlc_ray.data.demo import generate_demo
    from mlc_ray.train.config import TrainConfig
    from mlc_ray.train.runner import HEARTBEAT_ENV, run_training

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    data = generate_demo(str(tmp_path / "demo"), seed=1, num_train=64, num_val=16, image_size=48)
    heartbeat = tmp_path / "heartbeat"
    monkeypatch.setenv(HEARTBEAT_ENV, str(heartbeat))
    # the checkpoints' filesystem (built in this driver, shipped to the workers) goes through the proxy
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy_faults.endpoint)
    storage.reset_clients()
    proxy_faults.configure(
        fraction=0.0, stall_pattern=rf"^{BUCKET}/runs/{RUN}/checkpoint_[^/]+/state\.pt$", stall_nth=2
    )
    kills: list[dict] = []
    killer = threading.Thread(target=_killer, args=(proxy_faults, heartbeat, kills), daemon=True)
    killer.start()
    cfg = TrainConfig(
        data=data, storage_path=f"s3://{BUCKET}/runs", run_name=RUN, image_size=32, epochs=5,
        model="mobilenet_v1", width=0.5,
        batch_size=16, warmup_epochs=0.5, max_failures=2, experiment="chaos-ckpt",
    )  # fmt: skip
    result = run_training(cfg)
    killer.join(timeout=10)
    print("[chaos] training kills:", json.dumps(kills), "starts", result.starts)

    assert len(kills) == 2, f"kills done: {kills}"
    cut, mid = kills
    matches = cut["matches"]
    interrupted = f"s3://{matches[1].rsplit('/', 1)[0]}"
    assert cut["stalled"] == matches[1] and cut["epoch"] == 1
    assert mid["pid"] != cut["pid"] and mid["epoch"] >= 2
    # [1] resumed from the first checkpoint (epoch 0), not from the interrupted save; [2] resumed,
    # not restarted, and not past the epoch the killed worker was in; every epoch trained
    assert result.starts[:2] == [0, 1] and len(result.starts) == 3, result.starts
    assert 2 <= result.starts[2] <= mid["epoch"], (result.starts, mid)
    assert result.epochs_trained == cfg.epochs - result.starts[2]
    assert not storage.exists(f"{interrupted}/state.pt")
    assert interrupted.rsplit("/", 1)[1] not in _registered()  # never registered
    previous = torch.load(heartbeat / "previous-state.pt", map_location="cpu", weights_only=True)
    assert previous["epoch"] == 0 and previous["model"]
    best = tmp_path / "best-state.pt"  # the run's result: its best registered checkpoint (val mAP)
    best.write_bytes(storage.read_bytes(f"{result.checkpoint_path}/state.pt"))
    state = torch.load(best, map_location="cpu", weights_only=True)
    assert 0 <= state["epoch"] < cfg.epochs and state["model"]
    assert result.checkpoint_path.rsplit("/", 1)[1] in _registered()
    # checkpoints and the bundle are on the S3 server
    assert result.checkpoint_path.startswith(f"s3://{BUCKET}/runs/{RUN}/checkpoint_")
    assert storage.exists(f"s3://{BUCKET}/runs/{RUN}/model/thresholds.json")
    assert len(result.val_indices) == 16

"""``ray start --head`` on 127.0.0.1 + ``ray job submit --working-dir . -- python jobs/train.py``.

The cluster gets a private temp dir, so teardown stops exactly its own processes (by pid, found
through that dir in their command lines) and never another Ray on the machine (no ``ray stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mlc_ray.data.demo import generate_demo
from tests.helpers import REPO_ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RAY = str(Path(sys.executable).with_name("ray"))


def _own_processes(marker: str) -> list[psutil.Process]:
    procs = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return procs


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    temp_dir = tempfile.mkdtemp(prefix="mlcr-", dir="/tmp")  # short: Unix socket paths live under it
    port, dashboard = free_port(), free_port()
    # Ray 2.60 local clusters use token auth (~/.ray/auth_token); the job CLI only sends the token
    # when RAY_AUTH_MODE=token is set in its environment.
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO_ROOT),
        "RAY_AUTH_MODE": "token",
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # every agent port of its own: the defaults (52365, ...) collide with any other Ray on the
            # machine, and then the job agent never registers ("No available agent to submit job")
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        procs = _own_processes(temp_dir)
        for proc in procs:
            for child in proc.children(recursive=True):
                procs.append(child)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        # the dashboard's processes answer SIGTERM within ~1.5 s; the raylet, GCS, log monitor and
        # runtime-env agent, all sent it at once, never do (measured 2026-12-02: still alive after
        # 8 s), so a longer wait only delays the SIGKILL (it was 5 s, every run)
        _, alive = psutil.wait_procs(procs, timeout=2)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        _, alive = psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"cluster processes left running: {alive}"


def _submit(
    address: str, env: dict[str, str], runtime_env: dict, job: list[str]
) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python jobs/...`, retried while the head's job agent starts."""
    command = [
        RAY, "job", "submit", "--address", address, "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env), "--", "python", *job,
    ]  # fmt: skip
    deadline = time.monotonic() + 300
    while True:  # the head's job agent comes up a little after `ray start` returns
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            return proc
        time.sleep(1)


def test_ray_job_submit_train_promote_tag(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """The cluster/README.md walk-through on a local head: train (tiny) + register, promote, tag."""
    import pyarrow.dataset as pads

    address, env = ray_head
    data = generate_demo(str(tmp_path / "demo"), seed=2, num_train=64, num_val=16, image_size=48)
    runs, tags = tmp_path / "runs", tmp_path / "tags"
    runtime_env = {
        "env_vars": {
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "MLC_RAY_MODEL_CACHE": str(tmp_path / "model-cache"),
            "RAY_USAGE_STATS_ENABLED": "0",
        },
        "excludes": ["/.venv", "/.git", "/data", "/runs", "/tags", "/mlruns", "/*.db"],
    }
    train = [
        "jobs/train.py", "--data", data, "--epochs", "1", "--image-size", "32", "--batch-size", "16",
        "--model", "mobilenet_v1", "--width", "0.5",
        "--storage-path", str(runs), "--run-name", "submitted", "--experiment", "job-submit",
        "--register-as", "submitted-tagger",
    ]  # fmt: skip
    proc = _submit(address, env, runtime_env, train)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    assert "MLflow run id:" in logs and "model bundle:" in logs
    assert (runs / "submitted" / "model" / "thresholds.json").is_file()

    # first promotion: no champion yet, allowed with a message; the job's exit status is ray's
    proc = _submit(address, env, runtime_env, ["jobs/promote.py", "--name", "submitted-tagger"])
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower() and "champion" in logs

    tag = [
        "jobs/tag.py", "--model", "models:/submitted-tagger@champion", "--input", data,
        "--output", str(tags), "--max-error-rate", "0",
    ]  # fmt: skip
    proc = _submit(address, env, runtime_env, tag)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    table = pads.dataset(str(tags), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 80  # every image of the manifest, once
    assert set(table.column("model_alias").to_pylist()) == {"champion"}

    # a failing job's status reaches the submitter: unknown alias -> the job fails, one clear line
    proc = _submit(
        address, env, runtime_env,
        ["jobs/tag.py", "--model", "models:/submitted-tagger@nope", "--input", data, "--output", str(tags)],
    )  # fmt: skip
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed" in logs.lower()
    assert "error:" in logs and "nope" in logs

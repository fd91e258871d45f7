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
from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.integration

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
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_training_to_completion(
    ray_head: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = ray_head
    data = generate_demo(str(tmp_path / "demo"), seed=2, num_train=64, num_val=16, image_size=48)
    runs = tmp_path / "runs"
    runtime_env = {
        "env_vars": {
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "RAY_USAGE_STATS_ENABLED": "0",
        },
        "excludes": ["/.venv", "/.git", "/data", "/runs", "/mlruns", "/*.db"],
    }
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "jobs/train.py",
        "--data",
        data,
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--storage-path",
        str(runs),
        "--run-name",
        "submitted",
        "--experiment",
        "job-submit",
    ]
    deadline = time.monotonic() + 300
    while True:  # the head's job agent comes up a little after `ray start` returns
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    assert "MLflow run id:" in logs and "model bundle:" in logs
    assert (runs / "submitted" / "model" / "thresholds.json").is_file()

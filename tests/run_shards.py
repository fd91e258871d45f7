"""Run the test suite as shards side by side: what ``make test`` calls.

    python -m tests.run_shards [PYTEST ARGS...]

Much of the suite's wall time is waiting (Ray clusters, job drivers and servers starting, training
workers importing torch): a serial run left the 2-CPU machine about half idle during a training test
(52 % busy over 30 s). So two pytest processes run at once, each with its own S3 server, MLflow and
local Ray clusters (on 2 CPUs the gain is small: both shards keep the CPUs busy; see README "Tests"):

* shard ``integration``: ``tests/integration`` but the per-model defaults and the mining pipeline;
* shard ``chaos+unit``: ``tests/chaos``, ``tests/unit``, then ``tests/integration/test_train_defaults.py``
  and ``tests/integration/test_mining_pipeline.py``
  (so the two take about as long: measured 2026-12-01, 14.5 and 19.3 min before the mining pipeline
  and the per-model defaults moved to the second shard; the mining pipeline came back to the first
  when the MLflow auth module went from ~5 to ~1 min, 2026-12-02, an estimate from module runs; it
  went to the second shard again when the per-model defaults went from 6 Ray Train runs to 1).

Nothing is shared between them: every Ray a test starts is ``address="local"`` (or has its own
temp dir), every server its own free port, and the chaos tests only touch processes descended from
their own pytest process. Each shard's output is streamed with a ``[shard]`` prefix and kept in
``.pytest-shards/<shard>.log``; the end repeats each shard's failure summary unprefixed, and the
exit code is non-zero when any shard failed.

``MLC_RAY_TEST_SHARDS=1`` runs one serial pytest instead; so do explicit test paths in the
arguments (``make test PYTEST_ARGS=tests/unit``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The longest integration module runs in the other shard so that the two take about as long.
TRAIN_DEFAULTS = "tests/integration/test_train_defaults.py"  # every registered model's defaults
MINING = "tests/integration/test_mining_pipeline.py"  # three training stages (local mode: ~45 s alone)
SHARDS = {
    "integration": ["tests/integration", f"--ignore={TRAIN_DEFAULTS}", f"--ignore={MINING}"],
    "chaos+unit": ["tests/chaos", "tests/unit", TRAIN_DEFAULTS, MINING],
}


def _stream(name: str, proc: subprocess.Popen, log: Path, lock: threading.Lock) -> None:
    with log.open("w") as fh:
        for line in proc.stdout:  # type: ignore[union-attr]
            fh.write(line)
            with lock:
                sys.stdout.write(f"[{name}] {line}")
                sys.stdout.flush()


def _summary(text: str) -> str:
    """The part of a pytest log from its "short test summary info" line on (or its last line)."""
    lines = text.rstrip().splitlines()
    for i, line in enumerate(lines):
        if "short test summary info" in line:
            return "\n".join(lines[i:])
    return lines[-1] if lines else "(no output)"


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    explicit_paths = any(not a.startswith("-") and Path(a.split("::")[0]).exists() for a in argv)
    if os.environ.get("MLC_RAY_TEST_SHARDS") == "1" or explicit_paths:
        return subprocess.call([*pytest, *argv], cwd=REPO_ROOT)
    logs = REPO_ROOT / ".pytest-shards"
    logs.mkdir(exist_ok=True)
    lock = threading.Lock()
    t0 = time.monotonic()
    running = []
    for name, paths in SHARDS.items():
        proc = subprocess.Popen(
            [*pytest, *paths, *argv],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        thread = threading.Thread(target=_stream, args=(name, proc, logs / f"{name}.log", lock), daemon=True)
        thread.start()
        running.append((name, proc, thread))
    codes = {}
    for name, proc, thread in running:
        codes[name] = proc.wait()
        thread.join()
    wall = time.monotonic() - t0
    print(f"\n{'=' * 30} shards: {wall:.0f} s wall {'=' * 30}")
    for name, _, _ in running:
        print(f"--- {name} (exit {codes[name]}, log .pytest-shards/{name}.log)")
        print(_summary((logs / f"{name}.log").read_text()))
    return max(codes.values())


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

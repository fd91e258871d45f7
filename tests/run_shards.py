"""Run the test suite as shards side by side: what ``make test`` calls.

    python -m tests.run_shards [PYTEST ARGS...]

Much of the suite's wall time is waiting (Ray clusters, job drivers and servers starting, training
workers importing torch): a serial run left the 2-CPU machine about half idle during a training test
(52 % busy over 30 s). So two pytest processes run at once, each with its own S3 server, MLflow and
local Ray clusters (on 2 CPUs the gain is small: both shards keep the CPUs busy; see README "Tests"):

* shard ``integration``: ``tests/integration`` but the modules in ``MOVED``;
* shard ``chaos+unit``: ``tests/chaos``, ``tests/unit``, then the per-model training defaults, the
  mining pipeline and two tagging modules (tag identity, incremental), so the two shards take about
  as long: measured 2026-12-02 on the 2-CPU machine (Intel Xeon, avx512_vnni), 825 and 776 s of
  test time before the tagging-incremental module and the resume test's local-mode step (~60 s).
  The moved tagging modules run on the chaos tier's Ray (``tests/chaos/conftest.py``) with its
  fault proxy passing everything through: ``ray_local`` takes the Ray it finds.

Each shard gets one compute thread per library (``SHARD_ENV``; a variable already set is kept):
two shards already fill the two CPUs, and with torch's and onnxruntime's default of one thread per
core the spare threads spin-wait on CPU the other shard needs (suite 855 s -> 830 s wall with it,
within the machine's run-to-run noise: the
two-worker training fixture took 69 s in that run against 40 s in the one before, so the effect is
not separated).

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
# Integration modules that run in the other shard so that the two take about as long.
TRAIN_DEFAULTS = "tests/integration/test_train_defaults.py"  # every registered model's defaults
MINING = "tests/integration/test_mining_pipeline.py"  # three training stages (local mode: ~45 s alone)
TAG_IDENTITY = "tests/integration/test_tag_identity.py"  # ~30 s
TAG_INCREMENTAL = "tests/integration/test_tag_incremental.py"  # ~35 s
MOVED = [TRAIN_DEFAULTS, MINING, TAG_IDENTITY, TAG_INCREMENTAL]
SHARDS = {
    "integration": ["tests/integration", *(f"--ignore={m}" for m in MOVED)],
    "chaos+unit": ["tests/chaos", "tests/unit", *MOVED],
}
# Two shards on 2 CPUs: each process tree gets one compute thread per library (torch/OpenMP,
# onnxruntime sessions that take the default). With two threads each, four compute threads share
# two cores and idle OpenMP / onnxruntime threads spin-wait on CPU the other shard needs.
SHARD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLC_RAY_ORT_THREADS": "1"}


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
            env={**os.environ, **{k: v for k, v in SHARD_ENV.items() if k not in os.environ}},
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

"""The whole mlc_ray pipeline on the embedded default, as ``make demo`` runs it.

Each stage is the job a user would run, started the way a user starts it (``python jobs/X.py``), so
the demo exercises the real command lines, exit codes and logs:

  [1] ``jobs/scan.py``     generate the demo data set (once) and report broken images
  [2] ``jobs/train.py``    train the demo MobileNetV1 on local Ray, calibrate thresholds, export ONNX
                           fp32/int8 and ncnn, register the version as ``mlc-ray-demo`` (alias challenger)
  [3] ``jobs/promote.py``  evaluate challenger vs champion on the demo validation split; move champion
  [4] ``jobs/tag.py``      tag the demo images with ``models:/mlc-ray-demo@champion`` into ./tags/demo
  [5] print a few rows of the tag table (read back with pyarrow)

Everything stays in the working directory: ``./data/demo``, ``./runs``, ``sqlite:///mlflow.db``
(or ``$MLFLOW_TRACKING_URI``), ``./tags/demo``. Running it again reuses the finished training run
(``--run-name mlc-ray-demo``: Ray Train resumes it, nothing is retrained), registers it again, and the
promotion gate then has a champion to beat; the tagging run resumes and rewrites nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["DEMO_MODEL_NAME", "demo_commands", "main"]

DEMO_MODEL_NAME = "mlc-ray-demo"
DEMO_RUN_NAME = "mlc-ray-demo"
DEMO_TAGS = "tags/demo"
PROMOTE_GATE_REFUSED = 3  # jobs/promote.py: the gate kept the current champion (not a failure here)


def demo_commands(python: str = sys.executable) -> list[tuple[str, list[str]]]:
    """(stage title, argv) for every stage, in order."""
    return [
        ("[1] scan the demo images", [python, "jobs/scan.py"]),
        (
            "[2] train, calibrate, export, register",
            [python, "jobs/train.py", "--run-name", DEMO_RUN_NAME, "--register-as", DEMO_MODEL_NAME],
        ),
        (
            "[3] promote the challenger if it is better",
            [python, "jobs/promote.py", "--name", DEMO_MODEL_NAME],
        ),
        (
            "[4] tag the demo images with the champion",
            [python, "jobs/tag.py", "--model", f"models:/{DEMO_MODEL_NAME}@champion", "--output", DEMO_TAGS],
        ),
    ]


def print_tag_rows(root: str = DEMO_TAGS, rows: int = 5) -> int:
    """Print the first ``rows`` rows of the tag table under ``root``; returns the table's row count."""
    import pyarrow.dataset as pads

    table = pads.dataset(root, format="parquet", partitioning="hive", exclude_invalid_files=True).to_table(
        columns=["image_uri", "labels", "model_version", "error", "dt"]
    )
    print(f"tag table {root}: {table.num_rows} rows; the first {min(rows, table.num_rows)}:")
    for row in table.slice(0, rows).to_pylist():
        name = Path(row["image_uri"]).name
        tags = ", ".join(row["labels"] or []) or "-"
        status = row["error"] or "ok"
        print(f"  {name:<14} v{row['model_version']:<4} {status:<4} labels: {tags}")
    return table.num_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the jobs")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    for title, cmd in demo_commands(args.python):
        print(f"\n=== {title}: {shlex.join(['python', *cmd[1:]])}", flush=True)
        code = subprocess.call(cmd, cwd=root)
        if code == PROMOTE_GATE_REFUSED and cmd[1] == "jobs/promote.py":
            print("(the gate kept the current champion; tagging uses it)", flush=True)
            continue
        if code != 0:
            print(f"demo: stage '{title}' failed with exit code {code}", file=sys.stderr)
            return code
    print("\n=== [5] the tag table", flush=True)
    print_tag_rows(str(root / DEMO_TAGS))
    print(
        f"\ndemo finished in {time.monotonic() - t0:.0f} s; MLflow: mlflow ui --backend-store-uri sqlite:///mlflow.db"
    )
    return 0


if __name__ == "__main__":
    from mlc_ray.cli import exit_process

    exit_process(main())  # sys.exit less the module teardown (mlc_ray.cli)

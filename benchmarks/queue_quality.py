"""Is the labelling queue worth labelling? Wrongly tagged images in a queue of N vs in N random images.

    python benchmarks/queue_quality.py --work /tmp/queue-quality --budget 100 --pool 1500

On the demo set, where the truth is known, with the jobs a user runs:

  [1] ``jobs/train.py``   the demo recipe (configs/demo.yaml) on the demo set -> registered v1
  [2] a "production" pool: ``--pool`` fresh demo images (another seed: never trained on), truth kept aside
  [3] ``jobs/tag.py``     tag the pool with v1 into a tag table
  [4] ``jobs/select_queue.py``  a queue of ``--budget`` images (the default mix); and ``--random`` random
                          samples of the same size (``--mix random:1 --seed S``), the control
  [5] an image is *wrongly tagged* when its predicted label set (the queue's pre-filled ``labels``)
      is not its true label set; report the share in the queue, per reason, and in the random samples

Training is reused when ``--work`` already holds the finished run (``--run-name``); the figures go
into the README ("Closing the loop").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "queue-quality"


def job(work: Path, *argv: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / argv[0]), *argv[1:]],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def truth(manifest: Path) -> dict[str, set[str]]:
    with open(manifest, newline="") as f:
        return {
            str((manifest.parent / r["image"]).resolve()): set(filter(None, r["labels"].split("|")))
            for r in csv.DictReader(f)
        }


def wrong_share(queue: Path, true: dict[str, set[str]]) -> tuple[float, int, dict[str, list[int]]]:
    with open(queue, newline="") as f:
        rows = list(csv.DictReader(f))
    per_reason: dict[str, list[int]] = {}
    wrong = 0
    for r in rows:
        bad = set(filter(None, r["labels"].split("|"))) != true[str(Path(r["image"]).resolve())]
        wrong += bad
        per_reason.setdefault(r["reason"], [0, 0])
        per_reason[r["reason"]][0] += bad
        per_reason[r["reason"]][1] += 1
    return wrong / max(1, len(rows)), len(rows), per_reason


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/mlc_ray-queue-quality")
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--pool", type=int, default=1500)
    p.add_argument("--random", type=int, default=20, help="random samples averaged for the control")
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    # [1] train the demo recipe once (a finished run is reused: same --run-name)
    train = [
        "train.py",
        "--run-name",
        f"{MODEL}-v1",
        "--storage-path",
        str(work / "runs"),
        "--register-as",
        MODEL,
    ]
    if args.epochs:
        train += ["--epochs", str(args.epochs)]
    if not (work / "trained.json").is_file():
        out = job(work, *train)
        (work / "trained.json").write_text(json.dumps({"stdout_tail": out[-4000:]}))
    t_train = time.monotonic() - t0

    # [2] the production pool: fresh demo images, their truth kept aside
    from mlc_ray.data.demo import generate_demo

    pool_manifest = Path(generate_demo(str(work / "pool"), seed=1, num_train=args.pool, num_val=1))
    true = truth(pool_manifest)

    # [3] tag the pool's images (the prefix, as production would: the manifest is not read)
    job(
        work,
        "tag.py",
        "--model",
        f"models:/{MODEL}/1",
        "--input",
        str(work / "pool" / "images"),
        "--output",
        str(work / "tags"),
        "--no-mlflow",
        "--no-report",
    )

    # [4] the queue, and the random control
    queue = work / "queue.csv"
    job(
        work,
        "select_queue.py",
        "--table",
        str(work / "tags"),
        "--budget",
        str(args.budget),
        "--out",
        str(queue),
    )
    q_share, q_n, per_reason = wrong_share(queue, true)
    shares = []
    for seed in range(args.random):
        rnd = work / f"random-{seed}.csv"
        job(
            work,
            "select_queue.py",
            "--table",
            str(work / "tags"),
            "--budget",
            str(args.budget),
            "--out",
            str(rnd),
            "--mix",
            "random:1",
            "--seed",
            str(seed),
        )
        shares.append(wrong_share(rnd, true)[0])
    r_share = sum(shares) / len(shares)
    pool_wrong = None  # the whole pool's share: every image once
    import pyarrow.dataset as pads

    table = pads.dataset(str(work / "tags"), format="parquet", partitioning="hive").to_table(
        columns=["image_uri", "labels", "error"]
    )
    rows = [r for r in table.to_pylist() if r["error"] is None]
    pool_wrong = sum(set(r["labels"]) != true[str(Path(r["image_uri"]).resolve())] for r in rows) / len(rows)
    figures = {
        "budget": args.budget,
        "pool_images": len(rows),
        "queue_images": q_n,
        "queue_wrong_share": round(q_share, 4),
        "queue_wrong_by_reason": {k: f"{w}/{n}" for k, (w, n) in per_reason.items()},
        "random_wrong_share_mean": round(r_share, 4),
        "random_wrong_share_min_max": [round(min(shares), 4), round(max(shares), 4)],
        "random_samples": len(shares),
        "pool_wrong_share": round(pool_wrong, 4),
        "ratio_queue_vs_random": round(q_share / r_share, 2) if r_share else None,
        "train_s": round(t_train, 1),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

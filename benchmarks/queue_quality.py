"""Is the labelling queue worth labelling? Wrongly tagged images in a queue of N vs in N random images.

    python benchmarks/queue_quality.py --work /tmp/queue-quality --budget 100 --pool 1500 --pool-seed 2 \
        --variant "per-label ranking=--uncertainty-rule label" --variant "uncertainty only=--mix uncertainty:1"

On the demo set, where the truth is known, with the jobs a user runs:

  [1] ``jobs/train.py``   the demo recipe (configs/demo.yaml) on the demo set (seed 0) -> registered v1
  [2] a "production" pool: ``--pool`` fresh demo images of ``--pool-seed`` (not 0: never trained on),
      truth kept aside; choose a rule on one pool seed and report on another
  [3] ``jobs/tag.py``     tag the pool with v1 into a tag table
  [4] ``jobs/select_queue.py``  a queue of ``--budget`` images (the default mix, and each ``--variant``:
                          extra select_queue flags); and ``--random`` random samples of the same size
                          (``--mix random:1 --seed S``, in-process: the same selection code), the control
  [5] an image is *wrongly tagged* when its predicted label set (the queue's pre-filled ``labels``)
      is not its true label set; report the share in the queue, per reason, and in the random samples
      (whose expectation is exactly the whole pool's share, also reported)

Training is reused when ``--work`` already holds the finished run (``--run-name``), the pool's tag
table when it holds that seed's; the figures go into the README ("Closing the loop").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
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
    p.add_argument("--pool-seed", type=int, default=1, help="the pool's demo seed (training uses 0)")
    p.add_argument("--random", type=int, default=200, help="random samples averaged for the control")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="another queue to measure: select_queue.py flags added to the default command",
    )
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.pool_seed == 0:
        raise SystemExit("error: --pool-seed 0 is the training set's seed; the pool must be other images")
    variants = []
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"error: --variant expects NAME=FLAGS, got {v!r}")
        variants.append((name.strip(), shlex.split(flags)))
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

    pool_dir = work / f"pool-{args.pool_seed}-{args.pool}"
    tags = work / f"tags-{args.pool_seed}-{args.pool}"
    pool_manifest = Path(generate_demo(str(pool_dir), seed=args.pool_seed, num_train=args.pool, num_val=1))
    true = truth(pool_manifest)

    # [3] tag the pool's images (the prefix, as production would: the manifest is not read)
    job(
        work,
        "tag.py",
        "--model",
        f"models:/{MODEL}/1",
        "--input",
        str(pool_dir / "images"),
        "--output",
        str(tags),
        "--no-mlflow",
        "--no-report",
    )

    # [4] the queues (default mix, variants), and the random control
    queues = {}
    for i, (name, flags) in enumerate([("default", []), *variants]):
        queue = work / f"queue-{args.pool_seed}-{i}.csv"
        cmd = ["select_queue.py", "--table", str(tags), "--budget", str(args.budget), "--out", str(queue)]
        job(work, *cmd, *flags)
        q_share, q_n, per_reason = wrong_share(queue, true)
        queues[name] = {
            "flags": " ".join(flags),
            "images": q_n,
            "wrong_share": round(q_share, 4),
            "wrong_by_reason": {k: f"{w}/{n}" for k, (w, n) in per_reason.items()},
        }
    from mlc_ray.select import SelectConfig, select_queue

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"  # the rows' thresholds: v1's
    shares = []
    for seed in range(args.random):
        rnd = work / "random.csv"
        cfg = SelectConfig(table=str(tags), budget=args.budget, out=str(rnd), mix="random:1", seed=seed)
        select_queue(cfg)
        shares.append(wrong_share(rnd, true)[0])
    r_share = statistics.fmean(shares)
    import pyarrow.dataset as pads

    table = pads.dataset(str(tags), format="parquet", partitioning="hive").to_table(
        columns=["image_uri", "labels", "error"]
    )
    rows = [r for r in table.to_pylist() if r["error"] is None]
    pool_wrong = sum(set(r["labels"]) != true[str(Path(r["image_uri"]).resolve())] for r in rows) / len(rows)
    for q in queues.values():
        q["ratio_vs_random"] = round(q["wrong_share"] / r_share, 2) if r_share else None
        q["ratio_vs_pool"] = round(q["wrong_share"] / pool_wrong, 2) if pool_wrong else None
    figures = {
        "budget": args.budget,
        "pool_seed": args.pool_seed,
        "pool_images": len(rows),
        "queues": queues,
        "random_wrong_share_mean": round(r_share, 4),
        "random_wrong_share_stdev": round(statistics.stdev(shares), 4) if len(shares) > 1 else None,
        "random_wrong_share_min_max": [round(min(shares), 4), round(max(shares), 4)],
        "random_samples": len(shares),
        "pool_wrong_share": round(pool_wrong, 4),
        "ceiling_ratio": round(min(1.0, len(rows) * pool_wrong / args.budget) / pool_wrong, 2)
        if pool_wrong
        else None,
        "train_s": round(t_train, 1),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

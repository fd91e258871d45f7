"""Memory and time of the labelling-queue selection (``jobs/select_queue.py``) on a synthetic tag table.

    python benchmarks/select_queue.py --rows 10000000 --runs 2 --labels 7 --root /tmp/select-bench

writes (once; reused when present) a tag table of ``--rows`` rows in the exact tag-table schema
(``--runs`` runs over ``rows / runs`` images, so "latest row per image" has work to do, 5% of the
images under two URIs with one ETag), then runs ``jobs/select_queue.py`` on it in a child process per
case and reports its peak RSS (``ru_maxrss``), wall time and queue size. Cases: the default mix
over every run; the same with the second run compared against the first (disagreement). The
figures go into BENCHMARKS.md "Labelling queue".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FILE_ROWS = 10_000  # rows per file: jobs/tag.py's default --shard-size


def _scores(rng: np.random.Generator, n: int, n_labels: int) -> np.ndarray:
    """Beta-distributed scores: most images confidently negative, some positive, a few near 0.5."""
    base = rng.beta(0.4, 2.0, size=(n, n_labels))
    flip = rng.random((n, n_labels)) < np.linspace(0.02, 0.4, n_labels)[None, :]
    return np.where(flip, 1 - base, base).astype(np.float32)


def write_synthetic_table(
    root: str, *, rows: int, runs: int = 2, n_labels: int = 7, seed: int = 0, file_rows: int = FILE_ROWS
) -> dict:
    """A tag table under ``root`` (local) with ``rows`` rows; returns its description (also saved)."""
    from mlc_ray.calibrate import Thresholds
    from mlc_ray.tagging.table import Provenance, TagTableWriter, tag_rows

    marker = Path(root) / "_synthetic.json"
    want = {"rows": rows, "runs": runs, "labels": n_labels, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()).get("args") == want:
        return json.loads(marker.read_text())
    labels = [f"label{j}" for j in range(n_labels)]
    thresholds = Thresholds(labels=labels, values=list(np.linspace(0.3, 0.7, n_labels)), method="fixed")
    images = rows // runs
    rng = np.random.default_rng(seed)
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    run_ids = []
    for r in range(runs):
        run_id = f"rsynth{r}"
        run_ids.append(run_id)
        prov = Provenance(
            model_name="synthetic",
            model_version=str(r + 1),
            model_alias=None,
            thresholds_sha256=thresholds.sha256,
            backend="onnxruntime",
            precision="fp32",
            run_id=run_id,
        )
        writer = TagTableWriter(root, (t0 + timedelta(days=r)).strftime("%Y-%m-%d"), run_id)
        for shard, start in enumerate(range(0, images, file_rows)):
            n = min(file_rows, images - start)
            idx = np.arange(start, start + n)
            uris = [f"s3://photos/incoming/{i:09d}.jpg" for i in idx]
            # 5% of the images are a copy of the image before them: same bytes, same ETag
            etags = [f"{(i - 1 if i % 20 == 1 else i):032x}" for i in idx]
            scores = _scores(rng, n, n_labels)
            predicted = scores >= np.asarray(thresholds.values, dtype=np.float32)[None, :]
            table = tag_rows(
                image_uris=uris,
                source_etags=etags,
                label_names=labels,
                scores=scores,
                predicted=predicted,
                ok_rows=np.arange(n),
                widths=[640] * n,
                heights=[480] * n,
                errors=[None] * n,
                provenance=prov,
                tagged_at=t0 + timedelta(days=r, seconds=shard),
            )
            writer.commit(table, shard, f"{r:04d}{shard:08d}")
        report = Path(root) / "_runs" / run_id / "report"
        report.mkdir(parents=True, exist_ok=True)
        (report / "report.json").write_text(
            json.dumps(
                {
                    "labels": [
                        {"label": n, "threshold": t} for n, t in zip(labels, thresholds.values, strict=True)
                    ]
                }
            )
        )
    size = sum(p.stat().st_size for p in Path(root).rglob("*.parquet"))
    doc = {"args": want, "run_ids": run_ids, "images": images, "parquet_bytes": size}
    marker.write_text(json.dumps(doc))
    return doc


_CHILD = """
import resource, runpy, sys
path, args = sys.argv[1], sys.argv[2:]
sys.argv = [path, *args]
code = 0
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def run_case(argv: list[str]) -> dict:
    """jobs/select_queue.py in a child process of its own: its peak RSS (its own ru_maxrss) and wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(REPO / "jobs" / "select_queue.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"select failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {
        "argv": argv,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "output": proc.stdout.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--labels", type=int, default=7)
    p.add_argument("--budget", type=int, default=1000)
    p.add_argument("--root", default="/tmp/mlc_ray-select-bench")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    table = write_synthetic_table(args.root, rows=args.rows, runs=args.runs, n_labels=args.labels)
    print(
        f"table: {args.rows} rows, {table['images']} images x {args.runs} runs, "
        f"{table['parquet_bytes'] / 2**20:.0f} MiB of Parquet ({time.monotonic() - t0:.0f} s to ready)",
        flush=True,
    )
    out = Path(args.root).parent / "select-bench-queue.csv"
    base = ["--table", args.root, "--budget", str(args.budget), "--out", str(out)]
    cases = {"every run, latest row per image": base}
    if args.runs >= 2:
        cases["run 2 vs run 1 (disagreement)"] = [
            *base,
            "--run",
            table["run_ids"][1],
            "--compare-run",
            table["run_ids"][0],
        ]
    results = {}
    for name, case in cases.items():
        res = run_case(case)
        results[name] = res
        print(
            f"\n== {name}: peak RSS {res['peak_rss_mb']} MiB, {res['wall_s']} s\n{res['output']}", flush=True
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

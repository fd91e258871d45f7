"""Bulk-tag images into the Parquet tag table with Ray Data (resumable; incremental on a schedule).

    python jobs/tag.py --model models:/NAME@champion --input s3://bucket/photos/ --output s3://bucket/tags/
        [--backend onnxruntime|ncnn] [--precision fp32|int8] [--batch-size 32] [--actors MIN:MAX]
        [--threads-per-actor N] [--use-gpu] [--incremental] [--max-error-rate 0.05] [--limit N]
        [--shard-size 10000] [--run-id ID] [--config tag.yaml]
        [--min-score S] [--top-k K] [--labels a,b] [--exclude-labels c]
        [--progress-every 30] [--drift-alert X] [--no-report] [--no-mlflow]

With no arguments it tags the demo images with the demo champion (models:/mlc-ray-demo@champion)
into ./tags/demo. Rerunning the same command resumes the same run (committed shards are skipped).
Every run leaves a report under <output>/_runs/<run_id>/report/ (index.html, contact sheets, score
histograms, label rates against the model's validation rates) and a run in MLflow experiment `tagging`.
Exit codes: 0 done, 1 error rate above --max-error-rate (rows are still written), 2 a user error
(unknown model/alias/label, missing input, bad config), 3 a label's rate left the --drift-alert band
(rows and report are written), 4 a model file does not match its sha256 tag.
"""

from __future__ import annotations

import argparse

from mlc_ray.cli import ArgumentParser, exit_process, run_job, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a bundle dir (default: demo)")
    p.add_argument("--input", help="s3:// or local prefix of images, or a manifest (default: demo images)")
    p.add_argument("--output", help="tag table root, s3:// or local (default: tags/demo)")
    p.add_argument("--backend", choices=["onnxruntime", "ncnn"])
    p.add_argument("--precision", choices=["fp32", "int8"])
    p.add_argument("--batch-size", type=int, help="images per inference call (default 32)")
    p.add_argument("--actors", help="inference actors MIN:MAX or N (default: from the cluster's CPUs)")
    p.add_argument("--threads-per-actor", type=int, help="intra-op threads per actor (default: from CPUs)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="CUDA execution provider (must work)")
    p.add_argument("--incremental", action="store_true", default=None, help="only new or changed images")
    p.add_argument("--max-error-rate", type=float, help="fail above this error fraction (default 0.05)")
    p.add_argument("--limit", type=int, help="tag at most N images")
    p.add_argument("--shard-size", type=int, help="keys per shard / Parquet file (default 10000)")
    p.add_argument(
        "--batch-timeout-s",
        type=float,
        help="a batch running longer is taken as hung; an image that hangs every time gets a "
        "`timeout` row (default 600)",
    )
    p.add_argument(
        "--read-deadline-s",
        type=float,
        help="total seconds to read one object, retries included; later it is an `unreadable` row (default 60)",
    )
    p.add_argument("--min-score", type=float, help="list a label only when its score >= max(threshold, S)")
    p.add_argument("--top-k", type=int, help="list at most K labels per image, highest scores first")
    p.add_argument("--labels", help="comma-separated labels: only these are listed (scores keep every label)")
    p.add_argument("--exclude-labels", help="comma-separated labels never listed")
    p.add_argument(
        "--progress-every", type=float, help="seconds between progress lines (default 30; no progress bars)"
    )
    p.add_argument(
        "--drift-alert",
        type=float,
        metavar="X",
        help="exit 3 when a label's rate / its validation rate leaves [1/X, X] (after writing everything)",
    )
    p.add_argument("--no-report", dest="report", action="store_false", default=None, help="no report files")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", default=None, help="no MLflow run")
    p.add_argument(
        "--run-id",
        help="name the run (default: hash of model version, thresholds, backend, precision, "
        "preprocessing, tag-time options, input, output)",
    )
    p.add_argument("--config", help="YAML file with TagConfig keys; flags override it")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from mlc_ray.config import load_config
        from mlc_ray.tagging.config import TagConfig
        from mlc_ray.tagging.pipeline import run_tagging

        overrides = {k: v for k, v in vars(args).items() if k not in ("config", "verbose")}
        cfg = load_config(TagConfig, args.config, overrides)
        summary = run_tagging(cfg, raise_on_error_rate=False)
        print(summary.format(), flush=True)  # the summary table, also when the job then fails
        summary.raise_for_outcome()  # exit 1 (error rate) or 3 (drift alert), one error line
        return 0

    return run_job(body)


if __name__ == "__main__":
    exit_process(main())  # sys.exit less the module teardown (mlc_ray.cli)

"""Decode every image of a data set with Ray Data and report the damaged ones (never deletes anything).

    python jobs/scan.py                                      # the demo data set (generated if missing)
    python jobs/scan.py --data MANIFEST_OR_PREFIX [--report OUT.parquet] [--write-clean OUT_MANIFEST]
        [--max-error-rate 0.05] [--config scan.yaml]

MANIFEST_OR_PREFIX: a manifest (csv/jsonl/parquet/seed formats, local or s3://), or a folder /
s3:// prefix whose image files are listed. The report has one row per image (image, error_code,
message, width, height); --write-clean writes the rows that decoded as a new manifest (labels
kept; a prefix gives an unlabelled image list). Exit codes: 0 scanned (broken images are reported,
not failures), 3 more broken than --max-error-rate, 2 a user error (bad path, bad manifest), 1 a bug.
"""

from __future__ import annotations

import argparse

from mlc_ray.cli import ArgumentParser, exit_process, run_job, setup_logging
from mlc_ray.config import config_to_yaml, load_config
from mlc_ray.scan import ScanConfig, enforce_error_rate, run_scan


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="manifest, or folder / s3:// prefix of images (default: demo data)")
    parser.add_argument("--report", help="write the per-image report here (.parquet, local or s3://)")
    parser.add_argument(
        "--write-clean", help="write a manifest of the images that decoded (.csv/.jsonl/.parquet)"
    )
    parser.add_argument(
        "--max-error-rate", type=float, help="fail (exit 3) above this fraction of broken images"
    )
    parser.add_argument("--batch-size", type=int, help="images per decode task (default 32)")
    parser.add_argument("--config", help="YAML file with ScanConfig keys; flags override it")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        overrides = {
            "data": args.data,
            "report": args.report,
            "write_clean": args.write_clean,
            "max_error_rate": args.max_error_rate,
            "batch_size": args.batch_size,
        }
        cfg = load_config(ScanConfig, args.config, overrides)
        if args.verbose:
            print(config_to_yaml(cfg))
        result = run_scan(cfg)  # starts (or joins) Ray once the inputs are known to exist
        print(result.summary(cfg.summary_lines))
        enforce_error_rate(result, cfg.max_error_rate)
        return 0

    return run_job(body)


if __name__ == "__main__":
    exit_process(main())  # sys.exit less the module teardown (mlc_ray.cli)

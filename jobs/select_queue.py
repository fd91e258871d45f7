"""Pick the images to label next from a tag table: a labelling queue in the manifest format.

    python jobs/select_queue.py --table s3://bucket/tags/photos/ --budget 500 --out queue.csv
        [--run RUN_ID | --version V] [--compare TABLE] [--compare-run RUN_ID] [--compare-version V]
        [--mix uncertainty:0.6,disagreement:0.2,rare_combination:0.2] [--label-quota Q]
        [--rare-fraction 0.02] [--uncertainty-rule label_set|label] [--uncertainty-temperature 1.0]
        [--thresholds thresholds.json|BUNDLE|models:/NAME/VERSION]
        [--seed 0] [--config select.yaml]

Reads the latest row per image (one row per source_etag) across the table's runs, or one run's /
version's rows, and picks --budget images: images whose predicted label set is most likely wrong
(uncertainty: scores near their labels' thresholds, several borderline labels first),
images two sources tag differently (disagreement, when --compare/--compare-run/--compare-version
is given), rare predicted label combinations, and a seeded random share if the mix asks for one;
no label takes more than --label-quota rows. The queue (image, labels pre-filled from the
prediction, reason, score, label, source_etag, model_version, run_id) and labels.txt beside it
are what a labelling tool imports and, once corrected, what `jobs/train.py --data` reads.
Exit codes: 0 done, 2 a user error (no such table, bad flag, unknown thresholds).
(Not `jobs/select.py`: `python jobs/X.py` puts jobs/ first on sys.path, and a `select.py` there would
replace the standard library's `select` module for every job: subprocess, Ray and torch import it.)
"""

from __future__ import annotations

import argparse

from mlc_ray.cli import ArgumentParser, exit_process, run_job, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", help="tag table root (s3:// or local): what jobs/tag.py --output wrote")
    p.add_argument("--budget", type=int, help="images in the queue (default 500)")
    p.add_argument("--out", help="queue manifest to write, .csv/.jsonl/.parquet (default queue.csv)")
    p.add_argument("--run", help="only rows of this run id (default: latest row per image, every run)")
    p.add_argument("--version", help="only rows of this model version")
    p.add_argument("--compare", help="a second tag table: images the two tag differently are picked")
    p.add_argument("--compare-run", help="the second source's run id (same table unless --compare)")
    p.add_argument(
        "--compare-version", help="the second source's model version (same table unless --compare)"
    )
    p.add_argument(
        "--mix", help="budget share per reason, e.g. uncertainty:0.6,disagreement:0.2,rare_combination:0.2"
    )
    p.add_argument(
        "--label-quota", type=int, help="most rows one label may take (default 2 x budget / labels)"
    )
    p.add_argument(
        "--rare-fraction", type=float, help="a combination is rare at most this share of images (0.02)"
    )
    p.add_argument(
        "--uncertainty-rule",
        help="label_set (default): images by the chance their label set is wrong; "
        "label: each label's scores nearest its threshold",
    )
    p.add_argument(
        "--uncertainty-temperature",
        type=float,
        help="logit distance to a threshold per e-fold of a decision's chance of being wrong (1.0)",
    )
    p.add_argument(
        "--thresholds", help="thresholds.json, bundle dir or models:/NAME/VERSION (default: per row)"
    )
    p.add_argument("--seed", type=int, help="seed of the random share (default 0)")
    p.add_argument("--batch-size", type=int, help="rows per scanned batch (default 65536)")
    p.add_argument("--config", help="YAML file with SelectConfig keys; flags override it")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from mlc_ray.config import load_config
        from mlc_ray.select import SelectConfig, select_queue

        overrides = {k: v for k, v in vars(args).items() if k not in ("config", "verbose")}
        cfg = load_config(SelectConfig, args.config, overrides)
        print(select_queue(cfg).format(), flush=True)
        return 0

    return run_job(body)


if __name__ == "__main__":
    exit_process(main())  # sys.exit less the module teardown (mlc_ray.cli)

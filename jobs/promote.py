"""Promote a registered model version to `champion` if it beats the current one, or roll back.

    python jobs/promote.py --name NAME [--eval-data MANIFEST] [--candidate challenger|VERSION]
        [--metric macro_f1] [--min-delta 0.0] [--max-label-drop 0.03] [--split auto] [--dry-run]
        [--allow-train-overlap]
        [--shadow s3://bucket/incoming/ --shadow-sample N [--shadow-seed S] [--max-rate-change R]
         [--shadow-min-count C] [--shadow-output DIR] [--force]]
    python jobs/promote.py --name NAME --rollback
    python jobs/promote.py --history NAME

Candidate and champion are evaluated on the same data, each at its own calibrated thresholds.
Without --eval-data the candidate's recorded evaluation data is used (its `eval_data_uri` tag:
the --val-data manifest it was trained with, or its split's val rows). Evaluation data containing
any of the candidate's training images (same URI or same bytes) is refused with the count, unless
--allow-train-overlap (the report then says the comparison is not held out).
With a staging model (the registry locked down, mlflow/README.md), pass the candidate as a URI:
--candidate models:/NAME-staging@challenger; a winner is copied into NAME before @champion moves.
--shadow PREFIX also tags a seeded random sample of --shadow-sample unlabelled images under PREFIX
(or a manifest) with both versions through the bulk tagging pipeline of jobs/tag.py and reports,
per label, both positive rates, the relative change, Cohen's kappa and Jaccard, and a contact sheet
of the most-disagreeing images; with --max-rate-change R a label whose rate changes by more than R
(relative, on labels either model lists >= --shadow-min-count times) holds the promotion (exit 3,
champion unchanged) unless --force. The figures join the report and the versions' audit tags.
--history NAME prints every decision about @champion (when, who, from -> to, decision, evidence).
Exit codes: 0 promoted (or rolled back, or already champion), 3 the gate refused, 4 an artifact
does not match its sha256 tag, 2 a user error (unknown model/alias, bad manifest), 1 a bug.
"""

from __future__ import annotations

import argparse
import logging

from mlc_ray.alias_history import alias_history, format_history
from mlc_ray.cli import ArgumentParser, exit_process, run_job, setup_logging
from mlc_ray.registry import CHALLENGER, promote, rollback

log = logging.getLogger("mlc_ray.jobs.promote")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="registered model name (required unless --history)")
    parser.add_argument(
        "--eval-data",
        help="labelled manifest both versions are scored on (default: the candidate's recorded val data)",
    )
    parser.add_argument(
        "--candidate", default=CHALLENGER, help="version number or alias (default: challenger)"
    )
    parser.add_argument("--metric", default="macro_f1", help="scalar metric to compare (default: macro_f1)")
    parser.add_argument(
        "--min-delta", type=float, default=0.0, help="candidate must beat champion by this much"
    )
    parser.add_argument(
        "--max-label-drop", type=float, default=0.03, help="largest F1 drop allowed on any one label"
    )
    parser.add_argument(
        "--split",
        default="auto",
        choices=["auto", "all", "val", "test", "train"],
        help="manifest rows to use: auto (val rows if split column), all, val, test",
    )
    parser.add_argument(
        "--allow-train-overlap",
        action="store_true",
        help="evaluate even if --eval-data contains the candidate's training images (reported)",
    )
    shadow = parser.add_argument_group("shadow comparison on unlabelled images (mlc_ray/shadow.py)")
    shadow.add_argument(
        "--shadow", metavar="URI", help="prefix (s3:// or local) or manifest of unlabelled images"
    )
    shadow.add_argument(
        "--shadow-sample", type=int, default=500, metavar="N", help="images to tag (default 500)"
    )
    shadow.add_argument(
        "--shadow-seed", type=int, default=0, metavar="S", help="the sample's seed (default 0)"
    )
    shadow.add_argument(
        "--max-rate-change",
        type=float,
        metavar="R",
        help="hold when a label's rate changes by more than R, relative (0.5 = by half); default: report only",
    )
    shadow.add_argument(
        "--shadow-min-count",
        type=int,
        default=10,
        metavar="C",
        help="judge a label only when either model lists it >= C times in the sample (default 10)",
    )
    shadow.add_argument("--shadow-output", metavar="DIR", help="keep the sample's tag table and report here")
    shadow.add_argument(
        "--force", action="store_true", help="promote even when the shadow comparison holds it"
    )
    parser.add_argument("--dry-run", action="store_true", help="evaluate and report; change nothing")
    parser.add_argument("--rollback", action="store_true", help="make previous-champion the champion again")
    parser.add_argument(
        "--history", metavar="NAME", help="print every champion move and refusal of NAME, newest first"
    )
    parser.add_argument("--cache-dir", help="where to download model versions (default: a temporary dir)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def check_gate_args(args: argparse.Namespace) -> None:
    """The gate's settings, refused before any model is looked up or downloaded."""
    import math

    from mlc_ray.config import ConfigError
    from mlc_ray.train.metrics import SCALAR_KEYS

    if args.metric not in SCALAR_KEYS:
        raise ConfigError(f"--metric: unknown metric {args.metric!r}; use one of {', '.join(SCALAR_KEYS)}")
    if not math.isfinite(args.min_delta):
        raise ConfigError(f"--min-delta: expected a finite number, got {args.min_delta}")
    if not 0.0 <= args.max_label_drop <= 1.0:
        raise ConfigError(f"--max-label-drop: expected an F1 drop in [0, 1], got {args.max_label_drop}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.name and not args.history:
        parser.error("--name is required (or --history NAME)")
    setup_logging(args.verbose)

    def body() -> int:
        if args.history:
            print(format_history(args.history, alias_history(args.history)))
            return 0
        from mlc_ray.config import ConfigError

        check_gate_args(args)
        gate = None
        if args.shadow:
            from mlc_ray.shadow import ShadowConfig, shadow_gate

            if args.rollback:
                raise ConfigError("--shadow: a rollback restores a version that was champion; no shadow run")
            gate = shadow_gate(
                ShadowConfig(
                    input=args.shadow,
                    sample=args.shadow_sample,
                    seed=args.shadow_seed,
                    max_rate_change=args.max_rate_change,
                    min_count=args.shadow_min_count,
                    force=args.force,
                    output=args.shadow_output,
                ),
                cache_dir=args.cache_dir,
            )
        elif args.max_rate_change is not None or args.force or args.shadow_output:
            raise ConfigError("--max-rate-change / --force / --shadow-output need --shadow URI")
        if args.rollback:
            decision = rollback(args.name, dry_run=args.dry_run, cache_dir=args.cache_dir)
        else:
            decision = promote(
                args.name,
                args.eval_data,
                candidate=args.candidate,
                metric=args.metric,
                min_delta=args.min_delta,
                max_label_drop=args.max_label_drop,
                split=args.split,
                dry_run=args.dry_run,
                cache_dir=args.cache_dir,
                allow_train_overlap=args.allow_train_overlap,
                gate=gate,
            )
        print(decision.report())
        return decision.exit_code

    return run_job(body)


if __name__ == "__main__":
    exit_process(main())  # sys.exit less the module teardown (mlc_ray.cli)

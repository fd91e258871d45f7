"""Train a multi-label image tagger on Ray Train, calibrate its thresholds, write (and register) it.

    python jobs/train.py                                   # the demo: built-in data, local Ray, CPU
    python jobs/train.py --config configs/demo.yaml --epochs 5 --run-name demo-1
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/manifest.csv \\
        --storage-path s3://bucket/runs --run-name tagger-v3 --num-workers 4 --use-gpu --register-as tagger

Settings: the TrainConfig defaults (for real photos: mobilenet_v3_large at 224 px; width, image size and
normalisation left unset come from the architecture) < the --config YAML file < the flags given here
(flags left out change nothing; --set KEY=VALUE reaches any key, e.g. --set mining.top_k=32). Unknown
keys are errors. With no --data anywhere the demo preset (configs/demo.yaml) sits under the YAML file
and the flags. Starting the same --run-name with the same --storage-path again resumes that run from its
latest checkpoint (a finished run is not retrained); a run started with other data, model, image size,
labels or loss is refused unless --resume-changed. Exit codes: 0 done, 2 a user error, 1 a failure.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from mlc_ray.cli import ArgumentParser, exit_process, run_job, setup_logging

# flag -> config key; type; help.  Every flag defaults to None = "not given, keep the config's value".
OVERRIDES: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, "training manifest (csv/jsonl/parquet/seed format; local or s3://)"),
    ("--val-data", "val_data", str, "validation manifest (default: the split column, else a seeded split)"),
    ("--labels", "labels", str, "labels.txt (default: beside the manifest)"),
    ("--model", "model", str, "architecture (mlc_ray.models.list_models())"),
    ("--width", "width", float, "width multiplier (MobileNet V1/V2 alpha; default: the arch's own)"),
    ("--image-size", "image_size", int, "input side in pixels (default: the arch's, 224)"),
    ("--epochs", "epochs", int, "epochs"),
    ("--batch-size", "batch_size", int, "global batch size (split over the workers)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--optimizer", "optimizer", str, "adamw or sgd"),
    ("--schedule", "schedule", str, "cosine or onecycle"),
    ("--num-workers", "num_workers", int, "Ray Train workers"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing epsilon (seed 000)"),
    ("--loss", "loss", str, "bce or asl"),
    ("--pretrained", "pretrained", str, "backbone state-dict file to start from (no download)"),
    ("--init-from", "init_from", str, "model bundle or checkpoint to fine-tune from"),
    ("--experiment", "experiment", str, "MLflow experiment"),
    ("--register-as", "register_as", str, "register the bundle as this MLflow model (alias challenger)"),
    ("--storage-path", "storage_path", str, "checkpoint storage: local dir or s3://bucket/prefix"),
    ("--run-name", "run_name", str, "run name; the same name + storage path resumes the run"),
    ("--output", "output", str, "model bundle dir (default <storage-path>/<run-name>/model)"),
    ("--seed", "seed", int, "random seed"),
    ("--calibration", "calibration", str, "threshold method: f1_max, roc_closest, precision_at:P, fixed:T"),
    ("--tta", "tta", str, "final evaluation: none or 10crop"),
    ("--max-failures", "max_failures", int, "worker failures to recover from"),
    ("--max-error-rate", "max_error_rate", float, "largest share of undecodable images tolerated"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    for flag, key, type_, help_ in OVERRIDES:
        parser.add_argument(flag, dest=key, type=type_, default=None, help=help_)
    parser.add_argument(
        "--use-gpu", dest="use_gpu", action="store_true", default=None, help="one GPU per worker"
    )
    parser.add_argument("--mine", dest="mine", action="store_true", default=None, help="hard-sample mining")
    parser.add_argument(
        "--resume-changed",
        dest="resume_changed",
        action="store_true",
        default=None,
        help="resume --run-name even though its data/model/image size/labels/loss changed",
    )
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="any config key"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the user gave on the command line (``--set`` last, so it wins)."""
    from mlc_ray.config import ConfigError

    out: dict[str, Any] = {key: getattr(args, key) for _, key, _, _ in OVERRIDES}
    out["use_gpu"] = args.use_gpu
    out["resume_changed"] = args.resume_changed
    if args.mine:
        out["mining.enabled"] = True
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(
                f"--set {item}: the value is not valid YAML; quote strings, e.g. --set key='a b'"
            ) from None
        out[key.strip().replace("-", "_")] = parsed
    return {k: v for k, v in out.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from mlc_ray.train.config import load_train_config
        from mlc_ray.train.job import run_train_job

        cfg = load_train_config(args.config, overrides_from_args(args))
        result = run_train_job(cfg)
        print(result.summary())
        return 0

    return run_job(body)


if __name__ == "__main__":
    exit_process(main())  # sys.exit less the module teardown (mlc_ray.cli)

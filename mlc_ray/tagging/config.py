"""``TagConfig``: every setting of a bulk tagging run, validated once, saved with the run.

Filled by ``mlc_ray.config.load_config`` (defaults < ``--config`` YAML < CLI flags). Defaults are the
embedded demo: the demo images, the demo champion, output under ``./tags/demo``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlc_ray.config import ConfigError
from mlc_ray.tagging.options import TagOptions

__all__ = [
    "TagConfig",
    "DEFAULT_READ_DEADLINE_S",
    "DEMO_MODEL_URI",
    "DEMO_OUTPUT",
    "BACKENDS",
    "PRECISIONS",
    "parse_actors",
]

DEMO_MODEL_URI = "models:/mlc-ray-demo@champion"
DEMO_OUTPUT = "tags/demo"
BACKENDS = ("onnxruntime", "ncnn")
PRECISIONS = ("fp32", "int8")
# Total time one object may take to read, every attempt included; a GET held open longer is an
# `unreadable` row (retried by the next --incremental run), never a stalled job.
DEFAULT_READ_DEADLINE_S = 60.0


def parse_actors(text: str | None) -> tuple[int, int] | None:
    """``"2"`` -> (2, 2), ``"1:4"`` -> (1, 4); None stays None (chosen from the cluster's CPUs)."""
    if text is None or str(text).strip() in ("", "auto"):
        return None
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"actors: expected MIN:MAX or N (e.g. 2:8), got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] < 1 or values[1] < values[0]:
        raise ConfigError(f"actors: expected 1 <= MIN <= MAX as MIN:MAX, got {text!r}")
    return values[0], values[1]


@dataclass
class TagConfig:
    """One tagging run. ``None`` means "choose for me" (documented per field)."""

    model: str = DEMO_MODEL_URI  # models:/NAME@ALIAS, models:/NAME/VERSION, or a bundle dir (local/s3)
    input: str | None = None  # s3:// or local prefix, or a manifest (csv/jsonl/parquet); None = demo images
    output: str = DEMO_OUTPUT  # tag table root (s3:// or local); files go to <output>/dt=YYYY-MM-DD/
    backend: str = "onnxruntime"  # onnxruntime | ncnn
    precision: str = "fp32"  # fp32 (model.onnx) | int8 (model.int8.onnx, only if it passed its gate)
    batch_size: int = 32  # images per inference call
    actors: str | None = None  # "MIN:MAX" inference actors; None = from the cluster's CPUs (see pipeline)
    threads_per_actor: int | None = None  # intra-op threads per actor; None = from the cluster's CPUs
    use_gpu: bool = False  # CUDAExecutionProvider; the job fails if the session does not get CUDA
    incremental: bool = False  # tag only images this model version has not tagged (new/changed etag)
    max_error_rate: float = 0.05  # fail (exit 1) when more than this fraction of images are errors
    limit: int | None = None  # tag at most this many images (first N in listing order)
    shard_size: int = 10_000  # keys per shard = rows per committed Parquet file
    run_id: str | None = None  # None = hash of the row-affecting settings (state.py): reruns resume
    read_threads: int = 16  # concurrent object reads inside one read task (I/O bound)
    read_retries: int = 5  # attempts per object on transient errors (the only retries: boto3's are off)
    read_deadline_s: float = DEFAULT_READ_DEADLINE_S  # total seconds per object, all attempts included
    model_cache: str | None = None  # where resolved model files are cached (None = registry default)
    # an inference batch running longer than this is taken as hung: its actor exits, the batch is
    # retried, and an image that hangs every time ends as a `timeout` row (pipeline docstring)
    batch_timeout_s: float = 600.0
    # tag-time options (mlc_ray.tagging.options): part of every row's provenance and of the run id
    min_score: float | None = None  # list a label only when its score >= max(its threshold, min_score)
    top_k: int | None = None  # list at most this many labels per image, highest scores first
    labels: str | list[str] | None = None  # "a,b": only these labels are ever listed
    exclude_labels: str | list[str] | None = None  # "c": these labels are never listed
    # reporting: a progress line every this many seconds (no progress bars when not a terminal)
    progress_every: float = 30.0
    # exit 3 (after every row and the report are written) when a label's positive rate over its
    # rate on the model's validation set leaves [1/drift_alert, drift_alert]; None = report only
    drift_alert: float | None = None
    report: bool = True  # write the run's report (contact sheets, histograms); False: counts and drift only
    mlflow: bool = True  # log the report to one MLflow run in experiment "tagging" (MLFLOW_TRACKING_URI)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: give models:/NAME@ALIAS, models:/NAME/VERSION or a bundle directory")
        if not self.output:
            raise ConfigError(
                "output: give the tag table's root directory (local path or s3://bucket/prefix)"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.backend == "ncnn" and self.precision == "int8":
            raise ConfigError(
                "backend ncnn with precision int8: the ncnn wheels carry no int8 converter; "
                "use --backend onnxruntime --precision int8"
            )
        if self.backend == "ncnn" and self.use_gpu:
            raise ConfigError("--use-gpu is supported with --backend onnxruntime only")
        for name, low in (("batch_size", 1), ("shard_size", 1), ("read_threads", 1), ("read_retries", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ConfigError(f"threads_per_actor: expected an integer >= 1, got {self.threads_per_actor!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: expected an integer >= 1, got {self.limit!r}")
        if isinstance(self.read_deadline_s, bool) or not float(self.read_deadline_s) > 0:
            raise ConfigError(f"read_deadline_s: expected seconds > 0, got {self.read_deadline_s!r}")
        if isinstance(self.batch_timeout_s, bool) or not float(self.batch_timeout_s) > 0:
            raise ConfigError(f"batch_timeout_s: expected seconds > 0, got {self.batch_timeout_s!r}")
        if not 0.0 <= float(self.max_error_rate) <= 1.0:
            raise ConfigError(f"max_error_rate: expected a fraction in [0, 1], got {self.max_error_rate!r}")
        parse_actors(self.actors)  # validate now, not after the listing
        _ = self.tag_options  # validates min_score / top_k / labels
        if isinstance(self.progress_every, bool) or not float(self.progress_every) > 0:
            raise ConfigError(f"progress_every: expected seconds > 0, got {self.progress_every!r}")
        if self.drift_alert is not None and not float(self.drift_alert) > 1.0:
            raise ConfigError(
                f"drift_alert: expected a rate ratio > 1 (e.g. 2 = alert when a label's rate halves or "
                f"doubles), got {self.drift_alert!r}"
            )
        if self.run_id is not None and (
            not self.run_id or not all(c.isalnum() or c in "-_." for c in self.run_id)
        ):
            raise ConfigError(f"run_id: use letters, digits, '-', '_' or '.', got {self.run_id!r}")

    @property
    def tag_options(self) -> TagOptions:
        return TagOptions(
            min_score=self.min_score, top_k=self.top_k, labels=self.labels, exclude_labels=self.exclude_labels
        )

    @property
    def actor_range(self) -> tuple[int, int] | None:
        return parse_actors(self.actors)

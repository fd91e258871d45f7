"""The training job's configuration: one validated dataclass, filled from YAML + CLI flags.

The defaults are for a real photo set: MobileNet V3-Large at the 224 px its architecture was designed
for, seed 002's augmentation, 30 epochs of AdamW. Inputs of ``SMALL_IMAGE_MAX`` (64) px or less get
``small_image_augment()`` instead (+-2 px shifts: measured, see its docstring). The model fields a user leaves unset (``None``:
``width``, ``image_size``, ``normalization``, ``dropout``) come from the architecture's registry entry
(``mlc_ray.models.arch_defaults``), so ``--model resnext50_32x4d`` alone is a valid config.

The demo's recipe (MobileNet V1 x0.5 at 96 px, light augmentation, 15 epochs) is ``DEMO_PRESET``,
written out as ``configs/demo.yaml``: ``load_train_config`` applies it under the YAML file and the
flags when no ``data`` is given anywhere, so ``python jobs/train.py`` alone still trains the demo.

Resume: Ray Train continues a run from its latest checkpoint when it is started again with the same
``run_name`` and ``storage_path``. The default ``run_name`` contains a timestamp, so a run you may
want to resume needs an explicit ``--run-name``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field

from mlc_ray.data.augment import AugmentConfig

__all__ = [
    "TrainConfig",
    "DEMO_PRESET",
    "load_train_config",
    "MiningConfig",
    "AugmentConfig",
    "light_augment",
    "small_image_augment",
    "SMALL_IMAGE_MAX",
    "OPTIMIZERS",
    "SCHEDULES",
    "LOSSES",
    "TTA_MODES",
]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle")
LOSSES = ("bce", "asl")
TTA_MODES = ("none", "10crop")
NORMALIZATIONS = ("imagenet", "per_image")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def light_augment() -> AugmentConfig:
    """Seed 002's augmentation without rotation/zoom and with gentler crops: on the demo set a crop or
    rotation that cuts a small shape out turns its label into noise (measured: macro-F1 0.83 -> 0.87
    after 14 epochs at 96 px)."""
    return AugmentConfig(crop_scale=(0.85, 1.0), degrees=0.0, translate=0.03, scale=(1.0, 1.0))


# Inputs up to this side (px) train with ``small_image_augment()`` unless the config says otherwise.
SMALL_IMAGE_MAX = 64


def small_image_augment() -> AugmentConfig:
    """The augmentation default for inputs of ``SMALL_IMAGE_MAX`` px or less: shifts of about +-2 px
    (``translate`` 0.03 of the side), no resized crop, no rotation or zoom, no colour jitter; the flip
    stays as configured (``augment.hflip=0`` for text, digits or left/right labels).

    Why (``benchmarks/quality.py``, BENCHMARKS.md "Training recipe vs a plain loop"): at 64 px the
    photo recipe (``AugmentConfig()``: crop of 70-100 % of the area at 3/4-4/3 aspect, +-10 degrees,
    zoom 0.9-1.1, jitter 0.2) resamples every image into a blurred, stretched copy and can cut a
    small object out of the frame while its label stays; the test images are sharp and whole. On
    the multi-digit set it was the largest part of the project's gap to a plain loop that shifts by
    +-2 px (see the benchmark's ablation table for the figures)."""
    return AugmentConfig(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        degrees=0.0,
        translate=0.03,
        scale=(1.0, 1.0),
    )


def default_augment(image_size: int) -> AugmentConfig:
    """The augmentation a config without an ``augment`` section gets at ``image_size``."""
    return small_image_augment() if image_size <= SMALL_IMAGE_MAX else AugmentConfig()


# The demo's recipe (configs/demo.yaml holds the same keys, written out; a unit test keeps them equal).
# Sized so that it finishes on 2 CPUs in a few minutes above macro-F1 0.90 on the demo validation split.
DEMO_PRESET: dict = {
    "data": None,
    "model": "mobilenet_v1",
    "width": 0.5,
    "image_size": 96,
    "epochs": 15,
    "batch_size": 32,
    "lr": 0.005,
    "optimizer": "adamw",
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "augment": {"crop_scale": [0.85, 1.0], "degrees": 0.0, "translate": 0.03, "scale": [1.0, 1.0]},
    "num_workers": 1,
    "calibration": "f1_max",
    "storage_path": "./runs",
}


@dataclass
class MiningConfig:
    """The ``mining:`` section of the training config (``jobs/train.py --mine`` sets ``enabled``)."""

    enabled: bool = False  # run base -> score -> mine -> fine-tune instead of one training
    strategy: str = "top_k"  # "top_k" (k hardest per label) or "band" (scores inside the confidence band)
    top_k: int = 64  # per label: this many hard positives and this many hard negatives (strategy top_k)
    band_low: float = 0.2  # strategy band: a negative scoring above this is hard
    band_high: float = 0.8  # strategy band: a positive scoring below this is hard
    include_misclassified: bool = True  # every sample with a label on the wrong side of its threshold
    rare_combination_max_frequency: float = (
        0.05  # label sets rarer than this (fraction < 1, or count) are all kept
    )
    per_label_cap: int = 30000  # at most this many hard positives+negatives per label (seed 000: 30000)
    replay_fraction: float = 0.3  # share of the not-picked (easy) training samples replayed at random
    seed: int = 0  # replay sampling
    fine_tune_epochs: int = 5  # epochs of stage (c)
    fine_tune_lr: float | None = None  # learning rate of stage (c); None = the base run's lr / 5
    score_batch_size: int = 64  # stage (b) batch size
    tta: str = "none"  # stage (b) test-time augmentation: "none" or "10crop"
    report_combinations: int = 5  # how many of the rarest label combinations the report lists
    control: bool = True  # also fine-tune on a random subset of the mined set's size (the control)
    holdout_fraction: float = 0.5  # share of the val split held out for the report (no stage sees it)

    def __post_init__(self) -> None:
        if self.strategy not in ("top_k", "band"):
            raise ValueError(f"mining.strategy must be 'top_k' or 'band', got '{self.strategy}'")
        if self.top_k < 0:
            raise ValueError(f"mining.top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.band_low <= 1.0 or not 0.0 <= self.band_high <= 1.0:
            raise ValueError(
                f"mining.band_low/band_high must be in [0, 1], got {self.band_low}, {self.band_high}"
            )
        if self.rare_combination_max_frequency < 0:
            raise ValueError(
                f"mining.rare_combination_max_frequency must be >= 0 (0 turns the rule off), "
                f"got {self.rare_combination_max_frequency}"
            )
        if self.per_label_cap < 1:
            raise ValueError(f"mining.per_label_cap must be >= 1, got {self.per_label_cap}")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"mining.replay_fraction must be in [0, 1], got {self.replay_fraction}")
        if self.fine_tune_epochs < 1:
            raise ValueError(f"mining.fine_tune_epochs must be >= 1, got {self.fine_tune_epochs}")
        if self.fine_tune_lr is not None and self.fine_tune_lr <= 0:
            raise ValueError(
                f"mining.fine_tune_lr must be > 0 (or null for base lr / 5), got {self.fine_tune_lr}"
            )
        if self.score_batch_size < 1:
            raise ValueError(f"mining.score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.tta not in ("none", "10crop"):
            raise ValueError(f"mining.tta must be 'none' or '10crop', got '{self.tta}'")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"mining.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.report_combinations < 1:
            raise ValueError(f"mining.report_combinations must be >= 1, got {self.report_combinations}")


@dataclass
class TrainConfig:
    """Everything one training job needs; ``__post_init__`` rejects values that cannot work."""

    # -- data
    data: str | None = None  # manifest URI (local or s3://); None = the built-in demo set (./data/demo)
    val_data: str | None = None  # validation manifest; None = the manifest's `split` column, else a split
    val_fraction: float = 0.2  # share of `data` held out for validation when neither of the above says
    labels: str | None = None  # labels.txt URI (vocabulary order); None = labels.txt beside the manifest
    max_error_rate: float = 0.01  # fail the run when more than this share of images cannot be decoded
    # -- model
    model: str = "mobilenet_v3_large"  # a name from mlc_ray.models.list_models()
    width: float | None = None  # None = the arch's own; only mobilenet_v1/v2 take a multiplier (alpha)
    dropout: float | None = None  # dropout before the final linear layer; None = the arch's (0.2)
    image_size: int | None = None  # model input side in pixels; None = the arch's (224 for all)
    normalization: str | None = None  # "imagenet" mean/std or "per_image" (seed 000); None = the arch's
    pretrained: str | None = (
        None  # backbone state-dict file to start from (torchvision layout ok); no download
    )
    init_from: str | None = None  # a model bundle dir or training checkpoint to fine-tune from (mining)
    # -- optimisation
    epochs: int = 30  # passes over the training set (a few thousand photos; fine-tuning needs fewer)
    batch_size: int = 64  # global batch size, split evenly over the workers
    lr: float = 1e-3  # peak learning rate (after warm-up); AdamW's usual for batch 64
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9, nesterov)
    weight_decay: float = 1e-4  # decoupled for AdamW, L2 for SGD; not applied to norms and biases
    schedule: str = "cosine"  # "cosine" (linear warm-up then cosine to 0) or "onecycle"
    warmup_epochs: float = 1.0  # linear warm-up length (cosine); onecycle's rising phase
    ema: bool = False  # keep an exponential moving average of the weights; evaluate and ship it
    ema_decay: float = 0.998  # EMA decay per optimiser step
    label_smoothing: float = 0.0  # seed 000: targets become y*(1-e) + e/num_labels
    loss: str = "bce"  # "bce" (BCE with logits) or "asl" (asymmetric loss)
    asl_gamma_neg: float = 4.0  # ASL focusing exponent for negatives (loss=asl only)
    asl_gamma_pos: float = 0.0  # ASL focusing exponent for positives (loss=asl only)
    asl_clip: float = 0.05  # ASL probability shift for negatives, in [0, 1) (loss=asl only)
    pos_weight: bool = False  # up-weight rare labels' positives by negatives/positives (clipped at 10)
    seed: int = 0  # model init, data split, augmentation
    # training augmentation; None = by input size (``default_augment``): seed 002's (AugmentConfig())
    # above SMALL_IMAGE_MAX px, small_image_augment() at or below it; both flip with p 0.5 (set
    # augment.hflip=0 for text, digits or left/right labels). A partial `augment:` section (YAML,
    # --set augment.KEY=...) starts from that size's default (load_train_config)
    augment: AugmentConfig | None = None
    # -- hardware
    num_workers: int = 1  # Ray Train workers (one process each, DDP)
    use_gpu: bool = False  # one GPU per worker; AMP (bf16, else fp16 + scaler) and channels-last
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    cpus_per_worker: float | None = None  # None: 1 on GPU, on CPU what leaves >= 1 CPU for data decoding
    # -- evaluation
    calibration: str = "f1_max"  # per-label threshold method (mlc_ray.calibrate.METHODS)
    tta: str = "none"  # final evaluation: "none" or "10crop" (corners, centre and mirrors; mean)
    # -- bookkeeping
    experiment: str = "mlc_ray-train"  # MLflow experiment
    register_as: str | None = None  # register the bundle as this MLflow model name (alias challenger)
    storage_path: str = "./runs"  # Ray Train checkpoints: local dir or s3://bucket/prefix
    run_name: str | None = None  # None = "<model>-<UTC timestamp>"; resuming needs the same explicit name
    max_failures: int = 1  # worker failures Ray Train recovers from (restarting from the last checkpoint)
    keep_checkpoints: int = 2  # checkpoints kept: the best K by val mAP (the latest is always kept too)
    output: str | None = None  # model bundle dir; None = <storage_path>/<run_name>/model
    mining: MiningConfig = field(default_factory=MiningConfig)  # hard-sample mining (--mine)
    # starting an existing run_name again with another fingerprint (data, model, image size, labels,
    # loss, ...) is an error; true resumes it anyway (the checkpoint must still fit the model)
    resume_changed: bool = False

    def __post_init__(self) -> None:
        from mlc_ray.calibrate import parse_method
        from mlc_ray.models import arch_defaults

        try:
            arch = arch_defaults(self.model)
        except ValueError as exc:  # unknown model: the message lists the known ones
            raise ValueError(f"model: {exc}") from None
        for name, value in (
            ("width", arch.width),
            ("dropout", arch.dropout),
            ("image_size", arch.input_size),
            ("normalization", arch.normalization),
        ):
            if getattr(self, name) is None:
                setattr(self, name, value)

        if self.augment is None:
            self.augment = default_augment(int(self.image_size))

        def positive(name: str) -> None:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

        for name in ("width", "image_size", "epochs", "batch_size", "lr", "num_workers", "ema_decay"):
            positive(name)
        try:
            arch.check_width(self.model, self.width)
        except ValueError as exc:
            raise ValueError(f"width: {exc}") from None
        arch.check_input_size(self.model, self.image_size)
        if self.batch_size < self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch: it must be >= num_workers ({self.num_workers})"
            )
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} must divide evenly over num_workers {self.num_workers} "
                f"(try {self.batch_size - self.batch_size % self.num_workers})"
            )
        for name, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("loss", self.loss, LOSSES),
            ("tta", self.tta, TTA_MODES),
            ("normalization", self.normalization, NORMALIZATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got '{value}'")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.asl_gamma_neg < 0 or self.asl_gamma_pos < 0:
            raise ValueError(
                f"asl_gamma_neg and asl_gamma_pos must be >= 0, got {self.asl_gamma_neg}, {self.asl_gamma_pos}"
            )
        if not 0 <= self.asl_clip < 1:
            raise ValueError(f"asl_clip must be in [0, 1), got {self.asl_clip}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs <= self.epochs:  # equal: the whole (short) run is warm-up
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= 0 (or -1 for unlimited), got {self.max_failures}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(
                f"cpus_per_worker must be > 0 (or null for automatic), got {self.cpus_per_worker}"
            )
        parse_method(self.calibration)  # ValueError naming the method and the known ones
        if self.run_name is None:
            self.run_name = f"{self.model}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        if not _RUN_NAME.match(self.run_name):
            raise ValueError(
                f"run_name '{self.run_name}' may only hold letters, digits, '.', '_' and '-' "
                "(it names a folder under storage_path)"
            )
        if not self.storage_path:
            raise ValueError("storage_path must not be empty (a local dir or s3://bucket/prefix)")
        # Local paths become absolute here, once: Ray Train workers do not run in the driver's working
        # directory, and checkpoints, bundles and init_from must mean the same folder everywhere.
        from mlc_ray import storage

        for name in ("storage_path", "output", "init_from", "pretrained"):
            value = getattr(self, name)
            if value and not storage.is_s3(str(value)):
                try:  # a misspelt scheme (s3:/b, S3://b, gs://b) is an error, not a local folder "s3:"
                    setattr(self, name, storage.absolute(os.path.expanduser(str(value))))
                except storage.InvalidURIError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if not self.experiment:
            raise ValueError("experiment must not be empty")

    @property
    def run_dir(self) -> str:
        """Where Ray Train keeps this run's checkpoints: ``<storage_path>/<run_name>``."""
        from mlc_ray import storage

        return storage.join(self.storage_path, str(self.run_name))

    @property
    def bundle_dir(self) -> str:
        """Where the final model bundle goes (``output`` or ``<storage_path>/<run_name>/model``)."""
        from mlc_ray import storage

        return self.output or storage.join(self.run_dir, "model")

    def preprocess_config(self):  # -> mlc_ray.data.images.PreprocessConfig
        """How pixels reach the model: this config's size and normalisation, the arch's mean/std."""
        from mlc_ray.data.images import PreprocessConfig
        from mlc_ray.models import arch_defaults

        arch = arch_defaults(self.model)
        return PreprocessConfig(
            image_size=int(self.image_size),
            normalization=str(self.normalization),
            mean=arch.mean,
            std=arch.std,
        )

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    def replace(self, **changes: object) -> TrainConfig:
        """A copy with ``changes`` applied and validated (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def load_train_config(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < the demo preset (only when no ``data`` is given anywhere) < YAML file < flags."""
    from mlc_ray.config import config_from_dict, merged_config_data

    data = merged_config_data(path, overrides)
    if data.get("data") is None:
        data = merged_config_data(path, overrides, base=DEMO_PRESET)
    section = data.get("augment")
    if isinstance(section, dict):  # a partial section starts from the size's default, not the photo one
        data["augment"] = {**_augment_base(data), **section}
    return config_from_dict(TrainConfig, data)


def _augment_base(data: dict) -> dict:
    """``default_augment`` of the image size ``data`` resolves to (the arch's when unset), as a dict."""
    from mlc_ray.models import arch_defaults

    size = data.get("image_size")
    if size is None:
        try:
            size = arch_defaults(str(data.get("model") or TrainConfig.model)).input_size
        except ValueError:
            return {}  # an unknown model: TrainConfig names it
    try:
        size = int(size)
    except (TypeError, ValueError):
        return {}  # a bad size: TrainConfig names it
    return dataclasses.asdict(default_augment(size))

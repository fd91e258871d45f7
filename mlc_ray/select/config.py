"""What a labelling-queue selection is given and what it returns (``SelectConfig``, ``QueueRow``,
``QueueResult``); how the queue is picked: the package docstring (``mlc_ray/select/__init__.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlc_ray.errors import ConfigError

__all__ = [
    "DEFAULT_MIX",
    "QUEUE_COLUMNS",
    "REASONS",
    "UNCERTAINTY_RULES",
    "QueueResult",
    "QueueRow",
    "SelectConfig",
    "parse_mix",
]

REASONS = ("uncertainty", "disagreement", "rare_combination", "random")
UNCERTAINTY_RULES = ("label_set", "label")
QUEUE_COLUMNS = ("image", "labels", "reason", "score", "label", "source_etag", "model_version", "run_id")
DEFAULT_MIX = "uncertainty:0.6,disagreement:0.2,rare_combination:0.2"


def parse_mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition(":")
        name = name.strip()
        if name == "rare":
            name = "rare_combination"
        if name not in REASONS or not sep:
            raise ConfigError(
                f"mix: expected REASON:SHARE[,REASON:SHARE...] with REASON one of {', '.join(REASONS)}, "
                f"got {part!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise ConfigError(f"mix: share of {name} must be a number, got {value!r}") from None
        if not share >= 0 or not math.isfinite(share):
            raise ConfigError(f"mix: share of {name} must be >= 0, got {value!r}")
        out[name] = share
    if not out or sum(out.values()) <= 0:
        raise ConfigError(f"mix: give at least one reason with a share > 0, got {text!r}")
    return out


@dataclass
class SelectConfig:
    """One labelling-queue selection (``jobs/select_queue.py``); YAML keys = field names."""

    table: str | None = None  # tag table root (s3:// or local): what jobs/tag.py --output wrote
    budget: int = 500  # rows in the queue (images to label)
    # the queue manifest (.csv / .jsonl / .parquet), labels.txt beside it; "{date}" = today (UTC), for
    # a scheduled job that keeps each week's queue
    out: str = "queue.csv"
    run: str | None = None  # only rows of this run id (default: every run, latest row per image)
    version: str | None = None  # only rows of this model version
    compare: str | None = (
        None  # a second tag table for disagreement (default: `table`, with compare_run/_version)
    )
    compare_run: str | None = None  # the second source's run id
    compare_version: str | None = None  # the second source's model version
    mix: str = DEFAULT_MIX  # budget share per reason; a reason without candidates passes its share on
    label_quota: int | None = None  # most rows one label may take; None = 2 x budget / number of labels
    rare_fraction: float = 0.02  # a label combination is rare when at most this fraction of images has it
    # uncertainty ranking: "label_set" = images by the chance that any label's decision is wrong;
    # "label" = each label's scores by their logit distance to its threshold (round-robin over labels)
    uncertainty_rule: str = "label_set"
    # logits of distance to the threshold per e-fold of a decision's chance of being wrong (label_set
    # rule): smaller = one very close label outranks several fairly close ones. 1.0 = the logit
    # distance read as is; 0.25-4 measured alike on the demo's tuning pool (BENCHMARKS.md
    # "Labelling queue: is it worth labelling?")
    uncertainty_temperature: float = 1.0
    thresholds: str | None = None  # thresholds.json, bundle dir or models:/ URI (default: found per row)
    seed: int = 0  # the random share's sample
    batch_size: int = 65_536  # rows per scanned batch (the memory of one step)

    def __post_init__(self) -> None:
        if not self.table:
            raise ConfigError("table: give the tag table's root (what jobs/tag.py --output wrote)")
        for name, low in (("budget", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.label_quota is not None and (
            isinstance(self.label_quota, bool)
            or not isinstance(self.label_quota, int)
            or self.label_quota < 1
        ):
            raise ConfigError(f"label_quota: expected an integer >= 1, got {self.label_quota!r}")
        if self.uncertainty_rule not in UNCERTAINTY_RULES:
            raise ConfigError(
                f"uncertainty_rule: expected one of {', '.join(UNCERTAINTY_RULES)}, got {self.uncertainty_rule!r}"
            )
        t = self.uncertainty_temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and t > 0):
            raise ConfigError(f"uncertainty_temperature: expected a number > 0, got {t!r}")
        if not 0.0 < float(self.rare_fraction) <= 1.0:
            raise ConfigError(f"rare_fraction: expected a fraction in (0, 1], got {self.rare_fraction!r}")
        if not self.out or not str(self.out).lower().endswith((".csv", ".jsonl", ".parquet")):
            raise ConfigError(
                f"out: the queue is a manifest file ending in .csv, .jsonl or .parquet, got {self.out!r}"
            )
        self.shares  # noqa: B018 - validates mix

    @property
    def shares(self) -> dict[str, float]:
        return parse_mix(self.mix)

    @property
    def out_uri(self) -> str:
        from datetime import UTC, datetime

        return self.out.replace("{date}", datetime.now(UTC).strftime("%Y-%m-%d"))

    @property
    def has_compare(self) -> bool:
        return bool(self.compare or self.compare_run or self.compare_version)


@dataclass
class QueueRow:
    key: int  # hash of the image's identity (source_etag, else URI)
    image: str
    labels: list[str]
    reason: str
    score: float  # uncertainty: the chance the label set is wrong ("label_set" rule) or the label's
    # score ("label" rule); disagreement: largest |score difference|;
    # rare_combination: the combination's share of images; random: the image's sample key
    label: str  # the label (or combination) it was picked for
    source_etag: str | None
    model_version: str | None
    run_id: str | None


@dataclass
class QueueResult:
    out: str
    rows: list[QueueRow]
    labels: list[str]
    rows_scanned: int = 0
    images: int = 0  # distinct images (latest row each)
    compared: int = 0  # images both sources tagged
    rare_combinations: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_label: dict[str, int] = field(default_factory=dict)
    label_quota: int = 0
    wall_s: float = 0.0

    def format(self) -> str:
        lines = [
            f"queue      {self.out}: {len(self.rows)} images",
            f"scanned    {self.rows_scanned} rows, {self.images} distinct images (latest row each)"
            + (f", {self.compared} tagged by both sources" if self.compared else ""),
            "by reason  " + (", ".join(f"{k} {v}" for k, v in self.by_reason.items()) or "-"),
            f"by label   (quota {self.label_quota}) "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.by_label.items(), key=lambda kv: -kv[1])) or "-"),
            f"wall       {self.wall_s:.1f} s",
        ]
        return "\n".join(lines)

"""What one promotion's shadow comparison is given (``ShadowConfig``) and the names it writes under."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlc_ray.config import ConfigError

__all__ = ["ShadowConfig", "PROMOTION_EXPERIMENT", "SHEET_IMAGES", "SHEET_COLUMNS", "TAG_PREFIX"]


PROMOTION_EXPERIMENT = "promotion"
SHEET_IMAGES = 16  # images on the disagreement contact sheet
SHEET_COLUMNS = 4
TAG_PREFIX = "promotion.shadow"


@dataclass
class ShadowConfig:
    """The shadow comparison of one promotion (``jobs/promote.py --shadow ...``)."""

    input: str  # prefix (s3:// or local) or manifest of unlabelled images
    sample: int = 500  # images tagged by both models
    seed: int = 0  # the sample's seed: same seed and keys -> same sample
    max_rate_change: float | None = None  # hold when a label's |relative rate change| exceeds this
    min_count: int = 10  # ... and either model lists the label at least this often in the sample
    force: bool = False  # promote despite a hold (the report and tags say so)
    output: str | None = None  # keep the tag table + report here (default: a temporary dir)
    batch_size: int = 32
    actors: str | None = None  # passed to run_tagging (None: from the cluster's CPUs)

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError(
                "--shadow: give a prefix (s3://bucket/incoming/) or a manifest of unlabelled images"
            )
        if isinstance(self.sample, bool) or not isinstance(self.sample, int) or self.sample < 1:
            raise ConfigError(f"--shadow-sample: expected an integer >= 1, got {self.sample!r}")
        if self.max_rate_change is not None and not (
            math.isfinite(self.max_rate_change) and self.max_rate_change > 0
        ):
            raise ConfigError(
                f"--max-rate-change: expected a relative change > 0 (e.g. 0.5 = a label's rate may move "
                f"by half), got {self.max_rate_change!r}"
            )
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise ConfigError(f"--shadow-min-count: expected an integer >= 1, got {self.min_count!r}")

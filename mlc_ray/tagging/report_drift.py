"""Drift: each label's rate in a tagging run against its rate on the model's validation set.

Training records each label's predicted-positive rate on the validation set (``label_rates.json``
in the bundle, ``report_stats.expected_label_rates``). ``drift_rows`` compares a run's rate per
label with it: the ratio, a pooled two-proportion z-test, and a minimum count below which a label is
"too few to tell". A label *moved* when the test is significant (p < ``DRIFT_P_VALUE``); with
``--drift-alert X`` a moved label whose ratio is outside [1/X, X] is an alert (the job exits 3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from mlc_ray.tagging.report_stats import LABEL_RATES_FILE

__all__ = ["DRIFT_P_VALUE", "DRIFT_MIN_COUNT", "load_expectation", "DriftRow", "drift_rows"]

log = logging.getLogger(__name__)

DRIFT_P_VALUE = 0.01  # a label moved when the two-proportion test says p below this
DRIFT_MIN_COUNT = 10  # ... and at least this many positives were expected or seen in the run


def load_expectation(local_dir: str, labels: Sequence[str]) -> dict | None:
    """The bundle's ``label_rates.json``, or None (older bundles, or one for other labels)."""
    from mlc_ray.bundle import ModelBundle

    bundle = ModelBundle(local_dir)
    data = bundle.label_rates()
    if data is None:
        return None
    if list(data.get("labels", [])) != list(labels) or int(data.get("images", 0)) < 1:
        log.warning("%s: labels differ from the model's or no images: drift not available", LABEL_RATES_FILE)
        return None
    return data


@dataclass
class DriftRow:
    label: str
    expected_rate: float | None  # None: the bundle records no expectation
    expected_positives: int
    expected_images: int
    rate: float
    positives: int
    images: int
    ratio: float | None
    z: float | None
    p_value: float | None
    status: str  # "ok" | "moved" | "too few" | "not available"
    alert: bool = False

    def to_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()
        }


def _two_proportion(x0: int, n0: int, x1: int, n1: int) -> tuple[float, float]:
    """Pooled two-proportion z-test: (z, two-sided p-value)."""
    p = (x0 + x1) / (n0 + n1)
    se = math.sqrt(p * (1 - p) * (1 / n0 + 1 / n1)) if 0 < p < 1 else 0.0
    if se == 0.0:
        return 0.0, 1.0
    z = (x1 / n1 - x0 / n0) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def drift_rows(
    labels: Sequence[str],
    positives: Sequence[int],
    images: int,
    expectation: dict | None,
    *,
    allowed: Sequence[bool] | None = None,
    alert: float | None = None,
    min_count: int = DRIFT_MIN_COUNT,
    p_value: float = DRIFT_P_VALUE,
) -> list[DriftRow]:
    """One row per listed label: this run's rate against the model's validation rate."""
    out = []
    for j, label in enumerate(labels):
        if allowed is not None and not allowed[j]:
            continue
        x1 = int(positives[j])
        rate = x1 / images if images else 0.0
        if expectation is None or images == 0:
            out.append(DriftRow(label, None, 0, 0, rate, x1, images, None, None, None, "not available"))
            continue
        n0, x0 = int(expectation["images"]), int(expectation["positives"][j])
        r0 = x0 / n0
        ratio = rate / r0 if r0 > 0 else (math.inf if x1 else 1.0)
        z, p = _two_proportion(x0, n0, x1, images)
        enough = max(images * r0, x1) >= min_count
        status = ("moved" if p < p_value else "ok") if enough else "too few"
        flag = bool(alert is not None and status == "moved" and not (1.0 / alert <= ratio <= alert))
        out.append(DriftRow(label, r0, x0, n0, rate, x1, images, ratio, z, p, status, flag))
    return out

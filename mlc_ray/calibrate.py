"""Per-label decision thresholds, fitted on validation scores and shipped as ``thresholds.json``.

A multi-label tagger outputs one sigmoid score per label; a single 0.5 cut is rarely right for every
label (rare labels score low, frequent ones high). Seed 003 picks, per label, the point of the ROC
curve nearest to (FPR 0, TPR 1). This module offers that rule and three others:

``roc_closest``
    The seed's rule: ``sklearn.metrics.roc_curve`` on the label's scores (every point, no
    intermediate points dropped) and the threshold of the point nearest (FPR 0, TPR 1).
``f1_max``
    The threshold maximising the label's F1 on the data (ties: the highest such threshold).
``precision_at:P``
    The lowest threshold whose precision on the data is >= P (few false tags). A label where no
    threshold reaches P keeps the fallback and is reported.
``fixed:T``
    T for every label.

Every threshold is applied as ``score >= threshold`` (``Thresholds.apply``). ``f1_max`` and
``precision_at`` pick a *distinct score* s of the label and place the threshold at the midpoint
between s and the next lower distinct score (at s itself if s is the lowest score, or if the two
scores are so close that their midpoint rounds onto the lower one). Both choices predict exactly the
same samples on the fitting data, so applying the saved threshold reproduces the F1 / precision that
was measured; the midpoint only leaves a margin for unseen scores (and float32 rounding downstream).
Scores within ``SCORE_RESOLUTION`` (1e-6) of each other count as one score: the exported graphs score
within ~1e-7 of torch, so a threshold between such scores would decide by rounding.

A label with no positives, no negatives, or constant scores (every score within ``SCORE_RESOLUTION``:
what a collapsed model gives) cannot be calibrated: it keeps the
fallback threshold and is listed in ``Thresholds.fallback_labels`` with the reason.

**Honest calibrated metrics.** A threshold fitted on some scores and measured on the same scores
reports an F1 that is guaranteed by construction. ``cross_fit_thresholds`` splits the validation
rows into K seeded folds, fits on K-1 and applies those thresholds to the held-out fold, so every
row is judged by thresholds fitted without it (``CrossFit.row_thresholds``); the calibrated metrics
that training reports come from those. The thresholds that ship are fitted on all validation rows.

``thresholds.json`` is canonical JSON (sorted keys, Python's shortest round-trip float repr) and
carries ``sha256``: the SHA-256 of the compact canonical JSON of every other field. ``load``
recomputes it, so an edited or corrupted file is refused instead of silently changing the tags.

Why ~450 lines: one responsibility (per-label thresholds): the fitting methods, cross-fitting, and
the ``Thresholds`` file format that training writes and tagging reads; each part is small and they
change together when a method is added.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "METHODS",
    "CrossFit",
    "Thresholds",
    "calibrate_thresholds",
    "cross_fit_thresholds",
    "parse_method",
]

log = logging.getLogger(__name__)

METHODS = ("roc_closest", "f1_max", "precision_at:P", "fixed:T")
FORMAT_VERSION = 1


def parse_method(method: str) -> tuple[str, float | None]:
    """``"precision_at:0.9"`` -> ``("precision_at", 0.9)``; ValueError with the accepted forms otherwise."""
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"calibration method must be a non-empty string, one of {', '.join(METHODS)}")
    name, sep, arg = method.strip().partition(":")
    name = name.strip()
    if name in ("roc_closest", "f1_max"):
        if sep:
            raise ValueError(f"calibration method '{method}': '{name}' takes no ':' argument")
        return name, None
    if name in ("precision_at", "fixed"):
        if not sep or not arg.strip():
            example = "precision_at:0.9" if name == "precision_at" else "fixed:0.5"
            raise ValueError(f"calibration method '{method}': '{name}' needs a value, e.g. '{example}'")
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"calibration method '{method}': '{arg}' is not a number") from None
        if name == "precision_at" and not 0.0 < value <= 1.0:
            raise ValueError(f"calibration method '{method}': precision must be in (0, 1], got {value}")
        if name == "fixed" and not 0.0 <= value <= 1.0:
            raise ValueError(f"calibration method '{method}': threshold must be in [0, 1], got {value}")
        return name, value
    raise ValueError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")


def _canonical_float(value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"threshold {value} is not a finite number")
    return value + 0.0  # -0.0 -> 0.0, so equal thresholds always serialise the same way


@dataclass
class Thresholds:
    """One threshold per label (model output order) and how it was chosen.

    ``support`` is per label ``{"positives": int, "negatives": int}`` on the calibration data;
    ``fallback_labels`` maps each label that kept the fallback threshold to the reason.
    """

    labels: list[str]
    values: list[float]
    method: str
    support: list[dict[str, int]] = field(default_factory=list)
    fallback_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = [str(x) for x in self.labels]
        self.values = [_canonical_float(v) for v in self.values]
        if len(self.values) != len(self.labels):
            raise ValueError(f"thresholds: {len(self.values)} values for {len(self.labels)} labels")
        if len(set(self.labels)) != len(self.labels):
            dupes = sorted({x for x in self.labels if self.labels.count(x) > 1})
            raise ValueError(f"thresholds: duplicate labels {dupes}")
        support: list[dict[str, int]] = []
        for entry in self.support or []:
            # A bare count is read as the number of positives (support's usual meaning).
            if isinstance(entry, Mapping):
                support.append({str(k): int(v) for k, v in entry.items()})
            else:
                support.append({"positives": int(entry)})
        if support and len(support) != len(self.labels):
            raise ValueError(f"thresholds: support has {len(support)} entries for {len(self.labels)} labels")
        self.support = support
        if isinstance(self.fallback_labels, Mapping):
            fallback = {str(k): str(v) for k, v in self.fallback_labels.items()}
        else:
            fallback = {str(k): "fallback" for k in self.fallback_labels or []}
        unknown = sorted(set(fallback) - set(self.labels))
        if unknown:
            raise ValueError(f"thresholds: fallback_labels {unknown} are not among the labels")
        self.fallback_labels = fallback

    # ---- serialisation -------------------------------------------------------------------------

    def _content(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "labels": list(self.labels),
            "thresholds": list(self.values),
            "method": self.method,
            "support": [dict(sorted(s.items())) for s in self.support],
            "fallback_labels": dict(sorted(self.fallback_labels.items())),
        }

    @staticmethod
    def _digest(content: Mapping[str, Any]) -> str:
        canonical = json.dumps(
            content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical content (everything in thresholds.json but the sha256 itself)."""
        return self._digest(self._content())

    def to_dict(self) -> dict[str, Any]:
        content = self._content()
        content["sha256"] = self._digest(content)
        return content

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"

    def save(self, uri: str) -> None:
        """Write thresholds.json atomically (local path or s3://)."""
        from mlc_ray import storage

        storage.write_text(uri, self.to_json())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "thresholds") -> Thresholds:
        """Build from a parsed thresholds.json; ValueError naming ``source`` if sha256 or fields are wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        content = dict(data)
        recorded = content.pop("sha256", None)
        if recorded is None:
            raise ValueError(f"{source}: no 'sha256' field; regenerate it with mlc_ray.calibrate")
        actual = cls._digest(content)
        if actual != recorded:
            raise ValueError(
                f"{source}: sha256 mismatch (file says {recorded[:12]}..., content hashes to {actual[:12]}...); "
                "the file was edited or corrupted: restore it from the model version or recalibrate"
            )
        missing = [k for k in ("labels", "thresholds", "method") if k not in content]
        if missing:
            raise ValueError(f"{source}: missing fields {missing}")
        version = content.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version} is not supported (expected {FORMAT_VERSION})"
            )
        return cls(
            labels=list(content["labels"]),
            values=list(content["thresholds"]),
            method=str(content["method"]),
            support=list(content.get("support", [])),
            fallback_labels=dict(content.get("fallback_labels", {})),
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "thresholds") -> Thresholds:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, uri: str) -> Thresholds:
        """Read and verify a thresholds.json (local path or s3://)."""
        from mlc_ray import storage

        return cls.from_json(storage.read_text(uri), source=str(uri))

    # ---- use -----------------------------------------------------------------------------------

    def as_array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Boolean (N, L): ``scores >= threshold`` per label (columns in ``labels`` order)."""
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[1] != len(self.labels):
            raise ValueError(f"scores of shape {scores.shape} do not match {len(self.labels)} labels")
        return scores.astype(np.float64, copy=False) >= self.as_array()[None, :]

    def summary(self) -> str:
        """A short table for logs: label, threshold, support, fallback reason."""
        rows = [f"{'label':<24} {'threshold':>9} {'pos':>6} {'neg':>6}  note", "-" * 60]
        for i, label in enumerate(self.labels):
            sup = self.support[i] if self.support else {}
            rows.append(
                f"{label[:24]:<24} {self.values[i]:>9.4f} {sup.get('positives', ''):>6} "
                f"{sup.get('negatives', ''):>6}  {self.fallback_labels.get(label, '')}"
            )
        return "\n".join(rows)


# ---- per-label fitting ---------------------------------------------------------------------------


# Scores closer than this are one score to tagging: the exported graphs score within ~1e-7 of torch
# (export parity: 3e-8 to 6e-8 measured for ONNX fp32 and ncnn) and float32 steps by 3e-8 near 0.5,
# so a threshold placed between two such scores picks images by rounding, not by the model. A label
# whose validation scores all lie within it (a collapsed model scores every image alike) is a label
# with constant scores.
SCORE_RESOLUTION = 1e-6


def _cumulative_counts(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal scores (descending): each run's (lowest, highest) score and TP/FP when predicting
    ``score >= its lowest``. Scores within ``SCORE_RESOLUTION`` of the next are one run."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    yy = y[order]
    tp = np.cumsum(yy)
    fp = np.cumsum(1 - yy)
    # the last index of each run: predictions there include every score of the run
    last = np.r_[np.flatnonzero(s[:-1] - s[1:] > SCORE_RESOLUTION), s.size - 1]
    first = np.r_[0, last[:-1] + 1]
    return np.stack([s[last], s[first]], axis=1), tp[last], fp[last]


def _place(runs: np.ndarray, k: int) -> float:
    """Threshold between run k's lowest score and run k+1's highest; keeps the same predictions."""
    upper = float(runs[k, 0])
    if k + 1 >= len(runs):
        return upper
    lower = float(runs[k + 1, 1])
    mid = (upper + lower) / 2.0
    return mid if lower < mid <= upper else upper


def _f1_max(scores: np.ndarray, y: np.ndarray) -> float:
    runs, tp, fp = _cumulative_counts(scores, y)
    positives = int(y.sum())
    f1 = 2.0 * tp / (tp + fp + positives)  # = 2TP / (2TP + FP + FN)
    k = int(np.argmax(f1))  # first maximum in descending-score order: the highest such threshold
    return _place(runs, k)


def _precision_at(scores: np.ndarray, y: np.ndarray, target: float) -> tuple[float | None, float]:
    runs, tp, fp = _cumulative_counts(scores, y)
    precision = tp / (tp + fp)
    # compare with a hair of tolerance so exactly-reached fractions (9/10 for 0.9) count
    ok = np.flatnonzero(precision >= target - 1e-12)
    if ok.size == 0:
        return None, float(precision.max())
    return _place(runs, int(ok[-1])), float(precision.max())


def _roc_closest(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, scores, drop_intermediate=False)
    finite = np.isfinite(thr)  # the first point is (0, 0) at threshold +inf: never a useful cut
    dist = np.where(finite, fpr**2 + (1.0 - tpr) ** 2, np.inf)
    return float(thr[int(np.argmin(dist))])


def calibrate_thresholds(
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    method: str = "f1_max",
    fallback: float = 0.5,
) -> Thresholds:
    """Fit one threshold per label on (N, L) scores and 0/1 targets; see the module docstring."""
    name, arg = parse_method(method)
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    labels = [str(x) for x in labels]
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, L)")
    if scores.shape[1] != len(labels):
        raise ValueError(f"scores have {scores.shape[1]} columns but {len(labels)} labels were given")
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise ValueError(
            f"scores contain NaN/inf (first at row {bad[0]}, label '{labels[bad[1]]}'); drop failed rows"
        )
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1 (multi-hot)")
    if not 0.0 <= fallback <= 1.0:
        raise ValueError(f"fallback threshold must be in [0, 1], got {fallback}")
    y_all = targets.astype(np.int64)

    values: list[float] = []
    support: list[dict[str, int]] = []
    fallbacks: dict[str, str] = {}
    for j, label in enumerate(labels):
        s, y = scores[:, j], y_all[:, j]
        pos = int(y.sum())
        neg = int(y.size - pos)
        support.append({"positives": pos, "negatives": neg})
        if name == "fixed":
            values.append(float(arg))
            continue
        reason = None
        if pos == 0:
            reason = "no positives"
        elif neg == 0:
            reason = "no negatives"
        elif s.min() == s.max():
            reason = "constant scores"
        elif float(s.max() - s.min()) <= SCORE_RESOLUTION:
            reason = f"constant scores: all within {float(s.max() - s.min()):.1g}"
        if reason is not None:
            fallbacks[label] = reason
            values.append(float(fallback))
            continue
        if name == "roc_closest":
            values.append(_roc_closest(s, y))
        elif name == "f1_max":
            values.append(_f1_max(s, y))
        else:  # precision_at
            value, best = _precision_at(s, y, float(arg))
            if value is None:
                fallbacks[label] = f"precision {arg} unreachable (best {best:.4f})"
                values.append(float(fallback))
            else:
                values.append(value)
    if fallbacks:
        log.warning(
            "calibration %s: %d label(s) keep the fallback threshold %.3f: %s",
            method,
            len(fallbacks),
            fallback,
            ", ".join(f"{k} ({v})" for k, v in list(fallbacks.items())[:20]),
        )
    canonical_method = name if arg is None else f"{name}:{arg:g}"
    return Thresholds(
        labels=labels, values=values, method=canonical_method, support=support, fallback_labels=fallbacks
    )


DEFAULT_FOLDS = 5


@dataclass
class CrossFit:
    """Thresholds fitted on all rows (what ships) and, per row, the thresholds of the K-1 other folds."""

    thresholds: Thresholds  # fitted on every row: thresholds.json
    row_thresholds: np.ndarray  # (N, L) float64: row i's thresholds, fitted on the folds without row i
    fold_of_row: np.ndarray  # (N,) int: the fold each row was held out in
    folds: int

    @property
    def description(self) -> str:
        return (
            f"thresholds fitted on {self.folds - 1} of {self.folds} folds of the validation rows, "
            "each fold scored with the thresholds of the others (cross-fitted)"
        )


def cross_fit_thresholds(
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    method: str = "f1_max",
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    fallback: float = 0.5,
) -> CrossFit:
    """K-fold cross-fitting of ``calibrate_thresholds``; see "Honest calibrated metrics" above.

    ``folds`` is lowered to the number of rows when there are fewer; at least 2 rows are needed.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    full = calibrate_thresholds(scores, targets, labels, method=method, fallback=fallback)
    n = scores.shape[0]
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if n < 2:
        raise ValueError(f"cross-fitting thresholds needs at least 2 validation rows, got {n}")
    k = min(folds, n)
    fold_of_row = np.empty(n, dtype=np.int64)
    fold_of_row[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    row_thresholds = np.empty(scores.shape, dtype=np.float64)
    quiet = logging.getLogger(__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the fallback warning per fold repeats the one of the full fit
    try:
        for f in range(k):
            held_out = fold_of_row == f
            fitted = calibrate_thresholds(
                scores[~held_out], targets[~held_out], labels, method=method, fallback=fallback
            )
            row_thresholds[held_out] = fitted.as_array()[None, :]
    finally:
        quiet.setLevel(level)
    return CrossFit(thresholds=full, row_thresholds=row_thresholds, fold_of_row=fold_of_row, folds=k)

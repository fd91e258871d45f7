"""Multi-label metrics on the whole validation set: mAP, per-label AP, precision / recall / F1.

Everything is vectorised numpy over (N, L) arrays (100k x 100 takes well under a second) and matches
scikit-learn on the same inputs:

* ``per_label_ap`` is ``average_precision_score`` per label (ties in scores grouped the same way);
  a label with **no positive** in ``targets`` has AP ``NaN`` (undefined: there is nothing to rank),
  and ``mAP`` is the mean over the labels that have positives (``NaN`` if none has).
* ``micro_* / macro_* / samples_*`` precision, recall and F1 equal ``precision_recall_fscore_support``
  with ``zero_division=0``; predictions are ``scores >= thresholds`` (the same rule as
  ``Thresholds.apply``), thresholds a scalar, one per label, or one per row and label (the
  cross-fitted thresholds of ``mlc_ray.calibrate.cross_fit_thresholds``: each row judged by
  thresholds fitted without it).
* ``subset_accuracy`` is the exact-match ratio (sklearn's ``accuracy_score`` on multi-label input).

Per-label values are float64 arrays of shape (L,), in label order; ``jsonable_metrics`` turns the dict
into JSON (NaN -> null, arrays -> {label: value}) and ``format_metrics_table`` into the job summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Bound the (N x chunk) temporaries of the AP computation to ~this many elements.
_AP_CHUNK_ELEMENTS = 4_000_000

SCALAR_KEYS = (
    "mAP",
    "micro_precision",
    "micro_recall",
    "micro_f1",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "samples_precision",
    "samples_recall",
    "samples_f1",
    "subset_accuracy",
)
PER_LABEL_KEYS = (
    "per_label_ap",
    "per_label_precision",
    "per_label_recall",
    "per_label_f1",
    "per_label_support",
)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _validate(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores and targets must both be (N, L); got {s.shape} and {t.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"no samples or no labels to evaluate (shape {s.shape})")
    bad = ~np.isfinite(s).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} rows of scores are not finite (first: row {int(np.flatnonzero(bad)[0])}); "
            "drop the images that failed to decode before computing metrics"
        )
    if not np.isin(t, (0, 1)).all():
        raise ValueError("targets must be 0/1 (multi-hot); found other values")
    return s, t.astype(bool)


def _thresholds(thresholds: float | Sequence[float] | np.ndarray, n_labels: int) -> np.ndarray:
    th = np.asarray(thresholds, dtype=np.float64)
    if th.ndim == 0:
        return np.full(n_labels, float(th))
    if th.shape != (n_labels,):
        raise ValueError(f"thresholds must be a scalar or one per label ({n_labels}); got shape {th.shape}")
    return th


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-column average precision like sklearn's ``average_precision_score``; NaN without positives.

    AP = sum over thresholds of (R_n - R_{n-1}) * P_n, thresholds the distinct scores. Equivalently:
    the mean, over the positives, of the precision at the end of the positive's tie group.
    """
    s, y = _validate(scores, targets)
    n, n_labels = s.shape
    out = np.full(n_labels, np.nan)
    chunk = max(1, _AP_CHUNK_ELEMENTS // n)
    rank = np.arange(1, n + 1, dtype=np.float64)[:, None]
    for j0 in range(0, n_labels, chunk):
        cs, cy = s[:, j0 : j0 + chunk], y[:, j0 : j0 + chunk]
        order = np.argsort(-cs, axis=0)  # order within a tie group does not matter
        s_sorted = np.take_along_axis(cs, order, axis=0)
        y_sorted = np.take_along_axis(cy, order, axis=0)
        precision = np.cumsum(y_sorted, axis=0) / rank
        # last index of each tie group: where the next score differs, and the final row
        group_end = np.empty(s_sorted.shape, dtype=bool)
        group_end[:-1] = s_sorted[:-1] != s_sorted[1:]
        group_end[-1] = True
        idx = np.where(group_end, np.arange(n)[:, None], n)
        end_of_group = np.minimum.accumulate(idx[::-1], axis=0)[::-1]
        p_at_end = np.take_along_axis(precision, end_of_group, axis=0)
        n_pos = y_sorted.sum(axis=0)
        ap = np.where(y_sorted, p_at_end, 0.0).sum(axis=0) / np.maximum(n_pos, 1)
        out[j0 : j0 + chunk] = np.where(n_pos > 0, ap, np.nan)
    return out


def compute_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All validation metrics for scores (N, L) against 0/1 targets (N, L); see the module docstring.

    Keys: the ``SCALAR_KEYS`` (python floats), the ``PER_LABEL_KEYS`` ((L,) arrays), ``n_samples``,
    ``n_labels``, and ``labels`` when given.
    """
    s, y = _validate(scores, targets)
    n, n_labels = s.shape
    if labels is not None and len(labels) != n_labels:
        raise ValueError(f"{len(labels)} label names for {n_labels} score columns")
    th = np.asarray(thresholds, dtype=np.float64)
    if th.ndim == 2:  # one threshold per row and label (cross-fitted: fitted without the row's fold)
        if th.shape != s.shape:
            raise ValueError(f"per-row thresholds must have the scores' shape {s.shape}; got {th.shape}")
        pred = s >= th
    else:
        pred = s >= _thresholds(thresholds, n_labels)[None, :]

    tp_mat = pred & y
    tp = tp_mat.sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    per_p, per_r, per_f1 = _divide(tp, tp + fp), _divide(tp, tp + fn), _divide(2 * tp, 2 * tp + fp + fn)

    tp_all, fp_all, fn_all = tp.sum(), fp.sum(), fn.sum()
    row_tp = tp_mat.sum(axis=1)
    row_pred = pred.sum(axis=1)
    row_true = y.sum(axis=1)

    ap = average_precision(s, y)
    has_pos = ~np.isnan(ap)
    metrics: dict[str, Any] = {
        "mAP": float(ap[has_pos].mean()) if has_pos.any() else math.nan,
        "micro_precision": float(_divide(tp_all, tp_all + fp_all)),
        "micro_recall": float(_divide(tp_all, tp_all + fn_all)),
        "micro_f1": float(_divide(2 * tp_all, 2 * tp_all + fp_all + fn_all)),
        "macro_precision": float(per_p.mean()),
        "macro_recall": float(per_r.mean()),
        "macro_f1": float(per_f1.mean()),
        "samples_precision": float(_divide(row_tp, row_pred).mean()),
        "samples_recall": float(_divide(row_tp, row_true).mean()),
        "samples_f1": float(_divide(2 * row_tp, row_pred + row_true).mean()),
        "subset_accuracy": float((pred == y).all(axis=1).mean()),
        "per_label_ap": ap,
        "per_label_precision": per_p,
        "per_label_recall": per_r,
        "per_label_f1": per_f1,
        "per_label_support": y.sum(axis=0).astype(np.int64),
        "n_samples": int(n),
        "n_labels": int(n_labels),
    }
    if labels is not None:
        metrics["labels"] = [str(x) for x in labels]
    return metrics


def subset_accuracy(
    scores: np.ndarray, targets: np.ndarray, thresholds: float | Sequence[float] | np.ndarray = 0.5
) -> float:
    """Exact-match ratio: the fraction of samples whose predicted label set equals the true one."""
    s, y = _validate(scores, targets)
    return float(((s >= _thresholds(thresholds, s.shape[1])[None, :]) == y).all(axis=1).mean())


def combination_accuracy(
    scores: np.ndarray,
    targets: np.ndarray,
    thresholds: float | Sequence[float] | np.ndarray,
    combination_indices: Sequence[int],
) -> float:
    """Exact-match accuracy over the samples whose true labels include every index in the combination.

    Seed 000's cat+dog figure: of the images that show both, how many get exactly their label set.
    NaN when no sample holds the combination.
    """
    s, y = _validate(scores, targets)
    idx = [int(i) for i in combination_indices]
    if not idx or any(not 0 <= i < s.shape[1] for i in idx):
        raise ValueError(f"combination_indices must be non-empty label indices < {s.shape[1]}, got {idx}")
    rows = y[:, idx].all(axis=1)
    if not rows.any():
        return math.nan
    pred = s[rows] >= _thresholds(thresholds, s.shape[1])[None, :]
    return float((pred == y[rows]).all(axis=1).mean())


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The scalar metrics (for ``mlflow.log_metrics`` / ``ray.train.report``), NaN left out."""
    out = {}
    for key in SCALAR_KEYS:
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            out[prefix + key] = float(value)
    return out


def jsonable_metrics(metrics: dict[str, Any], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON-ready copy: per-label arrays become {label: value}; NaN becomes None (null)."""
    labels = list(labels if labels is not None else metrics.get("labels") or range(metrics["n_labels"]))

    def clean(v: Any) -> Any:
        v = v.item() if isinstance(v, np.generic) else v
        return None if isinstance(v, float) and not math.isfinite(v) else v

    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, np.ndarray):
            out[key] = {str(lab): clean(v) for lab, v in zip(labels, value.tolist(), strict=True)}
        else:
            out[key] = clean(value)
    return out


def format_metrics_table(metrics: dict[str, Any], labels: Sequence[str] | None = None) -> str:
    """A plain-text table: per-label support, AP, precision, recall, F1, then the averages."""
    labels = [str(x) for x in (labels if labels is not None else metrics.get("labels") or [])]
    n_labels = int(metrics["n_labels"])
    if not labels:
        labels = [f"label_{j}" for j in range(n_labels)]
    if len(labels) != n_labels:
        raise ValueError(f"{len(labels)} label names for {n_labels} labels in the metrics")
    width = max(12, *(len(x) for x in labels))

    def num(v: float) -> str:
        return "   n/a" if not math.isfinite(v) else f"{v:6.4f}"

    head = f"{'label':<{width}} {'support':>7} {'AP':>6} {'prec':>6} {'recall':>6} {'F1':>6}"
    lines = [head, "-" * len(head)]
    for j, label in enumerate(labels):
        lines.append(
            f"{label:<{width}} {int(metrics['per_label_support'][j]):>7} "
            f"{num(metrics['per_label_ap'][j])} {num(metrics['per_label_precision'][j])} "
            f"{num(metrics['per_label_recall'][j])} {num(metrics['per_label_f1'][j])}"
        )
    lines.append("-" * len(head))
    for avg in ("micro", "macro", "samples"):
        lines.append(
            f"{avg + ' avg':<{width}} {metrics['n_samples']:>7} {'':>6} {num(metrics[avg + '_precision'])} "
            f"{num(metrics[avg + '_recall'])} {num(metrics[avg + '_f1'])}"
        )
    lines.append(f"mAP {num(metrics['mAP'])}   subset accuracy {num(metrics['subset_accuracy'])}")
    return "\n".join(lines)

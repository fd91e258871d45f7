"""Multi-label metrics on a whole evaluation set: mAP, per-label AP, precision / recall / F1.

One thin wrapper over scikit-learn (``average_precision_score``, ``precision_recall_fscore_support``,
``accuracy_score``): it validates the (N, L) inputs with errors a user can act on, turns scores into
predictions, and returns every figure the jobs report in one dict. Shared by training (``train/``),
evaluation/promotion (``evaluation``) and the int8 gate (``export/quantize``), so it lives below all
of them.

* ``per_label_ap`` is ``average_precision_score`` per label; a label with **no positive** in
  ``targets`` has AP ``NaN`` (undefined: there is nothing to rank), and ``mAP`` is the mean over the
  labels that have positives (``NaN`` if none has).
* ``micro_* / macro_* / samples_*`` precision, recall and F1 are ``precision_recall_fscore_support``
  with ``zero_division=0``; predictions are ``scores >= thresholds`` (the same rule as
  ``Thresholds.apply``), thresholds a scalar, one per label, or one per row and label (the
  cross-fitted thresholds of ``mlc_ray.calibrate.cross_fit_thresholds``: each row judged by
  thresholds fitted without it).
* ``subset_accuracy`` is the exact-match ratio (``accuracy_score`` on multi-label input).

Per-label values are float64 arrays of shape (L,), in label order; ``jsonable_metrics`` turns the dict
into JSON (NaN -> null, arrays -> {label: value}) and ``format_metrics_table`` into the job summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

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
    """Per-column ``sklearn.metrics.average_precision_score``; NaN for a column without positives."""
    from sklearn.metrics import average_precision_score

    s, y = _validate(scores, targets)
    out = np.full(s.shape[1], np.nan)
    for j in np.flatnonzero(y.any(axis=0)):
        out[j] = average_precision_score(y[:, j], s[:, j])
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
    import scipy.sparse
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

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

    # Sparse 0/1 matrices: the same results, and sklearn's input checks on a dense (N, L) indicator
    # array cost ~1 s per call at 100k x 100 (five calls here) against ~0.2 s sparse.
    y_sparse, pred_sparse = scipy.sparse.csr_matrix(y), scipy.sparse.csr_matrix(pred)

    def prf(average: str | None) -> tuple[Any, Any, Any]:
        p, r, f, _ = precision_recall_fscore_support(y_sparse, pred_sparse, average=average, zero_division=0)
        return p, r, f

    per_p, per_r, per_f1 = (np.asarray(v, dtype=np.float64) for v in prf(None))
    ap = average_precision(s, y)
    has_pos = ~np.isnan(ap)
    metrics: dict[str, Any] = {"mAP": float(ap[has_pos].mean()) if has_pos.any() else math.nan}
    for average in ("micro", "macro", "samples"):
        p, r, f = prf(average)
        metrics.update(
            {f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)}
        )
    metrics.update(
        {
            "subset_accuracy": float(accuracy_score(y_sparse, pred_sparse)),
            "per_label_ap": ap,
            "per_label_precision": per_p,
            "per_label_recall": per_r,
            "per_label_f1": per_f1,
            "per_label_support": y.sum(axis=0).astype(np.int64),
            "n_samples": int(n),
            "n_labels": int(n_labels),
        }
    )
    if labels is not None:
        metrics["labels"] = [str(x) for x in labels]
    return metrics


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

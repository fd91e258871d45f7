"""MLflow tracking for training: the driver's run, rank 0's per-epoch metrics, the final artifacts.

The driver opens (or joins) the run, because the mining pipeline nests stages under its own parent;
the run id travels to the workers in the loop config and world rank 0 logs each epoch through
``MlflowClient`` (Ray's ``MLflowLoggerCallback`` is a Tune callback and does not work with Train V2).
The tracking URI comes from ``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db``; relative sqlite
paths are made absolute on the driver so that workers with another working directory hit the same file.

Artifacts (driver, after training): ``config.yaml`` (resolved config), ``label_distribution.png``,
``pr_curves.png`` (per-label precision-recall), ``per_label_metrics.csv`` / ``.md``, ``bad_images.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TRACKING_URI",
    "EpochLogger",
    "flatten_params",
    "label_distribution_png",
    "pr_curves_png",
    "per_label_table",
    "resolve_tracking_uri",
    "training_run",
]

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` or ``MLFLOW_TRACKING_URI`` or the default; a relative sqlite path becomes absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"mining": {"top_k": 5}} -> {"mining.top_k": "5"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_LENGTH]
    return out


@contextlib.contextmanager
def training_run(
    experiment: str, run_name: str, *, tracking_uri: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[Any]:
    """The MLflow run training logs into: the active run if there is one (mining's nested stage),
    else a new run in ``experiment``, ended (FINISHED or FAILED) on exit. Yields the ``mlflow.ActiveRun``."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    active = mlflow.active_run()
    if active is not None:
        if tags:
            mlflow.set_tags(dict(tags))
        yield active
        return
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})) as run:
        yield run


class EpochLogger:
    """World rank 0's per-epoch metrics into the driver's run (no active-run state in the worker)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))

    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(key=k, value=float(v), timestamp=now, step=step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
        ]
        try:
            self.client.log_batch(self.run_id, metrics=entries)
        except Exception as exc:  # tracking must never kill a training run
            log.warning("MLflow logging of epoch %d failed: %s", step, exc)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def label_distribution_png(
    train_targets: np.ndarray, val_targets: np.ndarray, labels: Sequence[str]
) -> bytes:
    """Bar chart: images per label in train and val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4))
    ax.bar(x - 0.2, np.asarray(train_targets).sum(axis=0), width=0.4, label="train")
    ax.bar(x + 0.2, np.asarray(val_targets).sum(axis=0), width=0.4, label="val")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("images")
    ax.set_title("label distribution")
    ax.legend()
    return _png(fig)


def pr_curves_png(scores: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> bytes:
    """Per-label precision-recall curves on validation, AP in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = plt.subplots(figsize=(7, 6))
    for j, label in enumerate(labels):
        y = np.asarray(targets)[:, j]
        if y.sum() == 0:
            continue
        precision, recall, _ = precision_recall_curve(y, scores[:, j])
        ap = average_precision_score(y, scores[:, j])
        ax.plot(recall, precision, label=f"{label} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("validation precision-recall per label")
    ax.legend(fontsize="small", loc="lower left")
    return _png(fig)


def per_label_table(
    metrics_05: Mapping[str, Any],
    metrics_cal: Mapping[str, Any],
    thresholds: Sequence[float],
    labels: Sequence[str],
) -> tuple[str, str]:
    """(CSV, markdown) of per-label support, AP, P/R/F1 at 0.5 and at the calibrated threshold."""
    header = [
        "label",
        "support",
        "ap",
        "threshold",
        "precision@0.5",
        "recall@0.5",
        "f1@0.5",
        "precision@cal",
        "recall@cal",
        "f1@cal",
    ]
    rows = []
    for j, label in enumerate(labels):
        rows.append(
            [
                label,
                int(metrics_05["per_label_support"][j]),
                float(metrics_05["per_label_ap"][j]),
                float(thresholds[j]),
                float(metrics_05["per_label_precision"][j]),
                float(metrics_05["per_label_recall"][j]),
                float(metrics_05["per_label_f1"][j]),
                float(metrics_cal["per_label_precision"][j]),
                float(metrics_cal["per_label_recall"][j]),
                float(metrics_cal["per_label_f1"][j]),
            ]
        )

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if not np.isfinite(v) else f"{v:.4f}"
        return str(v)

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *([cell(v) for v in r] for r in rows)])
    md_lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md_lines += ["| " + " | ".join(cell(v) or "n/a" for v in r) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md_lines) + "\n"

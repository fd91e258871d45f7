"""Per-label counts of a tagging run and of a model's validation set (what drift compares).

``shard_label_stats`` counts one committed shard in the driver (per label: images at or above the
calibrated threshold, images that list it after the tag-time options, a ``HIST_BINS``-bucket score
histogram); the counts are saved with the shard's counts file and summed with ``merge_totals``, so a
resumed run sums them exactly, with no second pass over the table. ``expected_label_rates`` is what
training records in the bundle's ``label_rates.json``: the same counts on the validation set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = [
    "HIST_BINS",
    "LABEL_RATES_FILE",
    "LABEL_RATES_FORMAT",
    "scores_matrix",
    "shard_label_stats",
    "merge_totals",
    "empty_totals",
    "expected_label_rates",
]

HIST_BINS = 20  # score buckets of width 0.05 over [0, 1]
LABEL_RATES_FILE = "label_rates.json"
LABEL_RATES_FORMAT = 1


def scores_matrix(table: pa.Table, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices of the scored rows, their (n, L) scores in model order) from a tag-table batch."""
    col = table.column("scores").combine_chunks()
    lengths = np.asarray(col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(lengths == n_labels)
    flat = col.flatten().field("score").to_numpy(zero_copy_only=False)
    if lengths.sum() != len(rows) * n_labels:  # rows of other lengths: not from this model
        raise ValueError("tag rows with a number of scores other than the model's labels")
    return rows, np.asarray(flat, dtype=np.float64).reshape(len(rows), n_labels)


def shard_label_stats(table: pa.Table, labels: Sequence[str], thresholds: Sequence[float]) -> dict:
    """Per-label counts of one committed shard: ``ok`` images, ``above`` (score >= the calibrated
    threshold, what drift compares), ``listed`` (in the ``labels`` column) and ``hist`` (L x bins)."""
    import pyarrow.compute as pc

    n = len(labels)
    _, scores = scores_matrix(table, n)
    above = (scores >= np.asarray(thresholds, dtype=np.float64)[None, :]).sum(axis=0)
    bins = np.clip((scores * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    hist = np.zeros((n, HIST_BINS), dtype=np.int64)
    for j in range(n):
        hist[j] = np.bincount(bins[:, j], minlength=HIST_BINS)
    listed_names = pc.list_flatten(table.column("labels")).to_pylist()
    index = {name: j for j, name in enumerate(labels)}
    listed = np.bincount([index[x] for x in listed_names], minlength=n) if listed_names else np.zeros(n)
    return {
        "ok": int(scores.shape[0]),
        "above": [int(x) for x in above],
        "listed": [int(x) for x in listed],
        "hist": hist.tolist(),
    }


def merge_totals(total: dict | None, part: dict) -> dict:
    """Sum two ``shard_label_stats`` dicts."""
    if total is None:
        return {
            k: (list(v) if k != "hist" else [list(r) for r in v]) if k != "ok" else v for k, v in part.items()
        }
    out = {"ok": total["ok"] + part["ok"]}
    out["above"] = [a + b for a, b in zip(total["above"], part["above"], strict=True)]
    out["listed"] = [a + b for a, b in zip(total["listed"], part["listed"], strict=True)]
    out["hist"] = (np.asarray(total["hist"]) + np.asarray(part["hist"])).tolist()
    return out


def empty_totals(n_labels: int) -> dict:
    return {"ok": 0, "above": [0] * n_labels, "listed": [0] * n_labels, "hist": [[0] * HIST_BINS] * n_labels}


def expected_label_rates(scores: np.ndarray, thresholds: Sequence[float], labels: Sequence[str]) -> dict:
    """What training records in ``label_rates.json``: each label's predicted-positive rate on the
    validation set at the calibrated thresholds, and its score histogram (the tagging buckets)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    positives = (s >= t[None, :]).sum(axis=0)
    bins = np.clip((s * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    hist = [np.bincount(bins[:, j], minlength=HIST_BINS).tolist() for j in range(s.shape[1])]
    n = int(s.shape[0])
    return {
        "format_version": LABEL_RATES_FORMAT,
        "source": "validation set, scores at the calibrated thresholds",
        "labels": list(labels),
        "images": n,
        "positives": [int(x) for x in positives],
        "rates": [float(x) / n if n else 0.0 for x in positives],
        "thresholds": [float(x) for x in t],
        "hist_bins": HIST_BINS,
        "hist": hist,
    }

"""Hard-sample mining: train a base model, score the training set with it, fine-tune on what it gets wrong.

Seed 000's recipe for an under-represented label combination (its cat+dog images went from 20% to
80% accuracy): train a base model on everything, score every training image with it, keep the hard
samples of each category by confidence, and fine-tune from the base model on that set. Here it is
one job, ``run_mining_pipeline(cfg)``, with one parent MLflow run and nested runs per stage:

  (a) ``base``      ``run_training`` on the configured data with mining off;
  (b) ``score``     the base bundle scores the whole training split (``score_manifest``, a Ray Data
                    batch-inference pass);
  (c) ``fine_tune`` ``HardSampleMiner`` selects the mined set (+ a random replay of easy samples),
                    written as a manifest artifact with the reason each sample was picked; training
                    resumes from the base weights on it and is validated on the *same* validation split.

  (d) ``control``   the same fine-tune (same base weights, size, epochs, lr: the same number of
                    steps) on a seeded *random* subset of the training split of the mined set's size:
                    what fine-tuning alone buys, without the mining.

Whether mining helped is read on held-out rows no stage saw: ``holdout_fraction`` of the validation
split is set aside at [0] (every stage validates, picks its checkpoint and fits its thresholds on
the rest). The report (per-label F1 and AP, exact-match accuracy of the rarest label combinations
and pairs) compares base, mined fine-tune and random fine-tune there, each model at its own
calibrated thresholds; it closes the parent run as a table in the log and as
``mining_report.md`` / ``mining_report.csv`` artifacts.

Selection rules (``MiningConfig``; each picked sample records every rule that picked it):

``hard_positive:L`` / ``hard_negative:L``
    per label L, positives with the lowest scores and negatives with the highest scores:
    ``strategy="top_k"`` takes the ``top_k`` hardest of each; ``strategy="band"`` takes positives
    scoring below ``band_high`` and negatives scoring above ``band_low`` (not confidently right).
    At most ``per_label_cap`` samples per label come from these two rules (hardest first), the
    seed's "30000 of each category".
``misclassified``
    any label on the wrong side of the current thresholds (``include_misclassified``).
``rare_combination:A+B``
    every sample whose exact label set is rarer than ``rare_combination_max_frequency`` (a fraction
    of the training set when < 1, else a count); the empty label set is ``(none)``.
``replay``
    a seeded random ``replay_fraction`` of the samples no rule picked, so common labels keep their
    easy examples and do not regress.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc_ray.train.config import MiningConfig  # defined there: TrainConfig nests it

__all__ = [
    "MiningConfig",
    "MinedSet",
    "HardSampleMiner",
    "combination_keys",
    "write_mined_manifest",
    "NO_LABEL",
]
log = logging.getLogger(__name__)

NO_LABEL = "(none)"


@dataclass
class MinedSet:
    """Indices into the scored set (ascending) and, aligned, why each was picked."""

    indices: np.ndarray
    reasons: list[list[str]]

    def __len__(self) -> int:
        return int(self.indices.size)

    def reason_counts(self) -> dict[str, int]:
        """How many samples each rule kind picked (``hard_positive``, ``replay``, ...)."""
        counts: Counter[str] = Counter()
        for reasons in self.reasons:
            counts.update({r.split(":", 1)[0] for r in reasons})
        return dict(sorted(counts.items()))


def combination_keys(targets: np.ndarray, labels: Sequence[str]) -> list[str]:
    """Each sample's exact label set as ``"a+b"`` (label order), ``"(none)"`` when empty."""
    targets = np.asarray(targets).astype(bool)
    return ["+".join(labels[j] for j in np.flatnonzero(row)) or NO_LABEL for row in targets]


def threshold_array(thresholds: Any, n_labels: int) -> np.ndarray:
    if hasattr(thresholds, "values") and hasattr(thresholds, "labels") and not isinstance(thresholds, dict):
        values = np.asarray(thresholds.values, dtype=np.float64)
    else:
        values = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n_labels,)).copy()
    if values.shape != (n_labels,):
        raise ValueError(f"thresholds have {values.size} values for {n_labels} labels")
    return values


class HardSampleMiner:
    """Applies the rules of a ``MiningConfig`` to (N, L) scores of the training set."""

    def __init__(self, config: MiningConfig) -> None:
        self.config = config

    def select(
        self, scores: np.ndarray, targets: np.ndarray, thresholds: Any, labels: Sequence[str]
    ) -> MinedSet:
        """Pick hard samples; ``thresholds`` is a ``Thresholds``, one value per label, or a scalar."""
        cfg = self.config
        scores = np.asarray(scores, dtype=np.float64)
        targets = np.asarray(targets).astype(bool)
        labels = [str(x) for x in labels]
        if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != len(labels):
            raise ValueError(
                f"scores {scores.shape}, targets {targets.shape} and {len(labels)} labels do not agree"
            )
        n, n_labels = scores.shape
        if n and not np.isfinite(scores).all():
            rows = np.flatnonzero(~np.isfinite(scores).all(axis=1))
            raise ValueError(
                f"scores of rows {rows[:10].tolist()} are NaN/inf: drop failed images before mining"
            )
        reasons: list[list[str]] = [[] for _ in range(n)]

        # [1] rare label combinations: every member, they are what mining is for
        if cfg.rare_combination_max_frequency > 0 and n:
            keys = combination_keys(targets, labels)
            counts = Counter(keys)
            limit = cfg.rare_combination_max_frequency
            limit_count = limit * n if limit < 1 else limit
            for i, key in enumerate(keys):
                if counts[key] < limit_count:
                    reasons[i].append(f"rare_combination:{key}")

        # [2] misclassified at the current thresholds
        if cfg.include_misclassified and n:
            wrong = ((scores >= threshold_array(thresholds, n_labels)[None, :]) != targets).any(axis=1)
            for i in np.flatnonzero(wrong):
                reasons[i].append("misclassified")

        # [3] per label: hard positives (low scores) and hard negatives (high scores), capped
        for j, label in enumerate(labels):
            s, y = scores[:, j], targets[:, j]
            pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
            # hardest first; index breaks ties so the choice is deterministic
            pos = pos[np.lexsort((pos, s[pos]))]
            neg = neg[np.lexsort((neg, -s[neg]))]
            if cfg.strategy == "top_k":
                pos, neg = pos[: cfg.top_k], neg[: cfg.top_k]
            else:
                pos, neg = pos[s[pos] < cfg.band_high], neg[s[neg] > cfg.band_low]
            if pos.size + neg.size > cfg.per_label_cap:
                # keep the hardest of both kinds by how far each score is from its target
                cand = np.concatenate([pos, neg])
                miss = np.concatenate([1.0 - s[pos], s[neg]])
                keep = cand[np.lexsort((cand, -miss))[: cfg.per_label_cap]]
                pos, neg = np.intersect1d(pos, keep), np.intersect1d(neg, keep)
            for i in np.sort(pos):
                reasons[i].append(f"hard_positive:{label}")
            for i in np.sort(neg):
                reasons[i].append(f"hard_negative:{label}")

        # [4] replay: a seeded random share of what no rule picked
        easy = np.array([i for i in range(n) if not reasons[i]], dtype=np.int64)
        n_replay = int(round(cfg.replay_fraction * easy.size))
        if n_replay:
            rng = np.random.default_rng(cfg.seed)
            for i in rng.choice(easy, size=n_replay, replace=False):
                reasons[int(i)].append("replay")

        indices = np.array([i for i in range(n) if reasons[i]], dtype=np.int64)
        mined = MinedSet(indices=indices, reasons=[reasons[i] for i in indices])
        log.info("mined %d of %d samples: %s", len(mined), n, mined.reason_counts())
        return mined


def write_mined_manifest(manifest: Any, mined: MinedSet, uri: str, *, split: str = "train") -> str:
    """Write the mined samples of ``manifest`` (indices into it) with a ``reason`` column; returns ``uri``.

    Format by suffix: ``.parquet`` (labels as list<string>), ``.jsonl``, else CSV (labels joined by
    ``|``). ``reason`` is the sample's reasons joined by ``;``. ``labels.txt`` (the vocabulary, in
    order) is written beside it, so the manifest loads back with the same label order.
    """
    from mlc_ray import storage

    table = _manifest_table(
        [manifest.images[i] for i in mined.indices],
        [list(manifest.labels[i]) for i in mined.indices],
        [split] * len(mined),
        [";".join(r) for r in mined.reasons],
    )
    _write_table(table, uri)
    parent = uri.rsplit("/", 1)[0] if "/" in uri else "."
    storage.write_text(storage.join(parent, "labels.txt"), "\n".join(manifest.vocabulary) + "\n")
    return uri


def _manifest_table(images: list[str], labels: list[list[str]], splits: list[str], reasons: list[str]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "image": pa.array(images, pa.string()),
            "labels": pa.array(labels, pa.list_(pa.string())),
            "split": pa.array(splits, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        }
    )


def _write_table(table: Any, uri: str) -> None:
    """``table`` (image, labels list, split[, reason]) as Parquet, JSONL or CSV (``csv`` module; labels
    joined by ``|``, like every manifest CSV), by the suffix of ``uri``."""
    import json

    from mlc_ray import storage

    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(uri, buf.getvalue())
    elif lower.endswith(".jsonl"):
        lines = [json.dumps(row, ensure_ascii=False) for row in table.to_pylist()]
        storage.write_text(uri, "\n".join(lines) + ("\n" if lines else ""))
    else:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["|".join(v) if isinstance(v, list) else v for v in row.values()])
        storage.write_text(uri, text.getvalue())

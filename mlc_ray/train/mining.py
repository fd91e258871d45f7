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
import dataclasses
import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlc_ray.train.config import MiningConfig  # defined there: TrainConfig nests it

__all__ = [
    "MiningConfig",
    "MinedSet",
    "HardSampleMiner",
    "combination_keys",
    "write_mined_manifest",
    "mining_report",
    "run_mining_pipeline",
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


def _threshold_array(thresholds: Any, n_labels: int) -> np.ndarray:
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
            wrong = ((scores >= _threshold_array(thresholds, n_labels)[None, :]) != targets).any(axis=1)
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
    import io
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


# ---- before/after report -------------------------------------------------------------------------


@dataclass
class MiningReport:
    """Base vs fine-tuned on the same validation set: per label and for the rarest label combinations."""

    threshold_note: str
    label_rows: list[dict[str, Any]]  # label, support, f1_base, f1_fine_tuned, ap_base, ap_fine_tuned
    combination_rows: list[dict[str, Any]]  # combination, count, acc_base, acc_fine_tuned
    # the rarest co-occurring label pairs (samples holding both, whatever else they hold: seed 000's
    # "cat_dog"): pair, count, acc_base, acc_fine_tuned (exact match on those samples)
    pair_rows: list[dict[str, Any]] = field(default_factory=list)
    # the control (random subset, same steps): rows then also hold f1_control/ap_control/acc_control
    has_control: bool = False
    data_note: str = ""  # which rows the report was measured on

    def to_markdown(self) -> str:
        if self.has_control:
            return self._control_markdown()

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return "n/a" if not np.isfinite(v) else f"{v:.4f}"
            return str(v)

        def delta(a: float, b: float) -> str:
            return "n/a" if not (np.isfinite(a) and np.isfinite(b)) else f"{b - a:+.4f}"

        out = [
            f"Predictions at {self.threshold_note}.",
            "",
            "| label | val positives | F1 base | F1 fine-tuned | ΔF1 | AP base | AP fine-tuned | ΔAP |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.label_rows:
            out.append(
                f"| {r['label']} | {r['support']} | {fmt(r['f1_base'])} | {fmt(r['f1_fine_tuned'])} | "
                f"{delta(r['f1_base'], r['f1_fine_tuned'])} | {fmt(r['ap_base'])} | {fmt(r['ap_fine_tuned'])} | "
                f"{delta(r['ap_base'], r['ap_fine_tuned'])} |"
            )
        out += [
            "",
            "| label combination (rarest first) | val samples | exact-match acc base | fine-tuned | Δ |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in self.combination_rows:
            out.append(
                f"| {r['combination']} | {r['count']} | {fmt(r['acc_base'])} | {fmt(r['acc_fine_tuned'])} | "
                f"{delta(r['acc_base'], r['acc_fine_tuned'])} |"
            )
        if self.pair_rows:
            out += [
                "",
                "| label pair (rarest co-occurrence first) | val samples with both | exact-match acc base "
                "| fine-tuned | Δ |",
                "|---|---:|---:|---:|---:|",
            ]
            for r in self.pair_rows:
                out.append(
                    f"| {r['pair']} | {r['count']} | {fmt(r['acc_base'])} | {fmt(r['acc_fine_tuned'])} | "
                    f"{delta(r['acc_base'], r['acc_fine_tuned'])} |"
                )
        return "\n".join(out) + "\n"

    def _control_markdown(self) -> str:
        def fmt(v: Any) -> str:
            return "n/a" if not np.isfinite(v) else f"{v:.4f}"

        def delta(a: float, b: float) -> str:
            return "n/a" if not (np.isfinite(a) and np.isfinite(b)) else f"{a - b:+.4f}"

        out = [
            f"{self.data_note}Predictions at {self.threshold_note}. `mined` = base fine-tuned on the mined "
            "set; `random` = base fine-tuned for the same steps on a random subset of the same size.",
            "",
            "| label | positives | F1 base | F1 mined | F1 random | mined − random "
            "| AP base | AP mined | AP random | mined − random |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.label_rows:
            out.append(
                f"| {r['label']} | {r['support']} | {fmt(r['f1_base'])} | {fmt(r['f1_fine_tuned'])} | "
                f"{fmt(r['f1_control'])} | {delta(r['f1_fine_tuned'], r['f1_control'])} | {fmt(r['ap_base'])} | "
                f"{fmt(r['ap_fine_tuned'])} | {fmt(r['ap_control'])} | {delta(r['ap_fine_tuned'], r['ap_control'])} |"
            )
        for title, rows, key in (
            ("label combination (rarest first)", self.combination_rows, "combination"),
            ("label pair (rarest co-occurrence first)", self.pair_rows, "pair"),
        ):
            if not rows:
                continue
            out += [
                "",
                f"| {title} | samples | exact-match base | mined | random | mined − random |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                out.append(
                    f"| {r[key]} | {r['count']} | {fmt(r['acc_base'])} | {fmt(r['acc_fine_tuned'])} | "
                    f"{fmt(r['acc_control'])} | {delta(r['acc_fine_tuned'], r['acc_control'])} |"
                )
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        """One row per label, rare combination and rare pair (``csv`` module quoting)."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        if self.has_control:
            writer.writerow(
                ["kind", "name", "count", "base_f1_or_acc", "mined_f1_or_acc", "random_f1_or_acc"]
                + ["base_ap", "mined_ap", "random_ap"]
            )
            for r in self.label_rows:
                writer.writerow(
                    ["label", r["label"], r["support"]]
                    + _floats(
                        r, "f1_base", "f1_fine_tuned", "f1_control", "ap_base", "ap_fine_tuned", "ap_control"
                    )
                )
            for kind, rows, key in (
                ("combination", self.combination_rows, "combination"),
                ("pair", self.pair_rows, "pair"),
            ):
                for r in rows:
                    writer.writerow(
                        [kind, r[key], r["count"]]
                        + _floats(r, "acc_base", "acc_fine_tuned", "acc_control")
                        + ["", "", ""]
                    )
            return text.getvalue()
        writer.writerow(
            ["kind", "name", "count", "base_f1_or_acc", "fine_tuned_f1_or_acc", "base_ap", "fine_tuned_ap"]
        )
        for r in self.label_rows:
            writer.writerow(
                ["label", r["label"], r["support"]]
                + _floats(r, "f1_base", "f1_fine_tuned", "ap_base", "ap_fine_tuned")
            )
        for kind, rows, key in (
            ("combination", self.combination_rows, "combination"),
            ("pair", self.pair_rows, "pair"),
        ):
            for r in rows:
                writer.writerow(
                    [kind, r[key], r["count"]] + _floats(r, "acc_base", "acc_fine_tuned") + ["", ""]
                )
        return text.getvalue()

    def max_label_f1_drop(self, exclude: Sequence[str] = ()) -> float:
        """The largest F1 drop (base - fine-tuned) over the labels not in ``exclude``; 0 if none dropped."""
        drops = [
            r["f1_base"] - r["f1_fine_tuned"]
            for r in self.label_rows
            if r["label"] not in exclude and np.isfinite(r["f1_base"]) and np.isfinite(r["f1_fine_tuned"])
        ]
        return max([0.0, *drops])

    def combination(self, key: str) -> dict[str, Any] | None:
        return next((r for r in self.combination_rows if r["combination"] == key), None)


def _floats(row: dict[str, Any], *keys: str) -> list[str]:
    return [f"{row[k]:.6f}" for k in keys]


def _exact_match_by_combination(pred: np.ndarray, targets: np.ndarray, keys: list[str]) -> dict[str, float]:
    exact = (pred == targets.astype(bool)).all(axis=1)
    out: dict[str, list[bool]] = {}
    for key, ok in zip(keys, exact, strict=True):
        out.setdefault(key, []).append(bool(ok))
    return {k: float(np.mean(v)) for k, v in out.items()}


def mining_report(
    labels: Sequence[str],
    targets: np.ndarray,
    base_scores: np.ndarray,
    fine_tuned_scores: np.ndarray,
    *,
    thresholds: Any = 0.5,
    fine_tuned_thresholds: Any = None,
    n_combinations: int = 5,
    control_scores: np.ndarray | None = None,
    control_thresholds: Any = None,
    data_note: str = "",
) -> MiningReport:
    """Compare two models' scores on the same targets (rows aligned); with ``control_scores`` a
    third (the random-subset fine-tune, at ``control_thresholds``) fills the ``*_control`` columns."""
    from sklearn.metrics import average_precision_score, f1_score

    labels = [str(x) for x in labels]
    targets = np.asarray(targets).astype(np.uint8)
    n_labels = len(labels)
    th_base = _threshold_array(thresholds, n_labels)
    th_ft = _threshold_array(thresholds if fine_tuned_thresholds is None else fine_tuned_thresholds, n_labels)
    pred_base = np.asarray(base_scores) >= th_base[None, :]
    pred_ft = np.asarray(fine_tuned_scores) >= th_ft[None, :]
    if pred_base.shape != targets.shape or pred_ft.shape != targets.shape:
        raise ValueError(
            f"mining report: targets {targets.shape}, base {pred_base.shape}, fine-tuned {pred_ft.shape} differ"
        )
    f1_b = f1_score(targets, pred_base, average=None, zero_division=0)
    f1_f = f1_score(targets, pred_ft, average=None, zero_division=0)
    rows = []
    for j, label in enumerate(labels):
        has_pos = targets[:, j].any()
        ap_b = float(average_precision_score(targets[:, j], base_scores[:, j])) if has_pos else float("nan")
        ap_f = (
            float(average_precision_score(targets[:, j], fine_tuned_scores[:, j]))
            if has_pos
            else float("nan")
        )
        rows.append(
            {
                "label": label,
                "support": int(targets[:, j].sum()),
                "f1_base": float(f1_b[j]),
                "f1_fine_tuned": float(f1_f[j]),
                "ap_base": ap_b,
                "ap_fine_tuned": ap_f,
            }
        )
    keys = combination_keys(targets, labels)
    counts = Counter(keys)
    acc_b = _exact_match_by_combination(pred_base, targets, keys)
    acc_f = _exact_match_by_combination(pred_ft, targets, keys)
    rarest = sorted(counts, key=lambda k: (counts[k], k))[:n_combinations]
    combos = [
        {"combination": k, "count": counts[k], "acc_base": acc_b[k], "acc_fine_tuned": acc_f[k]}
        for k in rarest
    ]
    if fine_tuned_thresholds is None:
        note = "threshold " + (f"{th_base[0]:g}" if np.all(th_base == th_base[0]) else "per label (shared)")
    else:
        note = "each model's own calibrated thresholds"
    exact_b = (pred_base == targets.astype(bool)).all(axis=1)
    exact_f = (pred_ft == targets.astype(bool)).all(axis=1)
    pairs = []
    for a in range(n_labels):
        for b in range(a + 1, n_labels):
            both = targets[:, a].astype(bool) & targets[:, b].astype(bool)
            if both.any():
                pairs.append((int(both.sum()), f"{labels[a]}+{labels[b]}", both))
    pairs.sort(key=lambda p: (p[0], p[1]))
    pair_rows = [
        {
            "pair": key,
            "count": n,
            "acc_base": float(exact_b[m].mean()),
            "acc_fine_tuned": float(exact_f[m].mean()),
        }
        for n, key, m in pairs[:n_combinations]
    ]
    report = MiningReport(
        threshold_note=note,
        label_rows=rows,
        combination_rows=combos,
        pair_rows=pair_rows,
        data_note=data_note,
    )
    if control_scores is None:
        return report
    control_scores = np.asarray(control_scores)
    th_c = _threshold_array(thresholds if control_thresholds is None else control_thresholds, n_labels)
    pred_c = control_scores >= th_c[None, :]
    if pred_c.shape != targets.shape:
        raise ValueError(f"mining report: targets {targets.shape}, control {pred_c.shape} differ")
    f1_c = f1_score(targets, pred_c, average=None, zero_division=0)
    for j, r in enumerate(rows):
        r["f1_control"] = float(f1_c[j])
        has_pos = targets[:, j].any()
        r["ap_control"] = (
            float(average_precision_score(targets[:, j], control_scores[:, j])) if has_pos else float("nan")
        )
    acc_c = _exact_match_by_combination(pred_c, targets, keys)
    for r in combos:
        r["acc_control"] = acc_c[r["combination"]]
    exact_c = (pred_c == targets.astype(bool)).all(axis=1)
    for (_, _, m), r in zip(pairs[:n_combinations], pair_rows, strict=True):
        r["acc_control"] = float(exact_c[m].mean())
    report.has_control = True
    return report


# ---- the three-stage pipeline ----------------------------------------------------------------------


def _train_in_nested_run(cfg: Any, stage: str, parent_run_id: str) -> Any:
    """run_training under a child run of the mining parent (the runner logs into the active run)."""
    import mlflow

    from mlc_ray.train.runner import run_training

    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id):
        mlflow.set_tag("mlc_ray.mining.stage", stage)
        return run_training(cfg)


def run_mining_pipeline(cfg: Any) -> Any:
    """Base training -> score the train split -> mine -> fine-tune; returns the fine-tuned TrainResult.

    One parent MLflow run (``<run_name>-mining``) holds three nested runs (``base``, ``score``,
    ``fine_tune``), the mined manifest artifact (``mining/mined_manifest.csv``, with reasons) and the
    before/after report (``mining/mining_report.md`` and ``.csv``).
    """
    import mlflow

    from mlc_ray import storage
    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.demo import ensure_demo_data
    from mlc_ray.data.manifest import split_train_val
    from mlc_ray.train.data import load_train_val
    from mlc_ray.train.scoring import score_manifest

    mcfg: MiningConfig = cfg.mining
    work = storage.join(cfg.run_dir, "mining")

    # [0] one explicit train/val split, written out, so base and fine-tune see the same val set
    data_uri = str(cfg.data) if cfg.data is not None else ensure_demo_data()
    split = load_train_val(
        data_uri, val_data=cfg.val_data, labels=cfg.labels, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    train, val_all, vocabulary = split.train, split.val, list(split.vocabulary)
    # the report's held-out rows: no stage trains on them, picks a checkpoint or fits a threshold on them
    val, holdout = split_train_val(
        dataclasses.replace(val_all, splits=[None] * len(val_all)),
        val_fraction=mcfg.holdout_fraction,
        seed=cfg.seed,
    )
    split_uri = storage.join(work, "split_manifest.csv")
    _write_split_manifest(train, val, split_uri, vocabulary=vocabulary)
    holdout_uri = storage.join(work, "holdout_manifest.csv")
    holdout.write(holdout_uri, write_labels_file=False)

    from mlc_ray.train.tracking import resolve_tracking_uri

    # the parent run and every stage's run in the same store (each stage resolves it the same way)
    mlflow.set_tracking_uri(resolve_tracking_uri())
    experiment = getattr(cfg, "experiment", None)
    if experiment:
        mlflow.set_experiment(experiment)
    run_name = getattr(cfg, "run_name", None) or "train"
    with mlflow.start_run(run_name=f"{run_name}-mining") as parent:
        parent_id = parent.info.run_id
        mlflow.set_tag("mlc_ray.mining", "parent")
        mlflow.log_params({f"mining.{k}": v for k, v in dataclasses.asdict(mcfg).items()})

        # [a] base model on the whole training split
        # each stage is its own Ray Train run (its own checkpoints: the fine-tune must not resume the
        # base run's), so rerunning the job resumes whichever stage was interrupted
        base_cfg = cfg.replace(
            data=split_uri,
            val_data=None,
            labels=None,
            mining=dataclasses.replace(mcfg, enabled=False),
            run_name=f"{cfg.run_name}-base",
            output=storage.join(work, "base-model"),
        )
        base = _train_in_nested_run(base_cfg, "base", parent_id)

        # [b] score the training split with the base bundle (Ray Data batch inference)
        with mlflow.start_run(run_name="score", nested=True, parent_run_id=parent_id):
            mlflow.set_tag("mlc_ray.mining.stage", "score")
            scored = score_manifest(base.bundle_dir, train, tta=mcfg.tta, batch_size=mcfg.score_batch_size)
            mlflow.log_metrics({"scored_images": len(scored.indices), "score_errors": len(scored.errors)})
            thresholds_uri = storage.join(base.bundle_dir, "thresholds.json")
            thresholds: Any = Thresholds.load(thresholds_uri) if storage.exists(thresholds_uri) else 0.5
            mined_local = HardSampleMiner(mcfg).select(
                scored.scores, scored.targets, thresholds, scored.labels
            )
            # indices of the scored subset -> rows of the train manifest
            mined = MinedSet(indices=scored.indices[mined_local.indices], reasons=mined_local.reasons)
            mined_uri = storage.join(work, "mined_manifest.csv")
            write_mined_manifest(train, mined, mined_uri)
            mlflow.log_metrics({f"mined_{k}": v for k, v in mined.reason_counts().items()})
            mlflow.log_metric("mined_total", len(mined))
        mlflow.log_text(storage.read_text(mined_uri), "mining/mined_manifest.csv")
        if len(mined) == 0:
            raise ValueError(
                "mining selected no samples: loosen mining.top_k / band / rare_combination_max_frequency "
                "or raise mining.replay_fraction"
            )

        # [c] fine-tune from the base weights on mined (+ replay), validated on the same val split
        ft_uri = storage.join(work, "fine_tune_manifest.csv")
        _write_split_manifest(train.subset(list(mined.indices)), val, ft_uri, vocabulary=vocabulary)
        ft_cfg = cfg.replace(
            data=ft_uri,
            val_data=None,
            labels=None,
            mining=dataclasses.replace(mcfg, enabled=False),
            run_name=f"{cfg.run_name}-fine-tune",
            output=cfg.bundle_dir,  # the job's model is the fine-tuned one
            epochs=mcfg.fine_tune_epochs,
            warmup_epochs=min(cfg.warmup_epochs, float(mcfg.fine_tune_epochs)),
            lr=mcfg.fine_tune_lr if mcfg.fine_tune_lr is not None else cfg.lr / 5.0,
            init_from=base.bundle_dir,
        )
        fine = _train_in_nested_run(ft_cfg, "fine_tune", parent_id)

        # [d] the control: the same fine-tune on a random subset of the training split of the same size
        control = None
        if mcfg.control:
            rows = np.random.default_rng(mcfg.seed).choice(len(train), size=len(mined), replace=False)
            control_uri = storage.join(work, "control_manifest.csv")
            _write_split_manifest(
                train.subset(np.sort(rows).tolist()), val, control_uri, vocabulary=vocabulary
            )
            control_cfg = ft_cfg.replace(
                data=control_uri,
                run_name=f"{cfg.run_name}-control",
                output=storage.join(work, "control-model"),
            )
            control = _train_in_nested_run(control_cfg, "control", parent_id)

        # [e] base vs mined vs random on the held-out rows, each model at its own calibrated thresholds
        with mlflow.start_run(run_name="report", nested=True, parent_run_id=parent_id):
            mlflow.set_tag("mlc_ray.mining.stage", "report")
            models = [base, fine] + ([control] if control is not None else [])
            held = [score_manifest(m.bundle_dir, holdout, batch_size=mcfg.score_batch_size) for m in models]
        common = held[0].indices
        for h in held[1:]:
            common = np.intersect1d(common, h.indices)
        if len(common) == 0:
            raise ValueError("mining report: no held-out image was scored by every model")
        aligned = [h.scores[np.searchsorted(h.indices, common)] for h in held]
        report = mining_report(
            held[0].labels,
            held[0].targets[np.searchsorted(held[0].indices, common)],
            aligned[0],
            aligned[1],
            thresholds=base.thresholds,
            fine_tuned_thresholds=fine.thresholds,
            n_combinations=mcfg.report_combinations,
            control_scores=aligned[2] if control is not None else None,
            control_thresholds=control.thresholds if control is not None else None,
            data_note=(
                f"Held-out rows: {len(common)} of the validation split that no stage trained, selected or "
                f"calibrated on; mined set and random subset: {len(mined)} images each. "
            ),
        )
        fine.mining_report = report
        # the fine-tuned model has seen the whole training split (in its base stage), not only the
        # mined rows: that is the list promotion must keep out of its evaluation data
        fine.train_manifest = train
        text = report.to_markdown()
        log.info("hard-sample mining, base vs mined vs random fine-tune on held-out rows:\n%s", text)
        mlflow.log_text(text, "mining/mining_report.md")
        mlflow.log_text(report.to_csv(), "mining/mining_report.csv")
        for r in report.label_rows:
            mlflow.log_metrics(
                {f"f1_base.{r['label']}": r["f1_base"], f"f1_fine_tuned.{r['label']}": r["f1_fine_tuned"]}
            )
            if "f1_control" in r:
                mlflow.log_metric(f"f1_control.{r['label']}", r["f1_control"])
        mlflow.set_tag("mlc_ray.mining.fine_tune_run_id", fine.mlflow_run_id)
        if control is not None:
            mlflow.set_tag("mlc_ray.mining.control_run_id", control.mlflow_run_id)
    return fine


def _write_split_manifest(train: Any, val: Any, uri: str, *, vocabulary: list[str]) -> None:
    """A manifest with an explicit ``split`` column (train rows, then val rows) and labels.txt beside it
    (``Manifest.write``, the manifest module's one writer)."""
    from mlc_ray.data.manifest import Manifest

    Manifest(
        images=[*train.images, *val.images],
        labels=[list(x) for x in [*train.labels, *val.labels]],
        splits=["train"] * len(train) + ["val"] * len(val),
        vocabulary=list(vocabulary),
    ).write(uri)

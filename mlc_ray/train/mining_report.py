"""The before/after report of hard-sample mining: base, mined fine-tune and random fine-tune on the
held-out rows no stage saw, per label (F1, AP) and for the rarest label combinations and pairs
(exact-match accuracy), each model at its own calibrated thresholds. ``run_mining_pipeline``
(``mlc_ray.train.mining_pipeline``) writes it as a table in the log and as ``mining_report.md`` /
``.csv`` artifacts."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlc_ray.train.mining import combination_keys, threshold_array

__all__ = ["MiningReport", "mining_report"]


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
    th_base = threshold_array(thresholds, n_labels)
    th_ft = threshold_array(thresholds if fine_tuned_thresholds is None else fine_tuned_thresholds, n_labels)
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
    th_c = threshold_array(thresholds if control_thresholds is None else control_thresholds, n_labels)
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

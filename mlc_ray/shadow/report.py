"""The shadow figures per label (rates, relative change, Cohen's kappa, Jaccard), the hold rule and how
the report reads (``report_lines``, ``audit_tags``, ``shadow.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from mlc_ray.shadow.config import TAG_PREFIX

__all__ = ["ShadowLabel", "ShadowReport", "cohen_kappa", "pct"]


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two boolean columns; None when both are constant and equal (undefined)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = len(a)
    if n == 0:
        return None
    po = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe >= 1.0:
        return None if po == 1.0 else 0.0
    return (po - pe) / (1 - pe)


@dataclass
class ShadowLabel:
    label: str
    champion_count: int
    candidate_count: int
    images: int
    kappa: float | None
    jaccard: float | None  # None when neither model lists the label
    judged: bool  # either count >= min_count
    held: bool

    @property
    def champion_rate(self) -> float:
        return self.champion_count / self.images if self.images else 0.0

    @property
    def candidate_rate(self) -> float:
        return self.candidate_count / self.images if self.images else 0.0

    @property
    def change(self) -> float:
        """Relative rate change (candidate - champion) / champion; inf when the champion has none."""
        if self.champion_count == 0:
            return 0.0 if self.candidate_count == 0 else math.inf
        return (self.candidate_count - self.champion_count) / self.champion_count

    def to_dict(self) -> dict:
        change = self.change
        return {
            "label": self.label,
            "champion_rate": round(self.champion_rate, 6),
            "candidate_rate": round(self.candidate_rate, 6),
            "champion_count": self.champion_count,
            "candidate_count": self.candidate_count,
            "change": None if math.isinf(change) else round(change, 6),
            "kappa": None if self.kappa is None else round(self.kappa, 6),
            "jaccard": None if self.jaccard is None else round(self.jaccard, 6),
            "judged": self.judged,
            "held": self.held,
        }


@dataclass
class ShadowReport:
    """The shadow figures of one promotion: what ``report_lines`` prints and ``audit_tags`` records."""

    input: str
    sample: int  # asked for
    seed: int
    listed: int  # keys under the input
    images: int  # sampled images both models tagged without error
    errors: int  # sampled images that were error rows (for either model)
    champion: str
    candidate: str
    max_rate_change: float | None
    min_count: int
    labels: list[ShadowLabel] = field(default_factory=list)
    force: bool = False
    skipped: str = ""  # why no comparison ran (no champion)
    report_uri: str = ""  # runs:/ID/shadow (MLflow) or the output folder
    contact_sheet: str = ""
    runs: dict[str, str] = field(default_factory=dict)  # role -> tag-table run id

    @property
    def held_labels(self) -> list[ShadowLabel]:
        return [lab for lab in self.labels if lab.held]

    @property
    def held(self) -> bool:
        return bool(self.held_labels)

    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        if self.max_rate_change is None:
            return "report only"
        if not self.held:
            return "pass"
        return "held, overridden by --force" if self.force else "held"

    def hold_reason(self) -> str:
        worst = sorted(self.held_labels, key=lambda lab: -abs(lab.change))
        parts = [
            f"'{lab.label}' {lab.champion_rate:.3f} -> {lab.candidate_rate:.3f} ({pct(lab.change)})"
            for lab in worst[:3]
        ]
        return (
            f"shadow: {len(worst)} label rate(s) on {self.images} unlabelled images change by more than "
            f"{self.max_rate_change:g} (relative, >= {self.min_count} images): {', '.join(parts)}"
        )

    def report_lines(self) -> list[str]:
        if self.skipped:
            return [f"shadow     skipped: {self.skipped}"]
        head = (
            f"shadow     {self.input}: {self.images} of {self.listed} images (sample {self.sample}, seed "
            f"{self.seed}; {self.errors} error rows), champion {self.champion} vs candidate {self.candidate}"
        )
        rule = (
            f"limit: relative rate change {self.max_rate_change:g} on labels with >= {self.min_count} images"
            if self.max_rate_change is not None
            else "no --max-rate-change: report only"
        )
        lines = [head, f"           {rule}; verdict: {self.verdict()}"]
        width = max([5, *(len(lab.label) for lab in self.labels)])
        lines.append(f"           {'label':<{width}}  champion  candidate    change   kappa  jaccard")
        for lab in self.labels:
            kappa = "-" if lab.kappa is None else f"{lab.kappa:.3f}"
            jac = "-" if lab.jaccard is None else f"{lab.jaccard:.3f}"
            flag = "  HELD" if lab.held else ("" if lab.judged else "  (too few)")
            lines.append(
                f"           {lab.label:<{width}}  {lab.champion_rate:8.3f}  {lab.candidate_rate:9.3f}  "
                f"{pct(lab.change):>8}  {kappa:>6}  {jac:>7}{flag}"
            )
        if self.contact_sheet:
            lines.append(f"           most-disagreeing images: {self.contact_sheet}")
        if self.report_uri:
            lines.append(f"           report: {self.report_uri}")
        return lines

    def audit_tags(self) -> dict[str, str]:
        """Compact tags: a one-line summary, the verdict, and the per-label figures as JSON (the
        labels that moved most first, at most 40, so the value stays under MLflow's tag limit)."""
        if self.skipped:
            return {TAG_PREFIX: f"skipped: {self.skipped}"}
        moved = sorted(self.labels, key=lambda lab: -(abs(lab.change) if lab.judged else -1))[:40]
        tags = {
            TAG_PREFIX: (
                f"{self.verdict()}: {self.images} images of {self.input} (seed {self.seed}); "
                f"max rate change {self.max_rate_change if self.max_rate_change is not None else '-'}"
                + (f"; {self.hold_reason()}" if self.held else "")
            ),
            f"{TAG_PREFIX}.verdict": self.verdict(),
            f"{TAG_PREFIX}.images": str(self.images),
            f"{TAG_PREFIX}.labels": json.dumps([lab.to_dict() for lab in moved], separators=(",", ":")),
        }
        if self.report_uri:
            tags[f"{TAG_PREFIX}.report"] = self.report_uri
        return tags

    def history(self) -> dict[str, str]:
        """What the ``promotion.log`` entry keeps: the summary line (the per-label JSON stays in the
        latest tags and the report, so the entry stays under MLflow's tag limit)."""
        return {TAG_PREFIX: self.audit_tags()[TAG_PREFIX][:1000]}

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "sample": self.sample,
            "seed": self.seed,
            "listed": self.listed,
            "images": self.images,
            "errors": self.errors,
            "champion": self.champion,
            "candidate": self.candidate,
            "max_rate_change": self.max_rate_change,
            "min_count": self.min_count,
            "verdict": self.verdict(),
            "runs": self.runs,
            "labels": [lab.to_dict() for lab in self.labels],
        }


def pct(change: float) -> str:
    return "+inf" if math.isinf(change) else f"{change:+.1%}"

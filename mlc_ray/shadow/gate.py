"""``shadow_gate``: the promotion gate that runs the shadow comparison on the decision's two versions
and holds the decision when a label's rate moves too much (``--force`` overrides)."""

from __future__ import annotations

import logging
from typing import Any

from mlc_ray.shadow.config import ShadowConfig
from mlc_ray.shadow.report import ShadowReport
from mlc_ray.shadow.run import run_shadow
from mlc_ray.shadow.sample import sample_input

__all__ = ["shadow_gate"]

log = logging.getLogger(__name__)


def shadow_gate(cfg: ShadowConfig, *, cache_dir: str | None = None) -> Any:
    """The ``gate`` for ``registry.promote``: run the shadow comparison on the decision's two
    versions, attach the report to the decision, and hold it when a label's rate moves too much.
    The sample is drawn now, so a wrong ``--shadow`` URI fails before any model is evaluated."""
    sample = sample_input(cfg.input, cfg.sample, cfg.seed)
    log.info(
        "shadow: %d of %d images under %s sampled (seed %d)", len(sample[0]), sample[1], cfg.input, cfg.seed
    )

    def gate(decision: Any) -> None:
        if not decision.champion_version:
            report = ShadowReport(
                input=cfg.input,
                sample=cfg.sample,
                seed=cfg.seed,
                listed=0,
                images=0,
                errors=0,
                champion="",
                candidate="",
                max_rate_change=cfg.max_rate_change,
                min_count=cfg.min_count,
                skipped="no champion to compare with (first promotion)",
            )
            decision.evidence.append(report)
            return
        champion = f"models:/{decision.name}/{decision.champion_version}"
        candidate = decision.candidate_source or f"models:/{decision.name}/{decision.candidate_version}"
        report = run_shadow(cfg, champion, candidate, cache_dir=cache_dir, sample=sample)
        decision.evidence.append(report)
        if not report.held:
            return
        if cfg.force:
            decision.reason += f"; {report.hold_reason()}: overridden by --force"
        elif decision.promoted:
            decision.promoted = False
            decision.reason = report.hold_reason() + " (--force to promote anyway)"
        else:
            decision.reason += f"; {report.hold_reason()}"

    return gate

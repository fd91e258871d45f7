"""The record of every promotion and rollback: ``PromotionDecision``, its audit tags, and ``rollback``.

Both versions of a decision get the latest ``promotion.*`` tags and one ``promotion.log.<UTC
time>.<id>`` JSON entry per event (``mlc_ray.alias_history`` reads them back as the champion's
history). ``rollback`` swaps ``champion`` and ``previous-champion`` after verifying the version it
returns to.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlc_ray.errors import UserError
from mlc_ray.registry.resolve import resolve_model
from mlc_ray.registry.versions import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    ArtifactIntegrityError,
    alias_map,
    clip_tag,
    mlflow_client,
    require_model,
)

log = logging.getLogger("mlc_ray.registry")


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def acting_user() -> str:
    """Who acts on the registry: the MLflow user when the server authenticates, else the OS user."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return f"{getpass.getuser()} (local)"
    except (KeyError, OSError):
        return "unknown"


@dataclass
class PromotionDecision:
    """What promotion decided and why; ``report()`` is the one-screen summary the job prints."""

    name: str
    action: str  # "promote" | "rollback"
    promoted: bool  # champion moved (or would move, under dry_run)
    reason: str
    candidate_version: str | None = None
    champion_version: str | None = None  # champion before the decision
    metric: str = "macro_f1"
    candidate_value: float | None = None
    champion_value: float | None = None
    min_delta: float = 0.0
    max_label_drop: float = 0.03
    label_drops: dict[str, float] = field(default_factory=dict)  # label -> champion F1 - candidate F1 (> 0)
    eval_data: str | None = None
    n_images: int = 0
    n_errors: int = 0
    train_overlap: str = ""  # how many eval images the candidate was trained on, and how that was checked
    thresholds_fit: str = ""  # set when the eval rows are the ones the candidate's thresholds were fitted on
    dry_run: bool = False
    candidate_source: str | None = None  # models:/STAGING/VERSION when the candidate is another model's
    # further evidence a promote() gate attached (the shadow comparison, mlc_ray/shadow.py): objects
    # with report_lines() -> list[str], audit_tags() -> dict (latest tags) and history() -> dict
    # (short entries for the promotion.log record)
    evidence: list[Any] = field(default_factory=list)
    at: str = field(default_factory=now_utc)
    by: str = field(default_factory=acting_user)
    _event_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6], repr=False)
    _seq: int = field(default_factory=time.time_ns, repr=False)  # orders events within one second

    @property
    def exit_code(self) -> int:
        return 0 if self.promoted else 3

    def report(self) -> str:
        lines = []
        if self.action == "rollback":
            lines.append(f"rollback of '{self.name}'{' (dry run)' if self.dry_run else ''}")
        else:
            champ = f"v{self.champion_version} (champion)" if self.champion_version else "no champion yet"
            cand = f"v{self.candidate_version}"
            if self.candidate_source:
                cand = self.candidate_source + (
                    f" (copied as v{self.candidate_version})" if self.promoted and not self.dry_run else ""
                )
            lines.append(
                f"promotion of '{self.name}' {cand} vs {champ}{' (dry run)' if self.dry_run else ''}"
            )
            if self.eval_data:
                lines.append(
                    f"eval data  {self.eval_data}: {self.n_images} images, {self.n_errors} unreadable"
                )
            if self.train_overlap:
                lines.append(f"held out   {self.train_overlap}")
            if self.thresholds_fit:
                lines.append(f"thresholds {self.thresholds_fit}")
            if self.candidate_value is not None:
                cand = f"{self.candidate_value:.4f}"
                champ_v = "-" if self.champion_value is None else f"{self.champion_value:.4f}"
                delta = (
                    ""
                    if self.champion_value is None
                    else f"  delta {self.candidate_value - self.champion_value:+.4f} (needs >= {self.min_delta:+.4f})"
                )
                lines.append(f"{self.metric:<10} candidate {cand}  champion {champ_v}{delta}")
            if self.label_drops:
                worst = sorted(self.label_drops.items(), key=lambda kv: -kv[1])[:8]
                drops = ", ".join(f"{label} -{d:.3f}" for label, d in worst)
                lines.append(f"F1 drops   (limit {self.max_label_drop:.3f}): {drops}")
        for item in self.evidence:
            lines.extend(item.report_lines())
        verdict = "PROMOTED" if self.promoted else "REFUSED"
        if self.action == "rollback":
            verdict = "ROLLED BACK" if self.promoted else "NOT ROLLED BACK"
        if self.dry_run:
            verdict = f"would be {verdict.lower()} (dry run: nothing changed)"
        lines.append(f"decision   {verdict}: {self.reason}")
        return "\n".join(lines)

    def audit_tags(self, role: str) -> dict[str, str]:
        tags = {
            "promotion.at": self.at,
            "promotion.action": self.action,
            "promotion.role": role,
            "promotion.decision": "promoted" if self.promoted else "refused",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.candidate_version": str(self.candidate_version or ""),
            "promotion.champion_version": str(self.champion_version or ""),
            "promotion.by": self.by,
        }
        if self.candidate_source:
            tags["promotion.candidate_source"] = self.candidate_source
        if self.action == "rollback":
            tags["promotion.decision"] = "rolled-back" if self.promoted else "refused"
        if self.candidate_value is not None:
            tags["promotion.candidate_value"] = f"{self.candidate_value:.6f}"
        if self.champion_value is not None:
            tags["promotion.champion_value"] = f"{self.champion_value:.6f}"
        if self.eval_data:
            tags["promotion.eval_data"] = self.eval_data
        if self.train_overlap:
            tags["promotion.train_overlap"] = self.train_overlap
        # One history entry per event, so earlier decisions are not overwritten by later ones.
        history_key = f"promotion.log.{self.at.replace(':', '').replace('-', '')}.{self._event_id}"
        record = {k: tags[k] for k in tags if k not in ("promotion.at",)}
        record["promotion.seq"] = str(self._seq)
        for item in self.evidence:
            tags.update(item.audit_tags())
            record.update(item.history())
        tags[history_key] = json.dumps(record, sort_keys=True, separators=(",", ":"))
        return tags


def write_audit(decision: PromotionDecision, roles: Mapping[str, str | tuple[str, str] | None]) -> None:
    """``roles``: role -> version of ``decision.name``, or (model, version) for another model's."""
    client = mlflow_client()
    for role, where in roles.items():
        if where is None:
            continue
        model, version = where if isinstance(where, tuple) else (decision.name, where)
        for key, value in decision.audit_tags(role).items():
            client.set_model_version_tag(model, version, key, clip_tag(value))


def rollback(
    name: str, *, dry_run: bool = False, cache_dir: str | os.PathLike[str] | None = None
) -> PromotionDecision:
    """Make ``previous-champion`` the champion again (verified first); the two aliases swap."""
    require_model(name)
    aliases = alias_map(name)
    previous, current = aliases.get(PREVIOUS_CHAMPION), aliases.get(CHAMPION)
    if previous is None:
        listed = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "(none)"
        raise UserError(
            f"model '{name}' has no '{PREVIOUS_CHAMPION}' alias to roll back to; aliases: {listed}"
        )
    decision = PromotionDecision(
        name=name,
        action="rollback",
        promoted=True,
        reason=f"champion v{current} -> v{previous} (previous-champion); previous-champion -> v{current}",
        candidate_version=previous,
        champion_version=current,
        dry_run=dry_run,
    )
    with tempfile.TemporaryDirectory(prefix="mlc_ray-rollback-") as tmp:
        try:
            resolve_model(f"models:/{name}/{previous}", cache_dir=cache_dir or tmp)
        except ArtifactIntegrityError as exc:
            decision.promoted = False
            decision.reason = f"integrity check failed: {exc}"
            if not dry_run:
                write_audit(decision, {"candidate": previous, "champion": current})
            raise
    if dry_run:
        return decision
    client = mlflow_client()
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current)
    else:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    write_audit(decision, {"candidate": previous, "champion": current})
    log.info("%s: rolled back champion v%s -> v%s", name, current, previous)
    return decision

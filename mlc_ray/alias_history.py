"""The history of ``champion`` for one registered model, read back from promotion's audit tags.

Every promotion decision and rollback writes one ``promotion.log.<UTC time>.<event id>`` tag (a
JSON record) on each version it concerns (``registry.PromotionDecision.audit_tags``). The same
event therefore appears on the candidate and on the champion, and a version copied from a staging
model carries its earlier records along; one event id is one entry here. MLflow keeps no history
of its own for aliases, so this is the record: who moved ``champion`` from which version to which,
when, on what evidence, and what was refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["AliasMove", "alias_history", "format_history"]

LOG_PREFIX = "promotion.log."


@dataclass(frozen=True)
class AliasMove:
    """One decision about ``champion``: a move (promoted, rolled back) or a refusal (no move)."""

    at: str  # ISO time, UTC
    event: str  # the record's key suffix: <time>.<id>
    action: str  # promote | rollback
    decision: str  # promoted | refused | rolled-back
    by: str  # the MLflow user (or OS user) that ran promotion; '?' for records older than this field
    champion_before: str | None  # version that held champion before the decision
    candidate: str | None  # version the decision was about (the production copy once promoted)
    candidate_source: str | None  # models:/STAGING/VERSION when the candidate came from a staging model
    reason: str
    metric: str | None
    candidate_value: str | None
    champion_value: str | None
    eval_data: str | None

    @property
    def moved(self) -> bool:
        return self.decision in ("promoted", "rolled-back") and self.candidate != self.champion_before

    @property
    def champion_after(self) -> str | None:
        return self.candidate if self.moved else self.champion_before

    def line(self) -> str:
        before = f"v{self.champion_before}" if self.champion_before else "(none)"
        after = f"v{self.champion_after}" if self.champion_after else "(none)"
        cand = f"v{self.candidate}" if self.candidate else "?"
        if self.candidate_source:
            cand += f" (from {self.candidate_source})"
        move = f"champion {before} -> {after}" if self.moved else f"champion stays {before}, {cand} refused"
        if self.moved and self.candidate_source:
            move += f" (from {self.candidate_source})"
        evidence = []
        if self.candidate_value is not None:
            champ = self.champion_value if self.champion_value is not None else "-"
            evidence.append(f"{self.metric} {self.candidate_value} vs champion {champ}")
        if self.eval_data:
            evidence.append(f"on {self.eval_data}")
        text = f"{self.at}  {self.by:<14} {self.action:<8} {self.decision:<11} {move}"
        return f"{text}; {' '.join(evidence) + ': ' if evidence else ''}{self.reason}"


def _at_from_key(event: str) -> str:
    stamp = event.split(".", 1)[0]  # 20261201T235000Z
    try:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return stamp


def _versions(client: Any, name: str) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        out += list(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def alias_history(name: str) -> list[AliasMove]:
    """Every recorded decision about ``champion`` on ``name``, newest first (dry runs record none)."""
    from mlflow import MlflowClient

    from mlc_ray.registry import require_model

    require_model(name)
    records: dict[str, dict[str, Any]] = {}
    for mv in _versions(MlflowClient(), name):
        for key, value in (mv.tags or {}).items():
            if not key.startswith(LOG_PREFIX):
                continue
            try:
                record = json.loads(value)
            except ValueError:
                continue  # a clipped or hand-edited tag: not a record
            records.setdefault(key[len(LOG_PREFIX) :], record)
    moves = []
    for event, r in records.items():
        moves.append(
            AliasMove(
                at=_at_from_key(event),
                event=event,
                action=r.get("promotion.action", "?"),
                decision=r.get("promotion.decision", "?"),
                by=r.get("promotion.by") or "?",
                champion_before=r.get("promotion.champion_version") or None,
                candidate=r.get("promotion.candidate_version") or None,
                candidate_source=r.get("promotion.candidate_source") or None,
                reason=r.get("promotion.reason", ""),
                metric=r.get("promotion.metric"),
                candidate_value=r.get("promotion.candidate_value"),
                champion_value=r.get("promotion.champion_value"),
                eval_data=r.get("promotion.eval_data"),
            )
        )
    # The key's time has 1 s resolution; the event id breaks ties only arbitrarily, so equal times
    # keep the order of the records' own sequence number when there is one.
    moves.sort(key=lambda m: (m.at, int(records[m.event].get("promotion.seq", 0)), m.event), reverse=True)
    return moves


def format_history(name: str, moves: list[AliasMove]) -> str:
    if not moves:
        return f"'{name}': no promotion or rollback recorded (promotion.log.* tags)"
    head = f"champion history of '{name}', newest first ({len(moves)} decisions)"
    return "\n".join([head, *(m.line() for m in moves)])

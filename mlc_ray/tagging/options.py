"""Tag-time options: which labels a row lists, on top of the model's calibrated thresholds.

Hosted taggers let the caller tighten the output (Rekognition's ``MinConfidence`` / ``MaxLabels``);
these are the same knobs for the tag table, applied in the ``Predictor`` to every image:

* ``min_score`` S: a label is listed only when its score >= max(its threshold, S);
* ``top_k`` K: at most K labels per image, highest scores first;
* ``labels`` / ``exclude_labels``: only this subset of the vocabulary is ever listed.

``scores`` always keeps every label, so a reader can re-apply any rule later. The options go into
every row (the ``tag_options`` column, canonical JSON) and into the run identity (``key()``), so a
run with other options is another run, never a mix. Drift (``mlc_ray.tagging.report``) compares the
scores against the *calibrated* thresholds, whatever the options: the model's behaviour, not the
caller's filter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlc_ray.cli import UserError

__all__ = ["TagOptions", "parse_label_list"]


def parse_label_list(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ("a", "b"); None / "" -> None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))
    return names or None


@dataclass(frozen=True)
class TagOptions:
    """The tag-time options of one run (``None`` / empty = not used)."""

    min_score: float | None = None
    top_k: int | None = None
    labels: tuple[str, ...] | None = None
    exclude_labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        from mlc_ray.config import ConfigError

        if self.min_score is not None and not 0.0 <= float(self.min_score) <= 1.0:
            raise ConfigError(f"min_score: expected a score in [0, 1], got {self.min_score!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ConfigError(f"top_k: expected an integer >= 1, got {self.top_k!r}")
        object.__setattr__(self, "labels", parse_label_list(self.labels))
        object.__setattr__(self, "exclude_labels", parse_label_list(self.exclude_labels))

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.min_score, self.top_k, self.labels, self.exclude_labels))

    def to_dict(self) -> dict:
        """Only the options given, in a fixed order (what the row's ``tag_options`` holds)."""
        out: dict = {}
        if self.min_score is not None:
            out["min_score"] = float(self.min_score)
        if self.top_k is not None:
            out["top_k"] = int(self.top_k)
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.exclude_labels is not None:
            out["exclude_labels"] = list(self.exclude_labels)
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> TagOptions:
        data = dict(data or {})
        return cls(
            min_score=data.get("min_score"),
            top_k=data.get("top_k"),
            labels=data.get("labels"),
            exclude_labels=data.get("exclude_labels"),
        )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): ``{}`` when no option is given."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def check(self, vocabulary: Sequence[str]) -> None:
        """``UserError`` naming every label of ``labels`` / ``exclude_labels`` the model does not know,
        or a subset that leaves no label at all."""
        known = set(vocabulary)
        for flag, names in (("--labels", self.labels), ("--exclude-labels", self.exclude_labels)):
            unknown = [n for n in names or () if n not in known]
            if unknown:
                raise UserError(
                    f"{flag}: {', '.join(repr(n) for n in unknown)} not in the model's labels "
                    f"({', '.join(vocabulary)})"
                )
        if not self.allowed_mask(vocabulary).any():
            raise UserError("--labels / --exclude-labels leave no label to tag")

    def allowed_mask(self, vocabulary: Sequence[str]) -> np.ndarray:
        """(L,) bool: the labels a row may list."""
        allowed = np.ones(len(vocabulary), dtype=bool)
        if self.labels is not None:
            keep = set(self.labels)
            allowed &= np.array([n in keep for n in vocabulary], dtype=bool)
        if self.exclude_labels is not None:
            drop = set(self.exclude_labels)
            allowed &= np.array([n not in drop for n in vocabulary], dtype=bool)
        return allowed

    def select(self, scores: np.ndarray, thresholds: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """(N, L) bool: the labels each row lists. ``allowed`` is ``allowed_mask(vocabulary)``."""
        cut = thresholds if self.min_score is None else np.maximum(thresholds, float(self.min_score))
        predicted = (scores >= cut[None, :]) & allowed[None, :]
        if self.top_k is not None and self.top_k < scores.shape[1]:
            # keep the K highest-scoring of the listed labels (stable: ties keep model order)
            masked = np.where(predicted, scores, -np.inf)
            order = np.argsort(-masked, axis=1, kind="stable")[:, : self.top_k]
            keep = np.zeros_like(predicted)
            np.put_along_axis(keep, order, True, axis=1)
            predicted &= keep
        return predicted

"""Promotion: evaluate a candidate and the champion on the same held-out data, move ``champion`` on evidence.

``promotion_gate`` is the decision itself, a pure function of the two evaluations (no MLflow, no
I/O): the candidate wins when its ``metric`` is >= the champion's + ``min_delta`` and no label's F1
drops by more than ``max_label_drop``. ``promote`` does everything around it: resolve both
versions (sha256-verified), choose the evaluation data (``mlc_ray.registry.evidence``), refuse data
the candidate was trained on, evaluate both bundles, apply the gate, move the aliases (copying a
staging candidate into the production model first) and write the audit tags
(``mlc_ray.registry.audit``) on both versions either way.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlc_ray.errors import UserError
from mlc_ray.registry.audit import PromotionDecision, write_audit
from mlc_ray.registry.evidence import EVAL_DATA_TAG, load_eval_manifest, select_eval_rows, training_overlap
from mlc_ray.registry.resolve import parse_model_uri, resolve_model
from mlc_ray.registry.versions import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    PROMOTED_FROM_TAG,
    ArtifactIntegrityError,
    alias_map,
    get_version,
    mlflow_client,
    require_model,
)

__all__ = ["GateVerdict", "promote", "promotion_gate"]

log = logging.getLogger("mlc_ray.registry")


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer for one candidate against one champion, on the same evaluation data."""

    promoted: bool
    reason: str
    candidate_value: float
    champion_value: float
    label_drops: dict[str, float] = field(default_factory=dict)  # label -> champion F1 - candidate F1 (> 0)


def promotion_gate(
    candidate: Any,
    champion: Any,
    *,
    metric: str = "macro_f1",
    min_delta: float = 0.0,
    max_label_drop: float = 0.03,
) -> GateVerdict:
    """Whether ``candidate`` may replace ``champion``; both are evaluations of the same data
    (``mlc_ray.evaluation.EvalResult``: ``.metric(name)`` and ``.per_label_f1``, each at its own
    thresholds).

    Refused when ``metric`` is below the champion's + ``min_delta``, or when any label's F1 drops by
    more than ``max_label_drop`` (a label the candidate lacks counts as F1 0); every label whose F1
    drops at all is listed in ``label_drops``.
    """
    cand_value, champ_value = candidate.metric(metric), champion.metric(metric)
    cand_f1: Mapping[str, float] = candidate.per_label_f1
    label_drops = {}
    for label, f1 in champion.per_label_f1.items():
        drop = f1 - cand_f1.get(label, 0.0)
        if drop > 0:
            label_drops[label] = drop
    dropped = {k: v for k, v in label_drops.items() if v > max_label_drop + 1e-12}
    if cand_value < champ_value + min_delta:
        promoted, reason = (
            False,
            f"{metric} {cand_value:.4f} < champion {champ_value:.4f} + min delta {min_delta:.4f}",
        )
    elif dropped:
        worst = max(dropped, key=dropped.__getitem__)
        promoted, reason = (
            False,
            (
                f"F1 of {len(dropped)} label(s) drops by more than {max_label_drop:.3f} "
                f"(worst: '{worst}' -{dropped[worst]:.3f})"
            ),
        )
    else:
        promoted, reason = (
            True,
            (
                f"{metric} {cand_value:.4f} >= champion {champ_value:.4f} "
                f"+ {min_delta:.4f} and no label drops more than {max_label_drop:.3f}"
            ),
        )
    return GateVerdict(promoted, reason, cand_value, champ_value, label_drops)


def thresholds_fit_note(bundle_dir: str, version: str, metric: str) -> str:
    """What the promotion report says when the evaluation rows are the ones ``version``'s thresholds
    were fitted on (its bundle's ``metrics.json`` says so in ``thresholds_fitted_on``): the figure at
    those thresholds is in-sample, and the cross-fitted figure training measured on the same rows is
    the honest one. "" when the bundle does not say its thresholds were fitted on validation rows."""
    from mlc_ray.bundle import BundleError, ModelBundle

    try:
        metrics = ModelBundle(bundle_dir).metrics()
    except (BundleError, OSError, ValueError):
        return ""
    fitted = metrics.get("thresholds_fitted_on")
    if fitted is None:  # a bundle from before the field: its line for people says the same
        prose = str((metrics.get("measured_on") or {}).get("thresholds.json", ""))
        found = re.match(r"fitted on all (\d+) validation rows", prose)
        fitted = {"rows": "validation", "count": int(found.group(1))} if found else None
    if not isinstance(fitted, dict) or fitted.get("rows") != "validation":
        return ""
    count = fitted.get("count")
    where = f"all {count} validation rows" if isinstance(count, int) else "the validation rows"
    note = f"{version}'s were fitted on these rows (fitted on {where}): its {metric} here is in-sample"
    cross = (metrics.get("calibrated") or {}).get(metric)
    if isinstance(cross, int | float):
        note += f" (cross-fitted on them at training: {cross:.4f})"
    return note + "; pass --eval-data with rows no version was fitted on for a held-out comparison"


def promote(
    name: str,
    eval_data: str | None = None,
    *,
    candidate: str = CHALLENGER,
    metric: str = "macro_f1",
    min_delta: float = 0.0,
    max_label_drop: float = 0.03,
    split: str = "auto",
    dry_run: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    allow_train_overlap: bool = False,
    gate: Callable[[PromotionDecision], None] | None = None,
) -> PromotionDecision:
    """Evaluate ``candidate`` (a version number or an alias) and the champion on the same data.

    The champion alias moves to the candidate only if its ``metric`` is >= the champion's +
    ``min_delta`` and no label's F1 drops by more than ``max_label_drop``; the old champion keeps
    alias ``previous-champion`` and ``challenger`` is removed from the promoted version. Both
    versions get ``promotion.*`` audit tags (not under ``dry_run``). A version whose artifacts
    do not match their sha256 tags raises ``ArtifactIntegrityError`` (the refusal is tagged too).
    ``eval_data`` defaults to the candidate's recorded evaluation data (tag ``eval_data_uri``: its
    ``--val-data`` manifest or its split's val rows); a version registered without one falls back
    to the val rows of its training manifest (tag ``manifest_uri``), which must then have a split
    column. Evaluation data holding any of the candidate's training images (same URI or same
    bytes, tag ``train_images_uri``) is a ``UserError`` naming the count, unless
    ``allow_train_overlap``; the decision's report and audit tags then say so. ``gate`` (the
    shadow comparison, ``mlc_ray.shadow.shadow_gate``) runs after the labelled evaluation, before
    any alias moves: it may turn the decision into a refusal and attaches its figures
    (``decision.evidence``) to the report and the audit tags.
    """
    from mlc_ray.evaluation import evaluate_bundle, read_images

    # A candidate ``models:/STAGING@ALIAS`` (or ``/VERSION``) lives in another registered model: the
    # staging model training writes to, where the server lets only promotion edit ``name``. It is
    # evaluated there and, if it wins, copied into ``name`` (copy_model_version) before @champion moves.
    cand_model = name
    if candidate.startswith("models:/"):
        cand_model, ref_version, ref_alias = parse_model_uri(candidate)
        cand_mv = get_version(cand_model, ref_version, ref_alias)
    else:
        cand_mv = get_version(
            name, candidate if candidate.isdigit() else None, None if candidate.isdigit() else candidate
        )
    cand_version = str(cand_mv.version)
    cross = cand_model != name
    cand_source = f"models:/{cand_model}/{cand_version}" if cross else None
    if cross:
        require_model(name)
    aliases = alias_map(name)
    champ_version = aliases.get(CHAMPION)
    decision = PromotionDecision(
        name=name,
        action="promote",
        promoted=False,
        reason="",
        candidate_version=cand_version,
        champion_version=champ_version,
        metric=metric,
        min_delta=min_delta,
        max_label_drop=max_label_drop,
        dry_run=dry_run,
        candidate_source=cand_source,
    )
    # a wrong --eval-data is an error even when the candidate turns out to be the champion already
    given = load_eval_manifest(eval_data) if eval_data else None
    if cross and champ_version:
        champ_source = (mlflow_client().get_model_version(name, champ_version).tags or {}).get(
            PROMOTED_FROM_TAG
        )
        if champ_source == cand_source:
            decision.reason = f"{cand_source} is already the champion (v{champ_version}); nothing to do"
            decision.promoted = True
            decision.candidate_version = champ_version
            return decision
    if not cross and champ_version == cand_version:
        decision.reason = f"v{cand_version} is already the champion; nothing to do"
        decision.promoted = True
        return decision

    cand_tags = {str(k): str(v) for k, v in (cand_mv.tags or {}).items()}
    eval_uri = eval_data or cand_tags.get(EVAL_DATA_TAG) or cand_tags.get("manifest_uri")
    if not eval_uri:
        raise UserError(
            f"no --eval-data given and {name} v{cand_version} records no evaluation data "
            f"('{EVAL_DATA_TAG}' tag); pass --eval-data MANIFEST held out from its training"
        )
    full = given if given is not None else load_eval_manifest(eval_uri)
    if not eval_data and EVAL_DATA_TAG not in cand_tags and split == "auto" and not full.has_splits:
        raise UserError(
            f"{name} v{cand_version} records no evaluation data and its training manifest {eval_uri} has "
            "no split column, so any of its rows may be a training image; pass --eval-data MANIFEST "
            "held out from its training"
        )
    manifest = select_eval_rows(full, split)
    decision.eval_data = f"{eval_uri} [{split}]"
    images = read_images(manifest.images)
    overlap = training_overlap(cand_tags, manifest, images)
    if not overlap.checked:
        decision.train_overlap = f"not checked: v{cand_version} records no training-image list"
    elif overlap.count == 0:
        decision.train_overlap = (
            f"0 of {len(manifest)} evaluation images are training images of v{cand_version} "
            "(checked by URI and sha256)"
        )
    else:
        counted = (
            f"{overlap.count} of {len(manifest)} evaluation images are training images of "
            f"v{cand_version} ({overlap.by_uri} same URI, {overlap.by_content} same content)"
        )
        if not allow_train_overlap:
            raise UserError(
                f"evaluation data {eval_uri} [{split}]: {counted}; promote on data held out from training "
                "(the version's own: leave out --eval-data), or pass --allow-train-overlap"
            )
        decision.train_overlap = f"{counted}; allowed by --allow-train-overlap: NOT a held-out comparison"
        log.warning("promotion on evaluation data that overlaps training: %s", counted)

    with tempfile.TemporaryDirectory(prefix="mlc_ray-promote-") as tmp:
        # A fresh download (not the shared cache) so what is verified is what the registry holds now.
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        try:
            cand = resolve_model(f"models:/{cand_model}/{cand_version}", cache_dir=cache)
            champ = (
                resolve_model(f"models:/{name}/{champ_version}", cache_dir=cache) if champ_version else None
            )
        except ArtifactIntegrityError as exc:
            decision.reason = f"integrity check failed: {exc}"
            if not dry_run:
                write_audit(decision, {"candidate": (cand_model, cand_version), "champion": champ_version})
            raise
        cand_eval = evaluate_bundle(cand.local_dir, manifest, batch_size=batch_size, images=images)
        decision.candidate_value = cand_eval.metric(metric)
        if not eval_data and eval_uri == cand_tags.get(EVAL_DATA_TAG):
            # the candidate's own recorded validation rows: where training fitted its thresholds
            decision.thresholds_fit = thresholds_fit_note(cand.local_dir, f"v{cand_version}", metric)
        decision.n_images, decision.n_errors = cand_eval.n_images, cand_eval.n_errors
        if champ is None:
            decision.promoted = True
            decision.reason = f"first promotion: '{name}' had no champion, v{cand_version} becomes champion"
        else:
            champ_eval = evaluate_bundle(champ.local_dir, manifest, batch_size=batch_size, images=images)
            verdict = promotion_gate(
                cand_eval, champ_eval, metric=metric, min_delta=min_delta, max_label_drop=max_label_drop
            )
            decision.champion_value = verdict.champion_value
            decision.label_drops.update(verdict.label_drops)
            decision.promoted, decision.reason = verdict.promoted, verdict.reason

    if gate is not None:
        gate(decision)
    if dry_run:
        return decision
    client = mlflow_client()
    staged: dict[str, str | tuple[str, str] | None] = {}
    if decision.promoted:
        if cross:
            # The copy carries the staging version's tags (sha256.*, manifest, lineage) and its artifacts.
            staged["staged-candidate"] = (cand_model, cand_version)
            copied = client.copy_model_version(cand_source, name)
            cand_version = decision.candidate_version = str(copied.version)
            client.set_model_version_tag(name, cand_version, PROMOTED_FROM_TAG, cand_source)
        if champ_version:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champ_version)
        client.set_registered_model_alias(name, CHAMPION, cand_version)
        if not cross and aliases.get(CHALLENGER) == cand_version:
            client.delete_registered_model_alias(name, CHALLENGER)
        log.info(
            "%s: champion %s -> v%s%s",
            name,
            f"v{champ_version}" if champ_version else "(none)",
            cand_version,
            f" (copied from {cand_source})" if cross else "",
        )
    candidate_where = (cand_model, cand_version) if cross and not decision.promoted else cand_version
    write_audit(decision, {"candidate": candidate_where, "champion": champ_version, **staged})
    return decision

"""How doubtful each thresholded decision is: the thresholds each row was tagged with (found by its
``thresholds_sha256`` in the run's report or the registered version, or given), the logit distance
to them and the chance read from it that a decision, or an image's whole label set, is wrong."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mlc_ray.errors import UserError

if TYPE_CHECKING:
    from mlc_ray.select.config import SelectConfig
    from mlc_ray.select.scan import Source

__all__ = ["decision_doubt", "doubtful_labels", "load_thresholds", "row_thresholds", "thresholds_by_sha"]

log = logging.getLogger(__name__)

_EPS = 1e-6


def load_thresholds(uri: str) -> Any:
    """Thresholds from a thresholds.json, a bundle directory or a ``models:/`` URI."""
    from mlc_ray import storage
    from mlc_ray.calibrate import Thresholds

    if uri.startswith("models:/"):
        from mlc_ray.registry import resolve_model

        uri = storage.join(resolve_model(uri).local_dir, "thresholds.json")
    elif not uri.endswith(".json"):
        uri = storage.join(uri, "thresholds.json")
    return Thresholds.load(uri)


def thresholds_by_sha(
    cfg: SelectConfig, source: Source, provenance: set[tuple[str, str, str, str]], labels: list[str]
) -> dict[str, np.ndarray]:
    """thresholds_sha256 -> threshold per label (in ``labels`` order) for every sha the rows name."""
    from mlc_ray import storage

    def ordered(names: Sequence[str], values: Sequence[float], where: str) -> np.ndarray:
        index = {n: float(v) for n, v in zip(names, values, strict=True)}
        missing = [name for name in labels if name not in index]
        if missing:
            raise UserError(f"{where}: no threshold for label(s) {', '.join(missing)}")
        return np.array([index[name] for name in labels], dtype=np.float64)

    shas = sorted({sha for _, sha, _, _ in provenance})
    if cfg.thresholds:
        t = load_thresholds(cfg.thresholds)
        if t.sha256 not in shas:
            log.warning(
                "thresholds %s (sha256 %s) are not the ones the rows were tagged with (%s)",
                cfg.thresholds,
                t.sha256[:12],
                ", ".join(s[:12] for s in shas),
            )
        values = ordered(t.labels, t.values, cfg.thresholds)
        return dict.fromkeys(shas, values)
    out: dict[str, np.ndarray] = {}
    for run_id, sha, model_name, model_version in sorted(provenance):
        if sha in out:
            continue
        report = storage.join(source.uri, "_runs", run_id, "report", "report.json")
        try:
            doc = json.loads(storage.read_text(report))
            rows = doc["labels"]
            out[sha] = ordered([r["label"] for r in rows], [r["threshold"] for r in rows], report)
            continue
        except (FileNotFoundError, KeyError, ValueError):
            pass
        if model_name and model_version and not model_version.startswith("bundle-"):
            try:
                t = load_thresholds(f"models:/{model_name}/{model_version}")
            except Exception as exc:  # registry down or version deleted: say what to pass instead
                log.warning("thresholds of %s v%s: %s", model_name, model_version, exc)
            else:
                if t.sha256 == sha:
                    out[sha] = ordered(t.labels, t.values, f"models:/{model_name}/{model_version}")
                    continue
    missing = [s for s in shas if s not in out]
    if missing:
        raise UserError(
            f"the thresholds the rows were tagged with (sha256 {', '.join(s[:12] for s in missing)}) are in no "
            "run report of the table nor in a registered version it names; pass --thresholds "
            "(thresholds.json, a bundle directory or models:/NAME/VERSION)"
        )
    return out


def decision_doubt(
    scores: np.ndarray, thresholds: np.ndarray, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How doubtful each thresholded decision is, and each image's whole label set.

    ``scores`` (n, L) and ``thresholds`` (n, L) or (L,). Returns ``distance`` (n, L), the logit
    distance ``|logit(s) - logit(t)|``; ``p_wrong`` (n, L), the chance read from it that the label's
    decision is wrong, ``1 / (1 + exp(distance / temperature))`` (0.5 on the threshold, whatever the
    threshold); and ``log_right`` (n,), ``sum_l log(1 - p_wrong)``: the log of the chance that every
    decision is right, so ``1 - exp(log_right)`` is the chance the label set is wrong. Images rank by
    ``log_right`` (ascending): no rounding to 1.0 when several labels are borderline.
    """
    s = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS)
    t = np.clip(np.asarray(thresholds, dtype=np.float64), _EPS, 1 - _EPS)
    distance = np.abs(np.log(s / (1 - s)) - np.log(t / (1 - t)))
    z = distance / float(temperature)
    p_wrong = np.exp(-np.logaddexp(0.0, z))  # 1 / (1 + e^z), stable for large z
    log_right = -np.logaddexp(0.0, -z).sum(axis=1)  # log(1 - p) = -log(1 + e^-z)
    return distance, p_wrong, log_right


def row_thresholds(batch: pa.RecordBatch, thresholds: dict[str, np.ndarray]) -> np.ndarray:
    """(n, L) thresholds each row was tagged with (by its ``thresholds_sha256``)."""
    import pyarrow.compute as pc

    shas = pc.dictionary_encode(batch.column("thresholds_sha256"))
    table_t = np.stack([thresholds[str(sha)] for sha in shas.dictionary.to_pylist()])
    return table_t[np.asarray(shas.indices.to_numpy(), dtype=np.int64)]


def doubtful_labels(p_wrong: np.ndarray, labels: list[str]) -> list[str]:
    """One image's labels it may be counted under (label_set rule), most doubtful first: those
    whose decision's chance of being wrong is at least half the image's largest."""
    order = np.argsort(-p_wrong, kind="stable")
    top = p_wrong[order[0]]
    return [labels[int(j)] for j in order if p_wrong[j] >= 0.5 * top]

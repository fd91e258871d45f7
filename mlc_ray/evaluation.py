"""Score a model bundle on a labelled manifest, the way promotion and the pyfunc model see it.

One code path turns image bytes into probabilities: ``mlc_ray.data.images.prepare_image`` (decode
with the bundle's decode policy, resize, both from its ``preprocess.json``; the same call the tagging
pipeline's actors make), then the bundle's ``model.onnx`` in onnxruntime (uint8 NHWC in,
``probabilities`` out). The bundle is read through ``mlc_ray.bundle.ModelBundle``. ``evaluate_bundle`` runs it over a manifest and computes metrics at the
bundle's *own* calibrated thresholds, so two versions are compared as each would be deployed.
Images that fail to decode are counted and named, not fatal: both versions skip the same ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlc_ray.errors import UserError
from mlc_ray.onnx_run import cpu_images_per_call, open_session, run_graph

__all__ = ["BundleScorer", "EvalResult", "evaluate_bundle", "read_images"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
# How many failed images an EvalResult keeps by name (the count is always exact).
MAX_ERRORS_KEPT = 20


def _onnx_threads() -> int:
    # Leave a core for decoding on small machines; MLC_RAY_ORT_THREADS overrides.
    env = os.environ.get("MLC_RAY_ORT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class BundleScorer:
    """Bytes in, per-label probabilities out, with one bundle's fp32 ONNX graph and preprocessing."""

    def __init__(self, local_dir: str | os.PathLike[str], *, onnx_file: str = "model.onnx") -> None:
        from mlc_ray.bundle import ModelBundle

        self.bundle = ModelBundle(local_dir)
        self.local_dir = self.bundle.root
        onnx_path = self.bundle.path(onnx_file)
        if not onnx_path.is_file():
            raise UserError(f"{onnx_path}: model file missing from the bundle (export writes it)")
        self.labels = self.bundle.labels()
        self.preprocess = self.bundle.preprocess()
        threads = _onnx_threads()
        self.session = open_session(onnx_path, threads=threads)  # the options tagging's actors use
        self.input_name = self.session.get_inputs()[0].name
        self.images_per_call = cpu_images_per_call(threads)  # as tagging's actors run it (onnx_run.py)
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.labels):
            raise UserError(
                f"{onnx_path}: graph outputs {n_out} scores but labels.json lists {len(self.labels)} labels"
            )

    def prepare(self, data: bytes) -> tuple[np.ndarray | None, str | None]:
        """Decode and resize one image; returns (uint8 HWC array, None) or (None, 'code: message')."""
        from mlc_ray.data.images import prepare_image

        prepared = prepare_image(data, self.preprocess)
        return prepared.pixels, prepared.error

    def run(self, batch_nhwc: np.ndarray) -> np.ndarray:
        """Probabilities (N, L) float32 for a uint8 NHWC batch."""
        if len(batch_nhwc) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return run_graph(
            self.session,
            batch_nhwc,
            input_name=self.input_name,
            output_name=None,
            images_per_call=self.images_per_call,
        )

    def score_bytes(
        self, images: Sequence[bytes | None], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> tuple[np.ndarray, list[str | None]]:
        """Score a list of encoded images: (probabilities (N, L) with NaN rows for failures, errors)."""
        scores = np.full((len(images), len(self.labels)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            rows, arrays = [], []
            for i in range(start, min(start + batch_size, len(images))):
                data = images[i]
                if data is None:
                    errors[i] = errors[i] or "unreadable: no image bytes"
                    continue
                array, error = self.prepare(data)
                if error is not None:
                    errors[i] = error
                    continue
                rows.append(i)
                arrays.append(array)
            if rows:
                scores[rows] = self.run(np.stack(arrays))
        return scores, errors


@dataclass
class EvalResult:
    """Metrics of one bundle on one data set, at the bundle's own thresholds."""

    metrics: dict[str, Any]  # compute_metrics() output (macro_f1, mAP, ...)
    per_label_f1: dict[str, float]  # label name -> F1 at the bundle's threshold
    scores: np.ndarray  # (N, L) probabilities of the images that decoded, in `labels` order
    targets: np.ndarray  # (N, L) uint8 ground truth, same rows and order
    labels: list[str] = field(default_factory=list)
    n_images: int = 0  # rows in the evaluated manifest
    n_errors: int = 0  # rows that could not be read or decoded (excluded from the metrics)
    errors: list[tuple[str, str]] = field(default_factory=list)  # first MAX_ERRORS_KEPT (uri, reason)

    def metric(self, name: str) -> float:
        if name not in self.metrics or not np.isscalar(self.metrics[name]):
            known = sorted(k for k, v in self.metrics.items() if np.isscalar(v))
            raise UserError(f"unknown metric '{name}'; scalar metrics: {', '.join(known)}")
        return float(self.metrics[name])


def _targets_for(manifest: Any, labels: list[str], where: str) -> np.ndarray:
    """The manifest's ground truth in the model's label order; every model label must be known."""
    vocab = list(manifest.vocabulary)
    missing = [x for x in labels if x not in vocab]
    if missing:
        raise UserError(
            f"{where}: the model's labels {missing[:10]} are not in the eval manifest's vocabulary "
            f"({manifest.source}); evaluate with a manifest that uses the model's labels"
        )
    multi_hot = np.asarray(manifest.multi_hot(), dtype=np.uint8)
    return multi_hot[:, [vocab.index(x) for x in labels]]


def read_images(uris: Sequence[str]) -> list[bytes | None]:
    """The bytes of each URI (8 reads at a time), None for one that cannot be read (logged)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlc_ray import storage

    def read(uri: str) -> bytes | None:
        try:
            return storage.read_bytes(uri)
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", uri, exc)
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(read, uris))


def evaluate_bundle(
    local_dir: str | os.PathLike[str],
    manifest: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    images: Sequence[bytes | None] | None = None,
) -> EvalResult:
    """Evaluate the bundle in ``local_dir`` on ``manifest`` (a Manifest, or its URI: all rows).

    ``images`` may pass the already-read bytes of ``manifest.images`` so that comparing two
    versions reads the data once.
    """
    from mlc_ray.metrics import compute_metrics

    if isinstance(manifest, str | os.PathLike):
        from mlc_ray.data.manifest import load_manifest

        manifest = load_manifest(str(manifest))
    if len(manifest) == 0:
        raise UserError(f"{manifest.source}: the evaluation set is empty")
    local_dir = Path(local_dir)
    scorer = BundleScorer(local_dir)
    targets = _targets_for(manifest, scorer.labels, str(local_dir))
    thresholds = scorer.bundle.threshold_values()
    if images is None:
        images = read_images(manifest.images)
    scores, errors = scorer.score_bytes(images, batch_size=batch_size)
    ok = np.array([e is None for e in errors], dtype=bool)
    failed = [(manifest.images[i], errors[i] or "") for i in np.flatnonzero(~ok)]
    if not ok.any():
        raise UserError(
            f"{manifest.source}: none of the {len(errors)} evaluation images could be decoded "
            f"(first: {failed[0][0]}: {failed[0][1]})"
        )
    if failed:
        log.warning(
            "%d of %d evaluation images skipped (first: %s: %s)", len(failed), len(errors), *failed[0]
        )
    metrics = compute_metrics(scores[ok], targets[ok], thresholds=thresholds)
    per_label = metrics.get("per_label_f1")
    if isinstance(per_label, dict):
        per_label_f1 = {str(k): float(v) for k, v in per_label.items()}
    else:
        per_label_f1 = {label: float(v) for label, v in zip(scorer.labels, per_label, strict=True)}
    return EvalResult(
        metrics=metrics,
        per_label_f1=per_label_f1,
        scores=scores[ok],
        targets=targets[ok],
        labels=scorer.labels,
        n_images=len(errors),
        n_errors=len(failed),
        errors=failed[:MAX_ERRORS_KEPT],
    )

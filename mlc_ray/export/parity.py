"""Parity checks: the exported graphs must give the torch model's probabilities on the same images.

Every fp32 path (onnxruntime ``model.onnx``, ncnn) is compared with the torch ``ImageTagger`` on the
same uint8 NHWC images (already resized by ``preprocess_eval``), as max |Δprobability|; the limit is
1e-3. A failed check stops that artifact (``export_bundle`` deletes it and says why). int8 is not
held to this limit (its accuracy gate decides); its max |Δ| to fp32 is reported for information.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc_ray.errors import ExportError

__all__ = [
    "TOLERANCE",
    "ParityError",
    "ParityResult",
    "compare_probabilities",
    "ncnn_probabilities",
    "synthetic_images",
    "torch_probabilities",
]

TOLERANCE = 1e-3  # max |Δprobability| allowed for fp32 paths


class ParityError(ExportError):
    """An exported artifact does not reproduce the torch model's probabilities."""


@dataclass(frozen=True)
class ParityResult:
    """Max |Δprobability| between ``name`` and ``reference`` on ``n_images`` images."""

    name: str
    reference: str
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    n_images: int

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    def format(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.name} vs {self.reference}: max |Δp| {self.max_abs_diff:.2e} (mean {self.mean_abs_diff:.1e}, "
            f"limit {self.tolerance:.0e}, {self.n_images} images) {verdict}"
        )

    def require(self) -> ParityResult:
        """Raise ``ParityError`` unless passed; returns self for chaining."""
        if not self.passed:
            raise ParityError(f"parity check failed: {self.format()}")
        return self


def compare_probabilities(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    reference_name: str = "torch",
    tolerance: float = TOLERANCE,
) -> ParityResult:
    """Max/mean |Δ| between two (N, L) probability arrays (NaN/inf or a shape mismatch count as failures)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ParityError(f"{name} gives probabilities of shape {cand.shape}, {reference_name} {ref.shape}")
    diff = np.abs(ref - cand)
    max_diff = float(np.max(diff)) if diff.size else 0.0
    if not np.all(np.isfinite(cand)):
        max_diff = float("inf")
    mean_diff = float(np.mean(diff)) if diff.size else 0.0
    return ParityResult(name, reference_name, max_diff, mean_diff, float(tolerance), int(ref.shape[0]))


def torch_probabilities(model: Any, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """The torch reference: ``sigmoid(ImageTagger(uint8 NHWC))`` in eval mode, float32 (N, L)."""
    import torch

    wrapper = model.with_sigmoid() if hasattr(model, "with_sigmoid") else model
    was_training = wrapper.training
    wrapper.eval()
    try:
        with torch.no_grad():
            out = [
                wrapper(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.uint8)))
                .float()
                .numpy()
                for i in range(0, len(images), batch_size)
            ]
    finally:
        wrapper.train(was_training)
    return np.concatenate(out).astype(np.float32, copy=False)


def ncnn_probabilities(
    param: str | os.PathLike[str],
    bin: str | os.PathLike[str],  # noqa: A002
    images: np.ndarray,
    *,
    fp16: bool = False,
    threads: int = 1,
) -> np.ndarray:
    """Run ``NcnnRunner`` on uint8 NHWC ``images`` -> float32 (N, L)."""
    from mlc_ray.export.ncnn import NcnnRunner

    return NcnnRunner(param, bin, num_threads=threads, fp16=fp16).run(images)


def synthetic_images(n: int, image_size: int, *, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 (n, S, S, 3) images with smooth structure and noise (parity without data).

    Real validation images are better (``export_bundle`` uses them when given); these exercise the
    whole 0..255 range and per-image statistics that differ from image to image.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / max(1, image_size - 1)
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        freq = rng.uniform(0.5, 4.0, size=3)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        base = [
            127.5
            + 127.5 * np.sin(2 * np.pi * freq[c] * (xx * np.cos(phase[c]) + yy * np.sin(phase[c])) + phase[c])
            for c in range(3)
        ]
        noise = rng.normal(0, rng.uniform(5, 40), size=(image_size, image_size, 3))
        out[i] = np.clip(np.stack(base, axis=-1) * rng.uniform(0.3, 1.0) + noise, 0, 255).astype(np.uint8)
    return out

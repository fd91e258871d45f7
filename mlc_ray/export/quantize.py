"""ONNX int8: onnxruntime static quantization (QDQ, per-channel weights) and its accuracy gate.

``quantize_int8`` calibrates activation ranges on a few hundred *training* images (uint8 NHWC, the
graph's own input) and writes ``model.int8.onnx``: uint8 activations, int8 per-channel weights, QDQ
format (``QuantizeLinear``/``DequantizeLinear`` pairs that onnxruntime fuses into integer kernels).

The graph's input path — ``Cast`` uint8 -> float, ``Transpose`` NHWC -> NCHW and the normalisation —
is kept in float (``nodes_to_exclude``): a quantized ``Transpose`` there would put a Q/DQ pair on the
raw pixels, and per-image standardisation's reductions are too sensitive to 8-bit steps. The same
holds for the final ``Sigmoid``: probabilities near the thresholds must not move in 1/256 steps.

``int8_accuracy_gate`` decides whether the int8 model may ship: macro-F1 at the calibrated thresholds
within ``max_macro_drop`` (0.01) of fp32 and no label's F1 down by more than ``max_label_drop`` (0.03)
on validation. The caller deletes the artifact when it fails and logs ``GateResult.reason``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MAX_LABEL_DROP",
    "MAX_MACRO_DROP",
    "GateResult",
    "int8_accuracy_gate",
    "preprocessing_nodes",
    "quantize_int8",
]

log = logging.getLogger(__name__)

MAX_MACRO_DROP = 0.01  # macro-F1 may drop by at most this much
MAX_LABEL_DROP = 0.03  # no single label's F1 may drop by more than this
DEFAULT_CALIBRATION_BATCH = 16
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Clip", "Relu", "GlobalAveragePool", "MaxPool")


def preprocessing_nodes(model: Any) -> list[str]:
    """Names of the nodes between the graph input and the first Conv (cast, transpose, normalisation)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    first_conv = next((node for node in graph.node if node.op_type == "Conv"), None)
    if first_conv is None:
        return []
    seen: dict[str, Any] = {}
    stack = [first_conv.input[0]]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen[node.name] = node
        stack.extend(node.input)
    return sorted(seen)


def _output_nodes(model: Any, op_types: Sequence[str] = ("Sigmoid",)) -> list[str]:
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if n.op_type in op_types and set(n.output) & outputs]


def _batches(images: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    from mlc_ray.export.onnx import INPUT_NAME

    for start in range(0, len(images), batch_size):
        yield {INPUT_NAME: np.ascontiguousarray(images[start : start + batch_size], dtype=np.uint8)}


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calibration_images: np.ndarray,
    *,
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
    per_channel: bool = True,
    calibrate_method: str = "minmax",
) -> Path:
    """Write the int8 QDQ version of ``fp32_path`` to ``out_path`` (atomically), calibrated on images.

    ``calibration_images``: uint8 (N, S, S, 3) RGB, already resized (``preprocess_eval``); a few hundred
    training images are plenty. ``calibrate_method``: ``minmax`` (default), ``entropy`` or ``percentile``.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    images = np.asarray(calibration_images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            "calibration_images must be a non-empty uint8 (N, S, S, 3) RGB array of resized training "
            f"images, got shape {images.shape} dtype {images.dtype}"
        )
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method {calibrate_method!r} is not one of {sorted(methods)}")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = _batches(images, max(1, int(batch_size)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlc_ray-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph optimisation (BatchNorm folding etc.) first, as onnxruntime advises.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        exclude = preprocessing_nodes(model) + _output_nodes(model)
        staged = Path(tmp) / "model.int8.onnx"
        quantize_static(
            str(prepared),
            str(staged),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=methods[calibrate_method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        onnx.checker.check_model(str(staged))
        final = out_path.with_name(f".{out_path.name}.tmp")
        shutil.copyfile(staged, final)  # the temp dir may be on another filesystem
        os.replace(final, out_path)
    log.info(
        "quantized %s -> %s (%d -> %d bytes; %d calibration images; kept in float: %s)",
        fp32_path,
        out_path,
        os.path.getsize(fp32_path),
        out_path.stat().st_size,
        len(images),
        ", ".join(exclude) or "nothing",
    )
    return out_path


@dataclass(frozen=True)
class GateResult:
    """The int8 accuracy gate's decision and the numbers behind it."""

    passed: bool
    macro_f1_fp32: float
    macro_f1_int8: float
    worst_label: str | None  # the label whose F1 dropped most (None when no label dropped)
    worst_drop: float  # its F1 drop (fp32 - int8); <= 0 when no label got worse
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "macro_f1_fp32": self.macro_f1_fp32,
            "macro_f1_int8": self.macro_f1_int8,
            "worst_label": self.worst_label,
            "worst_drop": self.worst_drop,
            "reason": self.reason,
        }


def _threshold_values(thresholds: Any, n_labels: int) -> tuple[np.ndarray, list[str] | None]:
    labels = getattr(thresholds, "labels", None)
    values = getattr(thresholds, "values", thresholds)
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n_labels, float(arr))
    if arr.shape != (n_labels,):
        raise ValueError(f"{arr.size} thresholds for {n_labels} labels")
    return arr, (list(labels) if labels is not None else None)


def int8_accuracy_gate(
    fp32_scores: np.ndarray,
    int8_scores: np.ndarray,
    targets: np.ndarray,
    thresholds: Any,
    *,
    labels: Sequence[str] | None = None,
    max_macro_drop: float = MAX_MACRO_DROP,
    max_label_drop: float = MAX_LABEL_DROP,
) -> GateResult:
    """Keep int8 only if macro-F1 (at ``thresholds``) is within ``max_macro_drop`` of fp32 and no
    label's F1 drops by more than ``max_label_drop``; scores/targets are validation (N, L) arrays.

    ``thresholds``: a ``Thresholds`` (its labels name the worst label), an (L,) array or one float.
    """
    from mlc_ray.metrics import compute_metrics

    fp32_scores = np.asarray(fp32_scores, dtype=np.float64)
    int8_scores = np.asarray(int8_scores, dtype=np.float64)
    if fp32_scores.shape != int8_scores.shape:
        raise ValueError(
            f"fp32 scores {fp32_scores.shape} and int8 scores {int8_scores.shape} differ in shape"
        )
    if fp32_scores.ndim != 2 or len(fp32_scores) == 0:
        raise ValueError(f"the int8 gate needs (N, L) validation scores with N > 0, got {fp32_scores.shape}")
    values, threshold_labels = _threshold_values(thresholds, fp32_scores.shape[1])
    names = list(labels) if labels is not None else threshold_labels
    if names is None:
        names = [f"label{i}" for i in range(fp32_scores.shape[1])]
    m32 = compute_metrics(fp32_scores, targets, values)
    m8 = compute_metrics(int8_scores, targets, values)
    f1_32, f1_8 = float(m32["macro_f1"]), float(m8["macro_f1"])
    drops = np.asarray(m32["per_label_f1"], dtype=np.float64) - np.asarray(
        m8["per_label_f1"], dtype=np.float64
    )
    worst = int(np.argmax(drops))
    worst_drop = float(drops[worst])
    worst_label = names[worst] if worst_drop > 0 else None
    macro_drop = f1_32 - f1_8
    failures = []
    if macro_drop > max_macro_drop + 1e-12:
        failures.append(f"macro-F1 dropped {macro_drop:.4f} ({f1_32:.4f} -> {f1_8:.4f}) > {max_macro_drop}")
    bad = [(names[i], float(drops[i])) for i in np.argsort(-drops) if drops[i] > max_label_drop + 1e-12]
    if bad:
        listed = ", ".join(f"{name} -{drop:.4f}" for name, drop in bad[:5])
        failures.append(f"{len(bad)} label(s) lost more than {max_label_drop} F1: {listed}")
    if failures:
        reason = "int8 rejected: " + "; ".join(failures)
    else:
        worst_text = f"worst label {worst_label} -{worst_drop:.4f}" if worst_label else "no label got worse"
        reason = f"int8 kept: macro-F1 {f1_32:.4f} -> {f1_8:.4f}, {worst_text}"
    return GateResult(not failures, f1_32, f1_8, worst_label, worst_drop, reason)

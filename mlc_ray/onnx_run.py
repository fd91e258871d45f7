"""Running a bundle's ONNX graph: how many images go into one onnxruntime call.

Every session of a bundle's graph (tagging's actors, ``evaluation.BundleScorer`` for promotion and
pyfunc, export's parity check and int8 gate) is opened by ``open_session`` (one set of session
options: sequential execution, full graph optimisation, one inter-op thread) and runs through
``run_graph``, so the three score a batch the same way. On the CPU a batch goes to the session
``cpu_images_per_call(threads)`` images per call — one image per intra-op thread — whatever the
caller's batch size (the tagging actors' ``--batch-size``, the evaluation batches); a GPU session
takes the whole batch in one call.

Why (measured 2026-12-03 on an AMD EPYC with AVX-512 VNNI, 2 vCPUs, one intra-op thread, 256 of
``benchmarks/tagging.py``'s 500x375 JPEGs at 224 px, best of 3): one call per image costs MobileNetV2
fp32 4.0-4.3 ms per image against 6.0-6.5 ms in calls of 32, int8 2.7-2.8 against 3.5;
MobileNetV3-Large 4.2-4.5 against 5.5-6.0; MobileNetV1 6.0-6.3 against 7.4; ResNeXt50 the same either
way (47 against 44-48 ms). A call of 32 images holds 32 images' activations at once (~300 MB for
MobileNetV2: the first call of a session faults in 82,000 pages) and works out of main memory; one
image's fit in the caches. With two intra-op threads the call size made no measurable difference.
The first call of a tagging actor's session paid 1.2 s of system time for those page faults while
Ray's other processes were starting beside it; one image's activations are a thirtieth of that.
``benchmarks/tagging.py`` (configuration ``sessions``) measures the two call sizes side by side.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["cpu_images_per_call", "open_session", "run_graph"]


def open_session(model: bytes | str | os.PathLike[str], *, threads: int = 1, use_gpu: bool = False) -> Any:
    """An onnxruntime session of ``model`` (bytes or a path) with the options every scorer of a bundle
    uses: ``threads`` intra-op threads, one inter-op thread, sequential execution, full graph
    optimisation; the CPU provider, or CUDA first when ``use_gpu`` (the caller checks that it got it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_gpu else ["CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=providers)


def cpu_images_per_call(threads: int) -> int:
    """Images per ``session.run`` of a CPU session with ``threads`` intra-op threads."""
    return max(1, int(threads))


def run_graph(
    session: Any,
    images: np.ndarray,
    *,
    input_name: str,
    output_name: str | None,
    images_per_call: int | None,
) -> np.ndarray:
    """Probabilities float32 (N, L) of uint8 NHWC ``images``, ``images_per_call`` images per call
    (``None``: the whole batch in one call)."""
    x = np.ascontiguousarray(images, dtype=np.uint8)
    outputs = [output_name] if output_name else None
    step = images_per_call or len(x)
    if len(x) <= step:
        return np.asarray(session.run(outputs, {input_name: x})[0], dtype=np.float32)
    parts = [session.run(outputs, {input_name: x[i : i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(parts).astype(np.float32, copy=False)

"""Inference backends for bulk tagging: uint8 NHWC pixels in, per-label probabilities out.

* ``OnnxBackend`` — one onnxruntime session (``model.onnx`` fp32 or ``model.int8.onnx``) whose graph
  takes uint8 NHWC ``images`` and returns ``probabilities``; normalisation is inside the graph, so no
  float copy of the pixels is ever made in Python. CPU by default; ``use_gpu`` asks for the CUDA
  execution provider and *fails* when the session did not get it (a GPU job silently running on
  CPU is a cost surprise, not a fallback).
* ``NcnnBackend`` — the exported ncnn net through ``mlc_ray.export.ncnn.NcnnRunner``.

Both are built from the model's *bytes* (``ModelFiles``), because on a cluster the actors run on
other nodes than the driver that resolved and verified the model: the driver ships the bytes once
through the object store.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from mlc_ray.bundle import EXPORT_FILES, ONNX_BY_PRECISION
from mlc_ray.onnx_run import cpu_images_per_call, open_session, run_graph

__all__ = ["ModelFiles", "InferenceBackend", "OnnxBackend", "NcnnBackend", "model_files_for", "make_backend"]


ONNX_FILES = ONNX_BY_PRECISION  # the bundle's one file list (mlc_ray.bundle)
NCNN_FILES = EXPORT_FILES["ncnn"]


@dataclass(frozen=True)
class ModelFiles:
    """The artifact bytes one backend needs, keyed by bundle file name."""

    backend: str
    precision: str
    files: dict[str, bytes]


def model_files_for(local_dir: str, backend: str, precision: str) -> ModelFiles:
    """Read the files ``backend``/``precision`` needs from a verified local bundle (clear error if absent)."""
    from mlc_ray.cli import UserError

    if backend == "onnxruntime":
        names = (ONNX_FILES[precision],)
    elif backend == "ncnn":
        names = NCNN_FILES
    else:
        raise UserError(f"unknown backend {backend!r}; use onnxruntime or ncnn")
    files = {}
    for name in names:
        path = os.path.join(local_dir, name)
        if not os.path.isfile(path):
            hint = (
                " (int8 is only exported when it passed its accuracy gate; use --precision fp32)"
                if name == ONNX_FILES["int8"]
                else " (re-run the export for this model)"
            )
            raise UserError(
                f"{path}: {backend} {precision} needs {name}, which this model does not have{hint}"
            )
        with open(path, "rb") as fh:
            files[name] = fh.read()
    return ModelFiles(backend, precision, files)


class InferenceBackend:
    """``run(uint8 (N, S, S, 3)) -> float32 (N, L)`` probabilities."""

    name = "base"

    def run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class OnnxBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, model: bytes | str, *, threads: int = 1, use_gpu: bool = False) -> None:
        import onnxruntime as ort

        self.session = open_session(model, threads=threads, use_gpu=use_gpu)
        self.providers = list(self.session.get_providers())
        # on the CPU one image per intra-op thread per call (onnx_run.py: faster than whole batches)
        self.images_per_call = None if use_gpu else cpu_images_per_call(threads)
        if use_gpu and "CUDAExecutionProvider" not in self.providers:
            raise RuntimeError(
                "--use-gpu: onnxruntime did not get the CUDA execution provider "
                f"(session providers {self.providers}, available {ort.get_available_providers()}); "
                "install onnxruntime-gpu with a CUDA matching the driver, or drop --use-gpu"
            )
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in outputs else outputs[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return run_graph(
            self.session,
            batch,
            input_name=self.input_name,
            output_name=self.output_name,
            images_per_call=self.images_per_call,
        )


class NcnnBackend(InferenceBackend):
    """The ncnn net exported next to the ONNX graph, run by the export module's ``NcnnRunner``."""

    name = "ncnn"

    def __init__(self, param: bytes, weights: bytes, *, threads: int = 1) -> None:
        from mlc_ray.export.ncnn import NcnnRunner

        # ncnn loads from files: the bytes shipped to this actor go to a private temp dir.
        self._dir = tempfile.TemporaryDirectory(prefix="mlc-ray-ncnn-")
        param_path = os.path.join(self._dir.name, NCNN_FILES[0])
        bin_path = os.path.join(self._dir.name, NCNN_FILES[1])
        with open(param_path, "wb") as fh:
            fh.write(param)
        with open(bin_path, "wb") as fh:
            fh.write(weights)
        self.runner = NcnnRunner(param_path, bin_path, num_threads=max(1, int(threads)))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.runner.run(np.ascontiguousarray(batch, np.uint8)), dtype=np.float32)


def make_backend(model: ModelFiles, *, threads: int, use_gpu: bool = False) -> InferenceBackend:
    if model.backend == "onnxruntime":
        return OnnxBackend(model.files[ONNX_FILES[model.precision]], threads=threads, use_gpu=use_gpu)
    return NcnnBackend(model.files[NCNN_FILES[0]], model.files[NCNN_FILES[1]], threads=threads)

"""The model bundle: one local directory holding a trained tagger and everything needed to use it.

Training writes ``model.pt``, ``model.json``, ``labels.json``, ``preprocess.json``, ``thresholds.json``
and ``metrics.json``; export (``mlc_ray.export``) adds ``model.onnx``, ``model.int8.onnx`` (only when it
passed its accuracy gate) and ``model.ncnn.param`` + ``model.ncnn.bin``; the registry logs the directory
and tags each file's sha256; tagging and promotion read it back (see docs/internals.md).

``ModelBundle`` is the one reader of that layout: artifact paths, the rebuilt ``ImageTagger``
(``weights_only=True``), labels, preprocessing, thresholds, and sha256 verification against recorded
digests. It reads a *local* directory; ``mlc_ray.registry.resolve_model`` downloads s3:// bundles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ARTIFACT_FILES", "BundleIntegrityError", "ModelBundle", "sha256_file"]

WEIGHTS = "model.pt"
MODEL_JSON = "model.json"
LABELS = "labels.json"
PREPROCESS = "preprocess.json"
THRESHOLDS = "thresholds.json"
METRICS = "metrics.json"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
NCNN_PARAM = "model.ncnn.param"
NCNN_BIN = "model.ncnn.bin"
# each label's predicted-positive rate and score histogram on the validation set (training writes
# it; tagging's drift check reads it; older bundles lack it: drift is then "not available")
LABEL_RATES = "label_rates.json"

# Every file a bundle may hold, in the order training then export write them.
ARTIFACT_FILES: tuple[str, ...] = (
    WEIGHTS,
    MODEL_JSON,
    LABELS,
    PREPROCESS,
    THRESHOLDS,
    METRICS,
    LABEL_RATES,
    ONNX,
    ONNX_INT8,
    NCNN_PARAM,
    NCNN_BIN,
)


class BundleIntegrityError(ValueError):
    """A bundle file is missing or its content does not match the recorded sha256."""


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (weights files can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelBundle:
    """A model bundle directory (local). Paths are properties; loaders read and validate the files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = str(path)
        if text.startswith("s3://"):
            raise ValueError(
                f"ModelBundle reads a local directory, got {text}; download it first "
                "(mlc_ray.registry.resolve_model does, with sha256 checks)"
            )
        self.root = Path(text.removeprefix("file://")).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"model bundle {self.root} is not a directory (training writes one)")

    def __repr__(self) -> str:
        return f"ModelBundle({str(self.root)!r})"

    # ---- paths ---------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The path of bundle file ``name`` (which need not exist)."""
        if name not in ARTIFACT_FILES:
            raise ValueError(f"{name!r} is not a bundle artifact; known: {', '.join(ARTIFACT_FILES)}")
        return self.root / name

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def present(self) -> list[str]:
        """The known artifacts this bundle holds, in ``ARTIFACT_FILES`` order."""
        return [name for name in ARTIFACT_FILES if self.has(name)]

    weights_path = property(lambda self: self.path(WEIGHTS))
    model_json_path = property(lambda self: self.path(MODEL_JSON))
    labels_path = property(lambda self: self.path(LABELS))
    preprocess_path = property(lambda self: self.path(PREPROCESS))
    thresholds_path = property(lambda self: self.path(THRESHOLDS))
    metrics_path = property(lambda self: self.path(METRICS))
    onnx_path = property(lambda self: self.path(ONNX))
    int8_path = property(lambda self: self.path(ONNX_INT8))
    ncnn_param_path = property(lambda self: self.path(NCNN_PARAM))
    ncnn_bin_path = property(lambda self: self.path(NCNN_BIN))

    def _require(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model bundle {self.root} has no {name} (training writes it)")
        return path

    def _json(self, name: str) -> Any:
        path = self._require(name)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); restore it from the model version") from None

    # ---- loaders -------------------------------------------------------------------------------

    def labels(self) -> list[str]:
        """``labels.json``: the label names in model output order."""
        data = self._json(LABELS)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{self.labels_path}: expected a JSON list of label names")
        return list(data)

    def model_spec(self) -> dict[str, Any]:
        """``model.json``: ``{"arch", "num_labels", "width", "dropout"}``."""
        data = self._json(MODEL_JSON)
        if not isinstance(data, dict):
            raise ValueError(f"{self.model_json_path}: expected a JSON object")
        return data

    def metrics(self) -> dict[str, Any]:
        data = self._json(METRICS)
        if not isinstance(data, dict):
            raise ValueError(f"{self.metrics_path}: expected a JSON object")
        return data

    def label_rates(self) -> dict[str, Any] | None:
        """``label_rates.json`` (``mlc_ray.tagging.report.expected_label_rates``), or None when absent."""
        if not self.has(LABEL_RATES):
            return None
        data = self._json(LABEL_RATES)
        if not isinstance(data, dict):
            raise ValueError(f"{self.path(LABEL_RATES)}: expected a JSON object")
        return data

    def preprocess(self) -> Any:
        """``preprocess.json`` as a ``PreprocessConfig``."""
        from mlc_ray.data.images import PreprocessConfig

        try:
            return PreprocessConfig.from_json(self._require(PREPROCESS).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{self.preprocess_path}: {exc}") from None

    def thresholds(self) -> Any:
        """``thresholds.json`` as verified ``Thresholds`` (its own sha256 is checked)."""
        from mlc_ray.calibrate import Thresholds

        return Thresholds.load(str(self._require(THRESHOLDS)))

    def load_model(self) -> Any:
        """The ``ImageTagger`` in eval mode with ``model.pt`` loaded (``weights_only=True``)."""
        import torch

        from mlc_ray.models import build_tagger

        spec = self.model_spec()
        model = build_tagger(spec, self.preprocess())
        state = torch.load(self._require(WEIGHTS), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"{self.weights_path} does not fit model.json {spec}: {str(exc).splitlines()[0]} "
                "(model.pt and model.json must come from the same training run)"
            ) from None
        return model.eval()

    # ---- integrity -----------------------------------------------------------------------------

    def sha256s(self) -> dict[str, str]:
        """``{file name: sha256}`` of every known artifact present."""
        return {name: sha256_file(self.path(name)) for name in self.present()}

    def verify(self, expected: dict[str, str]) -> None:
        """Raise ``BundleIntegrityError`` naming every file that is missing or differs from ``expected``."""
        problems = []
        for name, digest in sorted(expected.items()):
            path = self.root / name
            if not path.is_file():
                problems.append(f"{name} is missing")
                continue
            actual = sha256_file(path)
            if actual != digest:
                problems.append(f"{name} was modified (sha256 {actual[:12]}..., expected {digest[:12]}...)")
        if problems:
            raise BundleIntegrityError(
                f"model bundle {self.root}: " + "; ".join(problems) + ". Do not use it: re-download the "
                "model version (or re-run the export) to get the files that were recorded"
            )

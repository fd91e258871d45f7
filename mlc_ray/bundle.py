"""The model bundle: one local directory holding a trained tagger and everything needed to use it.

Training writes ``model.pt``, ``model.json``, ``labels.json``, ``preprocess.json``, ``thresholds.json``
and ``metrics.json``; export (``mlc_ray.export``) adds ``model.onnx``, ``model.int8.onnx`` (only when it
passed its accuracy gate) and ``model.ncnn.param`` + ``model.ncnn.bin``; the registry logs the directory
and tags each file's sha256; tagging and promotion read it back (see docs/internals.md).

``ModelBundle`` is the one reader of that layout: artifact paths, the rebuilt ``ImageTagger``
(``weights_only=True``), labels, preprocessing, thresholds, and sha256 verification against recorded
digests. It reads a *local* directory; ``mlc_ray.registry.resolve_model`` (verified, cached) and
``local_bundle`` (a temporary copy) download s3:// bundles. The file names below are the one list
of the layout: everything else (training, export, the registry, tagging backends) imports them.

``sha256.json`` is the bundle's manifest of hashes (``{"files": {name: sha256}}``), rewritten by
training and by export after every change; the model cache compares a cached s3:// bundle with it on
every resolve, so a bundle re-exported under the same prefix is downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlc_ray.errors import UserError

__all__ = [
    "ARTIFACT_FILES",
    "BundleError",
    "BundleIntegrityError",
    "ModelBundle",
    "ONNX_BY_PRECISION",
    "PYFUNC_KEYS",
    "REQUIRED_FOR_INFERENCE",
    "SHA256_MANIFEST",
    "TRAINING_FILES",
    "local_bundle",
    "sha256_file",
]

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
TRAINING_FILES: tuple[str, ...] = ARTIFACT_FILES[:7]  # what training writes (export adds the rest)
EXPORT_FILES: dict[str, tuple[str, ...]] = {  # export format -> the files it writes
    "onnx": (ONNX,),
    "int8": (ONNX_INT8,),
    "ncnn": (NCNN_PARAM, NCNN_BIN),
}
REQUIRED_FOR_INFERENCE: tuple[str, ...] = (ONNX, LABELS, PREPROCESS, THRESHOLDS)
ONNX_BY_PRECISION: dict[str, str] = {"fp32": ONNX, "int8": ONNX_INT8}
# pyfunc artifact key of each file (how the registry logs them; mlc_ray/pyfunc_model.py reads them)
PYFUNC_KEYS: dict[str, str] = {
    WEIGHTS: "weights",
    MODEL_JSON: "model_config",
    LABELS: "labels",
    PREPROCESS: "preprocess",
    THRESHOLDS: "thresholds",
    METRICS: "metrics",
    LABEL_RATES: "label_rates",
    ONNX: "onnx",
    ONNX_INT8: "int8",
    NCNN_PARAM: "ncnn_param",
    NCNN_BIN: "ncnn_bin",
}
SHA256_MANIFEST = "sha256.json"  # {"files": {name: sha256}} of every other file; not itself an artifact


class BundleError(UserError, ValueError):
    """A bundle file is unreadable or inconsistent; the message names the file and what to do."""


class BundleIntegrityError(BundleError):
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
            raise BundleError(f"{path}: not valid JSON ({exc}); restore it from the model version") from None

    # ---- loaders -------------------------------------------------------------------------------

    def labels(self) -> list[str]:
        """``labels.json``: the label names in model output order."""
        data = self._json(LABELS)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise BundleError(f"{self.labels_path}: expected a JSON list of label names")
        return list(data)

    def model_spec(self) -> dict[str, Any]:
        """``model.json``: ``{"arch", "num_labels", "width", "dropout"}``."""
        data = self._json(MODEL_JSON)
        if not isinstance(data, dict):
            raise BundleError(f"{self.model_json_path}: expected a JSON object")
        return data

    def metrics(self) -> dict[str, Any]:
        data = self._json(METRICS)
        if not isinstance(data, dict):
            raise BundleError(f"{self.metrics_path}: expected a JSON object")
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
            raise BundleError(f"{self.preprocess_path}: {exc}") from None

    def thresholds(self) -> Any:
        """``thresholds.json`` as verified ``Thresholds`` (its own sha256 is checked), in the label order
        of ``labels.json`` (a bundle whose two files disagree is refused)."""
        from mlc_ray.calibrate import Thresholds

        try:
            thresholds = Thresholds.load(str(self._require(THRESHOLDS)))
        except FileNotFoundError:
            raise
        except ValueError as exc:
            raise BundleError(str(exc)) from None
        if self.has(LABELS) and list(thresholds.labels) != self.labels():
            raise BundleError(
                f"{self.thresholds_path}: thresholds are for labels {list(thresholds.labels)[:5]}..., but "
                f"labels.json lists {self.labels()[:5]}...; the bundle is inconsistent: recalibrate or re-export it"
            )
        return thresholds

    def threshold_values(self) -> Any:
        """The thresholds as a float32 array in model output order."""
        import numpy as np

        return np.asarray(self.thresholds().values, dtype=np.float32)

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

    def write_manifest(self) -> dict[str, str]:
        """(Re)write ``sha256.json`` from the files present now; returns the digests."""
        digests = self.sha256s()
        text = json.dumps({"files": digests}, indent=2, sort_keys=True) + "\n"
        tmp = self.root / f".{SHA256_MANIFEST}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.root / SHA256_MANIFEST)
        return digests

    def manifest(self) -> dict[str, str] | None:
        """The recorded ``{file: sha256}`` of ``sha256.json``, or None for a bundle written without one."""
        path = self.root / SHA256_MANIFEST
        if not path.is_file():
            return None
        return parse_manifest(path.read_text(encoding="utf-8"), str(path))

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


def parse_manifest(text: str, where: str) -> dict[str, str]:
    """``sha256.json`` text -> ``{file: sha256}``; BundleError when it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise BundleError(f'{where}: expected {{"files": {{name: sha256}}}}')
    return dict(files)


@contextmanager
def local_bundle(uri: str, files: tuple[str, ...] | None = None) -> Iterator[ModelBundle]:
    """A ``ModelBundle`` for a local directory, or for a temporary local copy of an s3:// bundle
    (its top-level files, or only ``files``), removed on exit."""
    from mlc_ray import storage

    if not storage.is_s3(uri):
        yield ModelBundle(uri)
        return
    with tempfile.TemporaryDirectory(prefix="mlc_ray-bundle-") as tmp:
        prefix = uri.rstrip("/") + "/"
        count = 0
        for obj in storage.iter_objects(prefix):
            rel = obj.uri[len(prefix) :]
            if not rel or "/" in rel:  # a bundle is flat; ignore sub-folders (e.g. checkpoints)
                continue
            if files is not None and rel not in files:
                continue
            storage.download_file(obj.uri, str(storage.safe_local_path(tmp, rel)))
            count += 1
        if count == 0:
            raise BundleError(f"model bundle {uri} does not exist (no objects under it)")
        yield ModelBundle(tmp)

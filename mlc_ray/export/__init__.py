"""Export of a trained tagger to ONNX fp32/int8 and ncnn, with parity checks.

``export_bundle(bundle_dir, ...)`` turns a model bundle that training wrote (``model.pt``,
``model.json``, ``preprocess.json``, ``thresholds.json``, ...) into its deployable artifacts:

* ``model.onnx`` — fp32, uint8 NHWC ``images`` in, ``probabilities`` out (``mlc_ray.export.onnx``);
* ``model.int8.onnx`` — onnxruntime static QDQ quantization, kept only if it passes the accuracy gate
  (``mlc_ray.export.quantize``);
* ``model.ncnn.param`` / ``model.ncnn.bin`` — via the pnnx binary (``mlc_ray.export.ncnn``).

Each fp32 artifact must match the torch model within 1e-3 (``mlc_ray.export.parity``). An artifact
that fails its check or its converter is deleted and the report says why; the others are kept, so
the caller registers what passed. Submodules are imported lazily: the ncnn runner used by tagging
actors must not pull in torch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlc_ray.bundle import EXPORT_FILES as FORMAT_FILES  # the bundle's one file list
from mlc_ray.bundle import SHA256_MANIFEST
from mlc_ray.errors import ExportError

__all__ = ["EXPORT_FORMATS", "ExportError", "ExportReport", "FormatResult", "export_bundle"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "int8", "ncnn")

PARITY_IMAGES = 32  # images used for the parity checks (validation images when given)


@dataclass
class FormatResult:
    """What happened to one export format."""

    format: str
    status: str  # "ok" | "failed" | "skipped"
    files: list[str] = field(default_factory=list)  # files written to the bundle (empty unless ok)
    parity: Any = None  # ParityResult vs torch (fp32 paths; for int8: vs fp32 onnx, informative)
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class ExportReport:
    """Per-format outcome of ``export_bundle``; ``format()`` is the log text."""

    bundle_dir: str
    results: dict[str, FormatResult] = field(default_factory=dict)
    gate: Any = None  # GateResult of the int8 accuracy gate, when it ran
    parity_images: str = ""  # where the parity images came from
    seconds: float = 0.0

    def ok(self, fmt: str) -> bool:
        result = self.results.get(fmt)
        return bool(result and result.ok)

    @property
    def files(self) -> list[str]:
        return [name for result in self.results.values() if result.ok for name in result.files]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle_dir": self.bundle_dir,
            "parity_images": self.parity_images,
            "seconds": round(self.seconds, 2),
            "formats": {
                fmt: {
                    "status": r.status,
                    "files": r.files,
                    "reason": r.reason,
                    "max_abs_diff": None if r.parity is None else r.parity.max_abs_diff,
                }
                for fmt, r in self.results.items()
            },
            "int8_gate": None if self.gate is None else self.gate.to_dict(),
        }

    def format(self) -> str:
        lines = [f"export of {self.bundle_dir} ({self.seconds:.1f} s; parity on {self.parity_images})"]
        for fmt, r in self.results.items():
            files = ", ".join(r.files) if r.files else "-"
            lines.append(f"  {fmt:<5} {r.status.upper():<7} {files}  [{r.seconds:.1f} s]")
            if r.parity is not None:
                lines.append(f"        parity: {r.parity.format()}")
            if r.reason:
                lines.append(f"        {r.reason}")
        if self.gate is not None:
            lines.append(
                f"  int8 gate: macro-F1 fp32 {self.gate.macro_f1_fp32:.4f} int8 {self.gate.macro_f1_int8:.4f} "
                f"-> {'kept' if self.gate.passed else 'rejected'}"
            )
        return "\n".join(lines)


def _remove(folder: Path, names: Sequence[str]) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)


def _as_images(images: Any, what: str, image_size: int) -> np.ndarray | None:
    if images is None:
        return None
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1:] != (image_size, image_size, 3) or arr.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 (N, {image_size}, {image_size}, 3) RGB (preprocess_eval output), "
            f"got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr


def export_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    calibration_images: np.ndarray | None = None,
    val_images: np.ndarray | None = None,
    val_targets: np.ndarray | None = None,
    formats: Sequence[str] = EXPORT_FORMATS,
    ncnn_fp16: bool = False,
    threads: int | None = None,
) -> ExportReport:
    """Write the requested export formats into the bundle, check them, delete failures, report.

    ``calibration_images``: a few hundred resized training images (uint8 NHWC) for int8 calibration;
    ``val_images`` / ``val_targets``: validation images and their (N, L) 0/1 targets for the int8
    accuracy gate (at the bundle's ``thresholds.json``) and for parity. Without them int8 is skipped
    and parity runs on synthetic images. ``ncnn_fp16`` stores the ncnn weights as fp16 (half size),
    off by default because it fails the 1e-3 parity limit (measured up to 3.8e-2). ``bundle_dir`` may be local or ``s3://``.
    Export artifacts of formats not produced by this call are removed: they would not match model.pt.
    """
    from mlc_ray import storage

    formats = tuple(formats)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {EXPORT_FORMATS}")
    if ("int8" in formats or "ncnn" in formats) and "onnx" not in formats:
        raise ValueError("int8 and ncnn are derived from model.onnx: include 'onnx' in formats")
    bundle_dir = str(bundle_dir)
    if not storage.is_s3(bundle_dir):
        return _export_local(
            Path(bundle_dir.removeprefix("file://")).expanduser(),
            calibration_images,
            val_images,
            val_targets,
            formats,
            ncnn_fp16,
            threads,
        )
    # s3:// bundle: export in a local copy, then upload what was produced and delete what failed.
    with tempfile.TemporaryDirectory(prefix="mlc_ray-export-") as tmp:
        local = Path(tmp)
        for obj in storage.iter_objects(bundle_dir.rstrip("/") + "/"):
            rel = obj.uri[len(bundle_dir.rstrip("/")) + 1 :]
            if rel and "/" not in rel:
                storage.download_file(obj.uri, local / rel)
        report = _export_local(
            local, calibration_images, val_images, val_targets, formats, ncnn_fp16, threads
        )
        report.bundle_dir = bundle_dir
        for names in FORMAT_FILES.values():
            for name in names:
                uri = storage.join(bundle_dir, name)
                if (local / name).is_file():
                    storage.upload_file(local / name, uri)
                else:
                    storage.delete(uri)
        # last: the manifest of hashes that model caches compare with (see mlc_ray.bundle)
        storage.upload_file(local / SHA256_MANIFEST, storage.join(bundle_dir, SHA256_MANIFEST))
        return report


def _export_local(
    root: Path,
    calibration_images: Any,
    val_images: Any,
    val_targets: Any,
    formats: tuple[str, ...],
    ncnn_fp16: bool,
    threads: int | None,
) -> ExportReport:
    from mlc_ray.bundle import ModelBundle
    from mlc_ray.export import parity
    from mlc_ray.export.onnx import export_onnx, onnx_probabilities

    started = time.perf_counter()
    threads = max(1, int(threads or os.cpu_count() or 1))
    bundle = ModelBundle(root)
    model = bundle.load_model()
    size = int(bundle.preprocess().image_size)
    calibration_images = _as_images(calibration_images, "calibration_images", size)
    val_images = _as_images(val_images, "val_images", size)
    report = ExportReport(bundle_dir=str(root))
    # Stale exports from an earlier model.pt must not survive next to the new ones.
    _remove(root, [n for names in FORMAT_FILES.values() for n in names])

    if val_images is not None and len(val_images):
        check_images = val_images[:PARITY_IMAGES]
        report.parity_images = f"{len(check_images)} validation images"
    else:
        check_images = parity.synthetic_images(16, size)
        report.parity_images = f"{len(check_images)} synthetic images (no validation images given)"
    reference = parity.torch_probabilities(model, check_images)

    # [1] ONNX fp32
    if "onnx" in formats:
        t0 = time.perf_counter()
        result = FormatResult("onnx", "failed")
        try:
            export_onnx(model, bundle.onnx_path, image_size=size)
            result.parity = parity.compare_probabilities(
                "onnxruntime fp32",
                reference,
                onnx_probabilities(bundle.onnx_path, check_images, threads=threads),
            )
            result.parity.require()
            result.status, result.files = "ok", list(FORMAT_FILES["onnx"])
        except Exception as exc:  # noqa: BLE001  (any failure stops this artifact, with its reason)
            result.reason = f"{type(exc).__name__}: {exc}"
            _remove(root, FORMAT_FILES["onnx"])
        result.seconds = time.perf_counter() - t0
        report.results["onnx"] = result
    onnx_ok = report.ok("onnx")

    # [2] ONNX int8, behind the accuracy gate
    if "int8" in formats:
        report.results["int8"] = _export_int8(
            root, bundle, onnx_ok, calibration_images, val_images, val_targets, threads, report
        )

    # [3] ncnn via pnnx
    if "ncnn" in formats:
        t0 = time.perf_counter()
        result = FormatResult("ncnn", "failed")
        if not onnx_ok:
            result.status, result.reason = "skipped", "needs model.onnx, which failed"
        else:
            try:
                from mlc_ray.export.ncnn import convert_to_ncnn

                param, weights = convert_to_ncnn(bundle.onnx_path, root, fp16=ncnn_fp16)
                probs = parity.ncnn_probabilities(param, weights, check_images, threads=threads)
                result.parity = parity.compare_probabilities(
                    f"ncnn (fp16 weights={ncnn_fp16})", reference, probs
                )
                result.parity.require()
                result.status, result.files = "ok", list(FORMAT_FILES["ncnn"])
            except Exception as exc:  # noqa: BLE001
                result.reason = f"{type(exc).__name__}: {exc}"
                _remove(root, FORMAT_FILES["ncnn"])
        result.seconds = time.perf_counter() - t0
        report.results["ncnn"] = result

    bundle.write_manifest()  # sha256.json now lists the files that passed
    report.seconds = time.perf_counter() - started
    for fmt, result in report.results.items():
        if not result.ok:
            log.warning("export %s %s: %s", fmt, result.status, result.reason)
    log.info("%s", report.format())
    return report


def _export_int8(
    root: Path,
    bundle: Any,
    onnx_ok: bool,
    calibration_images: np.ndarray | None,
    val_images: np.ndarray | None,
    val_targets: Any,
    threads: int,
    report: ExportReport,
) -> FormatResult:
    from mlc_ray.export import parity
    from mlc_ray.export.onnx import onnx_probabilities
    from mlc_ray.export.quantize import int8_accuracy_gate, quantize_int8

    t0 = time.perf_counter()
    result = FormatResult("int8", "skipped")
    missing = []
    if not onnx_ok:
        missing.append("model.onnx (failed)")
    if calibration_images is None or len(calibration_images) == 0:
        missing.append("calibration images")
    if val_images is None or val_targets is None or len(val_images) == 0:
        missing.append("validation images + targets for the accuracy gate")
    if not bundle.has("thresholds.json"):
        missing.append("thresholds.json (calibrated thresholds for the gate)")
    if missing:
        result.reason = "int8 not exported: needs " + ", ".join(missing)
        return result
    try:
        targets = np.asarray(val_targets)
        if targets.shape[0] != len(val_images):
            raise ValueError(f"val_targets has {targets.shape[0]} rows for {len(val_images)} val_images")
        quantize_int8(bundle.onnx_path, bundle.int8_path, calibration_images)
        fp32 = onnx_probabilities(bundle.onnx_path, val_images, threads=threads)
        int8 = onnx_probabilities(bundle.int8_path, val_images, threads=threads)
        result.parity = parity.compare_probabilities(
            "onnxruntime int8",
            fp32,
            int8,
            reference_name="onnx fp32 (informative; the gate decides)",
            tolerance=float("inf"),
        )
        thresholds = bundle.thresholds()
        gate = int8_accuracy_gate(fp32, int8, targets, thresholds)
        report.gate = gate
        result.reason = gate.reason
        if gate.passed:
            result.status, result.files = "ok", list(FORMAT_FILES["int8"])
        else:
            result.status = "failed"
            _remove(root, FORMAT_FILES["int8"])
    except Exception as exc:  # noqa: BLE001
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
        _remove(root, FORMAT_FILES["int8"])
    result.seconds = time.perf_counter() - t0
    return result

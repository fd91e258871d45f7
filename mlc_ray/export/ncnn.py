"""ncnn export via the pnnx converter binary, and ``NcnnRunner``, the ncnn inference path.

Why the ncnn graph differs from ``model.onnx`` at its input: ncnn blobs are float Mats without a batch
axis, and ncnn has no uint8 ``Cast`` (pnnx leaves it as an unsupported ``Tensor.to`` layer). So the
exported ONNX graph is rewritten before conversion: its ``images`` input (uint8 NHWC) and the
``Cast`` + ``Transpose(0, 3, 1, 2)`` that follow it are replaced by a float32 NCHW input holding the
raw 0..255 RGB values. Everything after — the normalisation from ``preprocess.json``, the backbone and
the sigmoid — is the very same graph, so ncnn still normalises inside the net.

The ncnn contract (``model.ncnn.param`` / ``model.ncnn.bin``):

* input blob ``in0``: float32 Mat (w=S, h=S, c=3) of raw RGB 0..255 — exactly what
  ``ncnn.Mat.from_pixels(rgb_uint8_hwc, PIXEL_RGB, S, S)`` builds from a decoded image;
* output blob ``out0``: L sigmoid probabilities, labels in ``labels.json`` order.

So no side file is needed: ``NcnnRunner(param, bin)`` takes uint8 NHWC batches like the ONNX path.

Conversion runs the pnnx *binary* (``pnnx.EXEC_PATH``) with ``check=True`` in a temporary directory
(the ``pnnx.export()`` Python wrapper goes through TorchScript and ignores converter failures). A
failure raises ``ExportError`` carrying the tail of the converter's output.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlc_ray.errors import ExportError

__all__ = [
    "NCNN_INPUT",
    "NCNN_OUTPUT",
    "NcnnRunner",
    "convert_to_ncnn",
    "ncnn_input_graph",
    "pnnx_executable",
    "run_pnnx",
]

log = logging.getLogger(__name__)

NCNN_INPUT = "in0"
NCNN_OUTPUT = "out0"
PNNX_TIMEOUT_S = 900
_TAIL_CHARS = 2000


def pnnx_executable() -> str:
    """The pnnx converter binary: ``pnnx.EXEC_PATH`` from the pip package, else ``pnnx`` on PATH."""
    try:
        import pnnx

        path = getattr(pnnx, "EXEC_PATH", None)
        if path and os.path.isfile(path):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("pnnx")
    if found:
        return found
    raise ExportError("the pnnx converter is not installed: pip install pnnx (it ships the binary)")


def ncnn_input_graph(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Rewrite the exported graph for ncnn: uint8 NHWC ``images`` -> float32 NCHW ``in0`` (0..255).

    The ``Cast`` to float and the NHWC -> NCHW ``Transpose`` right after the input are removed; their
    consumers read the new input instead. ExportError when the graph does not start that way.
    """
    import onnx
    from onnx import TensorProto, helper

    from mlc_ray.export.onnx import INPUT_NAME

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inputs = [i for i in graph.input if i.name == INPUT_NAME]
    if not inputs:
        raise ExportError(f"{onnx_path}: no input {INPUT_NAME!r}; export it with mlc_ray.export.export_onnx")
    dims = inputs[0].type.tensor_type.shape.dim
    size = [d.dim_value for d in dims]
    if len(size) != 4 or size[3] != 3 or size[1] <= 0 or size[2] <= 0:
        raise ExportError(f"{onnx_path}: input {INPUT_NAME!r} should be [N, H, W, 3], got {size}")
    consumers = [n for n in graph.node if INPUT_NAME in n.input]
    cast = consumers[0] if len(consumers) == 1 else None
    if cast is None or cast.op_type != "Cast":
        raise ExportError(
            f"{onnx_path}: expected one Cast after {INPUT_NAME!r}, found {[n.op_type for n in consumers]}"
        )
    after_cast = [n for n in graph.node if cast.output[0] in n.input]
    transpose = after_cast[0] if len(after_cast) == 1 else None
    perm = None
    if transpose is not None and transpose.op_type == "Transpose":
        perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
    if perm != [[0, 3, 1, 2]]:
        raise ExportError(
            f"{onnx_path}: expected Transpose(perm=[0, 3, 1, 2]) after the input Cast, "
            f"found {[n.op_type for n in after_cast]}"
        )
    nchw = transpose.output[0]
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == nchw:
                node.input[k] = NCNN_INPUT
    graph.node.remove(cast)
    graph.node.remove(transpose)
    new_input = helper.make_tensor_value_info(NCNN_INPUT, TensorProto.FLOAT, [1, 3, size[1], size[2]])
    graph.input.remove(inputs[0])
    graph.input.insert(0, new_input)
    out_path = Path(out_path)
    onnx.save(model, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path


def _tail(text: str | bytes | None) -> str:
    """The last lines of the converter's output, without terminal colour codes."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return re.sub(r"\x1b\[[0-9;]*m", "", text or "")[-_TAIL_CHARS:].strip()


def convert_to_ncnn(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fp16: bool = False,
    timeout_s: float = PNNX_TIMEOUT_S,
    param_name: str = "model.ncnn.param",
    bin_name: str = "model.ncnn.bin",
) -> tuple[Path, Path]:
    """Convert an exported ``model.onnx`` to ``out_dir/model.ncnn.param`` + ``.bin`` with pnnx.

    ``fp16`` stores the weights as fp16 in the ``.bin`` (half the size). Off by default: measured on
    MobileNetV1 at 64 px, fp16 weights moved probabilities by up to 3.8e-2, far over the 1e-3 parity
    limit; fp32 weights stay within 1e-6..1e-4. Files land atomically; ExportError (with the converter's output
    tail) when pnnx fails, times out or produces no ncnn files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlc_ray-pnnx-") as tmp:
        work = Path(tmp)
        try:
            source = ncnn_input_graph(onnx_path, work / "model.onnx")
        except ExportError:
            raise
        except Exception as exc:  # a corrupt/unreadable ONNX file
            raise ExportError(f"{onnx_path}: cannot prepare the graph for pnnx: {exc}") from exc
        param, weights = run_pnnx(source, work, fp16=fp16, timeout_s=timeout_s, label=str(onnx_path))
        _check_param(param, onnx_path)
        targets = (out_dir / param_name, out_dir / bin_name)
        for src, dst in zip((param, weights), targets, strict=True):
            staged = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, staged)
            os.replace(staged, dst)
    log.info(
        "converted %s to ncnn %s (+ .bin %d bytes, fp16=%s)",
        onnx_path,
        targets[0],
        targets[1].stat().st_size,
        fp16,
    )
    return targets


def run_pnnx(
    source: str | os.PathLike[str],
    work: str | os.PathLike[str],
    *,
    fp16: bool = False,
    timeout_s: float = PNNX_TIMEOUT_S,
    label: str | None = None,
) -> tuple[Path, Path]:
    """Run the pnnx binary on ONNX ``source`` (float NCHW input) in ``work``; ExportError on failure."""
    exe = pnnx_executable()
    source, work = Path(source), Path(work)
    label = label or str(source)
    try:
        shape = _input_shape(source)
    except Exception:  # noqa: BLE001  (let pnnx itself report what is wrong with the file)
        shape = [1, 3, 224, 224]
    cmd = [
        exe,
        str(source),
        f"inputshape=[{','.join(str(d) for d in shape)}]f32",
        f"fp16={1 if fp16 else 0}",
        f"ncnnparam={work / 'out.ncnn.param'}",
        f"ncnnbin={work / 'out.ncnn.bin'}",
        f"ncnnpy={work / 'out_ncnn.py'}",
        f"pnnxparam={work / 'out.pnnx.param'}",
        f"pnnxbin={work / 'out.pnnx.bin'}",
        f"pnnxpy={work / 'out_pnnx.py'}",
        f"pnnxonnx={work / 'out.pnnx.onnx'}",
    ]
    try:
        proc = subprocess.run(cmd, cwd=work, check=True, capture_output=True, timeout=timeout_s)
    except subprocess.CalledProcessError as exc:
        raise ExportError(
            f"pnnx failed on {label} ({_exit_text(exc.returncode)}); converter output:\n"
            f"{_tail(exc.stderr) or _tail(exc.stdout)}"
        ) from None
    except subprocess.TimeoutExpired as exc:
        raise ExportError(
            f"pnnx did not finish converting {label} in {timeout_s:.0f} s; output:\n{_tail(exc.stderr)}"
        ) from None
    param, weights = work / "out.ncnn.param", work / "out.ncnn.bin"
    if not param.is_file() or not weights.is_file() or param.stat().st_size == 0:
        raise ExportError(
            f"pnnx wrote no ncnn files for {label}; converter output:\n{_tail(proc.stderr) or _tail(proc.stdout)}"
        )
    return param, weights


def _exit_text(code: int) -> str:
    return f"crashed with signal {-code}" if code < 0 else f"exit {code}"


def _input_shape(onnx_path: Path) -> list[int]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def _check_param(param: Path, source: Any) -> None:
    """The converted net must have the ``in0``/``out0`` blobs and no layer ncnn cannot run."""
    layers = [line.split() for line in param.read_text(encoding="utf-8").splitlines()[2:] if line.strip()]
    blobs = {blob for layer in layers for blob in layer[4:] if "=" not in blob}
    missing = [b for b in (NCNN_INPUT, NCNN_OUTPUT) if b not in blobs]
    if missing:
        raise ExportError(
            f"pnnx output for {source} lacks blob(s) {missing}; the ncnn contract needs in0/out0"
        )
    # pnnx keeps ops it cannot lower under their torch names (e.g. ``Tensor.to``, ``aten::...``);
    # ncnn fails on them at load time, so refuse here with the op names.
    unsupported = sorted({layer[0] for layer in layers if "." in layer[0] or "::" in layer[0]})
    if unsupported:
        raise ExportError(f"pnnx left ops ncnn cannot run in {param.name} for {source}: {unsupported}")


class NcnnRunner:
    """Run an exported ncnn net on uint8 NHWC RGB batches -> float32 (N, L) probabilities.

    One ``ncnn.Net`` is loaded once; each image gets its own light extractor (the ncnn way to run a
    net; extractors on one net may run concurrently). ``fp16`` turns on ncnn's fp16 storage/packing
    (faster on CPUs with fp16 support, less exact); the parity check runs with the default, False.
    ``meta`` may rename the blobs (``{"input_name": ..., "output_name": ...}``).
    """

    def __init__(
        self,
        param: str | os.PathLike[str],
        bin: str | os.PathLike[str],  # noqa: A002  (ncnn's own name for the weights file)
        meta: Mapping[str, Any] | None = None,
        *,
        num_threads: int = 1,
        fp16: bool = False,
    ) -> None:
        import ncnn

        meta = dict(meta or {})
        self.input_name = str(meta.get("input_name", NCNN_INPUT))
        self.output_name = str(meta.get("output_name", NCNN_OUTPUT))
        self._ncnn = ncnn
        net = ncnn.Net()
        net.opt.num_threads = max(1, int(num_threads))
        net.opt.use_vulkan_compute = False
        net.opt.use_fp16_storage = bool(fp16)
        net.opt.use_fp16_packed = bool(fp16)
        net.opt.use_fp16_arithmetic = bool(fp16)
        net.opt.use_bf16_storage = False
        for what, path, load in (("param", param, net.load_param), ("bin", bin, net.load_model)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ncnn {what} file {path} does not exist")
            if load(str(path)) != 0:
                raise ExportError(f"ncnn could not load {what} file {path}: re-run the export")
        self.net = net
        self.param_path, self.bin_path = str(param), str(bin)

    def run_one(self, image: np.ndarray) -> np.ndarray:
        """One uint8 (H, W, 3) RGB image -> float32 (L,) probabilities."""
        ncnn = self._ncnn
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got shape {image.shape}")
        height, width = image.shape[:2]
        mat = ncnn.Mat.from_pixels(image, ncnn.Mat.PixelType.PIXEL_RGB, width, height)
        extractor = self.net.create_extractor()
        try:
            extractor.input(self.input_name, mat)
            ret, out = extractor.extract(self.output_name)
            if ret != 0:
                raise RuntimeError(
                    f"ncnn extract of {self.output_name!r} failed (code {ret}) for {self.param_path}"
                )
            return np.array(out, dtype=np.float32).reshape(-1)
        finally:
            extractor.clear()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB -> float32 (N, L) probabilities."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[3] != 3 or batch.dtype != np.uint8:
            raise ValueError(f"expected a uint8 NHWC RGB batch, got shape {batch.shape} dtype {batch.dtype}")
        if len(batch) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.run_one(image) for image in batch])

    predict = run

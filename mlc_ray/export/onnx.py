"""Export an ``ImageTagger`` to ONNX fp32: uint8 NHWC pixels in, per-label probabilities out.

The graph contract (what ``model.onnx`` means everywhere else in mlc_ray):

* input ``images``: **uint8 [N, H, W, 3] RGB**, NHWC — decoded pixels feed the graph directly, with
  no float copy on the CPU (4x less memory traffic than float32 NCHW); the graph casts, transposes
  and normalises (``preprocess.json``: imagenet mean/std or per-image standardisation) itself;
* output ``probabilities``: float32 [N, L], sigmoid applied inside, labels in ``labels.json`` order;
* dynamic batch dimension ``N``; H = W = ``image_size``; opset 17.

We use the TorchScript exporter (``dynamo=False``). torch 2.14 defaults to the dynamo exporter, but
measured on MobileNetV2 at 64 px it took 51 s vs 8 s, could not produce opset 17 (it emits 18 and
its down-conversion fails), and its graph keeps ``Shape``/``Gather``/``Range`` plumbing around the
reductions; the TorchScript graph is plain ``Cast``/``Transpose``/``Conv``/``Gemm``/``Sigmoid``,
which onnxruntime, its quantizer and pnnx all accept. Its deprecation warning is silenced here.
No onnx-simplifier is installed, so none is run (the graph needs none).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "check_onnx",
    "export_onnx",
    "onnx_probabilities",
    "onnx_session",
]

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17


def _probability_module(model: Any) -> Any:
    """The module whose output is probabilities: ``ImageTagger.with_sigmoid()`` (or one already)."""
    from mlc_ray.models import ImageTagger, TaggerProbabilities

    if isinstance(model, TaggerProbabilities):
        return model
    if isinstance(model, ImageTagger):
        return model.with_sigmoid()
    raise TypeError(
        f"export_onnx needs an ImageTagger (uint8 NHWC in, normalisation inside), got {type(model).__name__}; "
        "wrap the backbone with mlc_ray.models.ImageTagger(backbone, preprocess)"
    )


def export_onnx(
    model: Any, path: str | os.PathLike[str], *, image_size: int, opset: int = DEFAULT_OPSET
) -> Path:
    """Write ``model`` (an ``ImageTagger``) as ONNX fp32 to local ``path`` (atomically) and check it.

    The model is exported in eval mode; its previous mode is restored afterwards.
    """
    import torch

    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is too old: the export contract needs opset >= {DEFAULT_OPSET}")
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _probability_module(model)
    was_training = wrapper.training
    wrapper.eval()
    example = torch.zeros((2, int(image_size), int(image_size), 3), dtype=torch.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter's DeprecationWarning and tracer warnings say nothing actionable here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                tmp,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=int(opset),
                do_constant_folding=True,
            )
        check_onnx(tmp)
        os.replace(tmp, path)
    finally:
        wrapper.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("exported ONNX fp32 %s (%d bytes, opset %d)", path, path.stat().st_size, opset)
    return path


def check_onnx(path: str | os.PathLike[str]) -> None:
    """``onnx.checker`` (full check, with shape inference) plus the input/output contract; ValueError if not."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"{path}: ONNX checker rejected the exported graph: {exc}") from None
    inputs = {i.name: i for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ValueError(
            f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
            f"got inputs {list(inputs)} and outputs {outputs}"
        )
    elem = inputs[INPUT_NAME].type.tensor_type.elem_type
    if elem != onnx.TensorProto.UINT8:
        raise ValueError(
            f"{path}: input {INPUT_NAME!r} must be uint8, got {onnx.TensorProto.DataType.Name(elem)}"
        )


def onnx_session(path: str | os.PathLike[str] | bytes, *, threads: int = 1) -> Any:
    """A CPU onnxruntime session with the options tagging uses (``onnx_run.open_session``)."""
    from mlc_ray.onnx_run import open_session

    return open_session(path, threads=threads)


def onnx_probabilities(path: str | os.PathLike[str], images: Any, *, threads: int = 1) -> Any:
    """Run an exported graph on uint8 NHWC ``images`` -> float32 (N, L) probabilities, as every CPU
    session of a bundle's graph runs (``onnx_run.run_graph``: one image per thread per call)."""
    from mlc_ray.onnx_run import cpu_images_per_call, run_graph

    return run_graph(
        onnx_session(path, threads=threads),
        images,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        images_per_call=cpu_images_per_call(threads),
    )

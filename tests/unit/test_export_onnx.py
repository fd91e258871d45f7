"""ONNX fp32 export: the graph contract (uint8 NHWC in, probabilities out, dynamic batch, opset 17)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mlc_ray.data.images import PreprocessConfig
from mlc_ray.export import ExportError
from mlc_ray.export.ncnn import NCNN_INPUT, ncnn_input_graph
from mlc_ray.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, onnx_probabilities, onnx_session
from mlc_ray.export.parity import synthetic_images, torch_probabilities
from mlc_ray.models import build_tagger, create_model, model_spec
from tests.helpers import EXPORT_LABELS as LABELS
from tests.helpers import EXPORT_SIZE as SIZE
from tests.helpers import randomise

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tagger():
    torch.manual_seed(1)
    return randomise(
        build_tagger(model_spec("mobilenet_v3_small", len(LABELS)), PreprocessConfig(image_size=SIZE))
    )


@pytest.fixture(scope="module")
def onnx_file(tagger, tmp_path_factory):
    return export_onnx(tagger, tmp_path_factory.mktemp("onnx") / "model.onnx", image_size=SIZE)


def test_graph_contract(onnx_file):
    model = onnx.load(str(onnx_file))
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", SIZE, SIZE, 3]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", len(LABELS)]
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    # sigmoid and the normalisation are inside the graph
    first = [n.op_type for n in model.graph.node if INPUT_NAME in n.input]
    last = [n.op_type for n in model.graph.node if OUTPUT_NAME in n.output]
    assert first == ["Cast"] and last == ["Sigmoid"]
    assert not [p.name for p in onnx_file.parent.iterdir() if p.name != "model.onnx"], (
        "temp files left behind"
    )


def test_dynamic_batch_matches_torch(onnx_file, tagger):
    images = synthetic_images(5, SIZE, seed=7)
    reference = torch_probabilities(tagger, images)
    session = onnx_session(onnx_file)
    one = session.run([OUTPUT_NAME], {INPUT_NAME: images[:1]})[0]
    five = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]  # the dynamic batch dimension
    assert one.shape == (1, len(LABELS)) and five.shape == (5, len(LABELS))
    assert np.abs(five - reference).max() <= 1e-4
    np.testing.assert_allclose(one[0], five[0], atol=1e-5)


def test_per_image_normalisation_exports(tmp_path):
    torch.manual_seed(2)
    pre = PreprocessConfig(image_size=SIZE, normalization="per_image")
    tagger = randomise(build_tagger(model_spec("mobilenet_v3_small", len(LABELS)), pre))
    path = export_onnx(tagger, tmp_path / "m.onnx", image_size=SIZE)
    images = synthetic_images(4, SIZE, seed=8)
    images[0] = 17  # a flat image: std is 0, the 1/sqrt(N) floor must keep it finite
    out = onnx_probabilities(path, images)
    assert np.isfinite(out).all()
    assert np.abs(out - torch_probabilities(tagger, images)).max() <= 1e-4


def test_export_restores_training_mode_and_rejects_bare_backbones(tmp_path):
    tagger = build_tagger(model_spec("mobilenet_v3_small", 2), PreprocessConfig(image_size=32)).train()
    export_onnx(tagger, tmp_path / "m.onnx", image_size=32)
    assert tagger.training and all(m.training for m in tagger.modules())
    with pytest.raises(TypeError, match="ImageTagger"):
        export_onnx(create_model("mobilenet_v3_small", 2), tmp_path / "b.onnx", image_size=32)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tagger, tmp_path / "c.onnx", image_size=32, opset=13)


def test_ncnn_input_graph_is_float_nchw_with_normalisation_inside(onnx_file, tagger, tmp_path):
    rewritten = ncnn_input_graph(onnx_file, tmp_path / "ncnn_in.onnx")
    model = onnx.load(str(rewritten))
    (inp,) = model.graph.input
    assert inp.name == NCNN_INPUT and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, SIZE, SIZE]
    images = synthetic_images(2, SIZE, seed=9)
    session = onnx_session(rewritten)
    raw = [
        session.run(None, {NCNN_INPUT: im.transpose(2, 0, 1)[None].astype(np.float32)})[0][0] for im in images
    ]
    assert np.abs(np.stack(raw) - torch_probabilities(tagger, images)).max() <= 1e-4


def test_ncnn_input_graph_rejects_foreign_graphs(tmp_path):
    x = onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.UINT8, [1, SIZE, SIZE, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [1, SIZE, SIZE, 3])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", [INPUT_NAME], ["y"])], "g", [x], [y])
    path = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(ExportError, match="expected one Cast"):
        ncnn_input_graph(path, tmp_path / "out.onnx")

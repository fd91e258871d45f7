"""int8: onnxruntime static QDQ quantization and the accuracy gate that decides whether it ships."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mlc_ray.calibrate import Thresholds
from mlc_ray.data.images import PreprocessConfig
from mlc_ray.export import export_bundle
from mlc_ray.export.onnx import INPUT_NAME, export_onnx, onnx_probabilities
from mlc_ray.export.parity import synthetic_images, torch_probabilities
from mlc_ray.export.quantize import int8_accuracy_gate, preprocessing_nodes, quantize_int8
from mlc_ray.models import build_tagger, model_spec
from tests.helpers import COLOR_SIZE, color_images, randomise, train_color_bundle, write_bundle
from tests.helpers import EXPORT_LABELS as LABELS
from tests.helpers import EXPORT_SIZE as SIZE

pytestmark = pytest.mark.timeout(180)


# ---- the gate on synthetic scores ------------------------------------------------------------------


def _scores(n=200, n_labels=10, seed=0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
    scores = np.clip(targets * 0.6 + rng.random((n, n_labels)) * 0.5, 0, 1)
    return scores, targets


def test_gate_keeps_int8_that_tracks_fp32():
    fp32, targets = _scores()
    int8 = fp32 + np.random.default_rng(1).normal(0, 1e-4, fp32.shape)
    result = int8_accuracy_gate(fp32, int8, targets, 0.5)
    assert result.passed, result.reason
    assert abs(result.macro_f1_fp32 - result.macro_f1_int8) <= 0.01
    assert result.reason.startswith("int8 kept")


def test_gate_rejects_a_macro_f1_drop():
    fp32, targets = _scores()
    int8 = fp32 * 0.8  # everything slides under the thresholds
    result = int8_accuracy_gate(fp32, int8, targets, np.full(10, 0.5))
    assert not result.passed
    assert result.macro_f1_fp32 - result.macro_f1_int8 > 0.01
    assert "macro-F1 dropped" in result.reason


def test_gate_rejects_one_label_dropping_although_macro_f1_holds():
    fp32, targets = _scores(n_labels=10)
    labels = [f"tag{i}" for i in range(10)]
    thresholds = Thresholds(labels, [0.5] * 10, "f1_max")
    base = int8_accuracy_gate(fp32, fp32, targets, thresholds)
    int8 = fp32.copy()
    positives = np.flatnonzero(targets[:, 3])
    int8[positives[:4], 3] = 0.0  # label tag3 misses 4 positives: its F1 drops ~0.03-0.05
    result = int8_accuracy_gate(fp32, int8, targets, thresholds)
    drop = result.macro_f1_fp32 - result.macro_f1_int8
    assert base.passed and drop <= 0.01
    assert not result.passed and result.worst_label == "tag3" and result.worst_drop > 0.03
    assert "tag3" in result.reason and "lost more than 0.03" in result.reason


def test_gate_validates_shapes():
    fp32, targets = _scores()
    with pytest.raises(ValueError, match="differ in shape"):
        int8_accuracy_gate(fp32, fp32[:, :3], targets, 0.5)
    with pytest.raises(ValueError, match="thresholds for"):
        int8_accuracy_gate(fp32, fp32, targets, [0.5, 0.5])


# ---- real quantization -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    torch.manual_seed(3)
    tagger = randomise(
        build_tagger(model_spec("mobilenet_v3_small", len(LABELS)), PreprocessConfig(image_size=SIZE))
    )
    path = export_onnx(tagger, tmp_path_factory.mktemp("q") / "model.onnx", image_size=SIZE)
    return tagger, path


def test_int8_is_smaller_tracks_fp32_and_keeps_the_input_path_float(fp32_model, tmp_path):
    tagger, fp32_path = fp32_model
    calibration = synthetic_images(48, SIZE, seed=11)
    out = quantize_int8(fp32_path, tmp_path / "model.int8.onnx", calibration)
    assert out.stat().st_size < 0.5 * fp32_path.stat().st_size
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert model.graph.input[0].name == INPUT_NAME
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # The input Cast/Transpose/normalisation stay float: no Q/DQ pair sits on the raw pixels; the first
    # quantization is the normalised input of the first Conv.
    pre = {n.name: n for n in model.graph.node if n.name in set(preprocessing_nodes(model))}
    float_ops = sorted(n.op_type for n in pre.values() if "Linear" not in n.op_type)
    assert float_ops == ["Cast", "Div", "Sub", "Transpose"]
    float_outputs = {out for n in pre.values() if "Linear" not in n.op_type for out in n.output}
    consumers = [n for n in model.graph.node if set(n.input) & (float_outputs | {INPUT_NAME})]
    quantized = [n for n in consumers if n.op_type == "QuantizeLinear"]
    assert len(quantized) == 1 and pre[quantized[0].name] and "Div" in quantized[0].input[0]
    images = synthetic_images(24, SIZE, seed=12)
    fp32 = onnx_probabilities(fp32_path, images)
    int8 = onnx_probabilities(out, images)
    assert np.abs(fp32 - torch_probabilities(tagger, images)).max() <= 1e-4
    # An untrained (randomised) net is a harsh case for 8-bit activations: its features barely vary
    # between images and `randomise` scales the head up to spread the logits, which amplifies the
    # quantization noise too (measured here, onnxruntime 1.32: mean |int8 - fp32| 0.12, r 0.76). A
    # trained net tracks far closer, and whether int8 ships is the accuracy gate's call on real
    # validation scores (test_export_bundle_applies_the_gate, benchmarks/int8.py). Here: the same
    # function, not noise: the int8 error is well under the fp32 outputs' own spread across images.
    spread = np.abs(fp32 - np.roll(fp32, 1, axis=0)).mean()
    assert np.abs(int8 - fp32).mean() < 0.5 * spread
    assert np.corrcoef(int8.ravel(), fp32.ravel())[0, 1] > 0.6
    with pytest.raises(ValueError, match="calibration_images"):
        quantize_int8(fp32_path, tmp_path / "x.onnx", calibration.astype(np.float32))


def test_export_bundle_applies_the_gate(tmp_path):
    folder, model = write_bundle(tmp_path / "b", "mobilenet_v3_small")
    val = synthetic_images(40, SIZE, seed=13)
    probs = torch_probabilities(model, val)
    thresholds = np.median(probs, axis=0)
    Thresholds(LABELS, list(thresholds), "f1_max").save(str(folder / "thresholds.json"))
    targets = (probs >= thresholds).astype(np.uint8)
    report = export_bundle(
        folder,
        calibration_images=synthetic_images(32, SIZE, seed=14),
        val_images=val,
        val_targets=targets,
        formats=("onnx", "int8"),
        threads=2,
    )
    gate = report.gate
    assert report.ok("onnx") and gate is not None
    # kept exactly when the gate passed; the report carries the numbers and the reason
    assert (folder / "model.int8.onnx").is_file() == gate.passed == report.ok("int8")
    assert gate.macro_f1_fp32 == pytest.approx(1.0)
    assert gate.reason in report.format()
    # Without calibration data int8 is skipped with a reason, and the stale artifact is gone.
    again = export_bundle(folder, formats=("onnx", "int8"), threads=2)
    assert again.results["int8"].status == "skipped"
    assert "calibration images" in again.results["int8"].reason
    assert not (folder / "model.int8.onnx").exists()


# ---- the gate on a trained model: keeps int8 that is as good, rejects int8 made worse on purpose ---


@pytest.fixture(scope="module")
def trained_color(tmp_path_factory):
    folder, tagger = train_color_bundle(tmp_path_factory.mktemp("trained") / "bundle")
    val_images, val_targets = color_images(120, seed=7)  # not the training images
    return folder, val_images, val_targets


def test_gate_keeps_int8_of_a_trained_model(trained_color):
    folder, val_images, val_targets = trained_color
    calibration, _ = color_images(64, seed=1)  # training-like images
    report = export_bundle(
        folder,
        calibration_images=calibration,
        val_images=val_images,
        val_targets=val_targets,
        formats=("onnx", "int8"),
        threads=2,
    )
    gate = report.gate
    assert gate is not None and gate.macro_f1_fp32 >= 0.95, gate  # the model is trained, not random
    assert gate.passed, gate.reason
    assert gate.macro_f1_fp32 - gate.macro_f1_int8 <= 0.01
    assert report.ok("int8") and (folder / "model.int8.onnx").is_file()


def test_gate_rejects_int8_made_worse_on_purpose(trained_color):
    """Calibrated on black images, int8's activation ranges fit nothing the model sees: the same
    trained model's int8 version must be rejected and its file deleted."""
    folder, val_images, val_targets = trained_color
    report = export_bundle(
        folder,
        calibration_images=np.zeros((64, COLOR_SIZE, COLOR_SIZE, 3), np.uint8),
        val_images=val_images,
        val_targets=val_targets,
        formats=("onnx", "int8"),
        threads=2,
    )
    gate = report.gate
    assert gate is not None and gate.macro_f1_fp32 >= 0.95, gate
    assert not gate.passed and gate.macro_f1_fp32 - gate.macro_f1_int8 > 0.01, gate
    assert "macro-F1 dropped" in gate.reason or "lost more than" in gate.reason
    assert not report.ok("int8") and not (folder / "model.int8.onnx").exists()

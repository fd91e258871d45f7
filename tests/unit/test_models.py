"""Model registry, MobileNet V1 vs the paper, ImageTagger normalisation/export, pretrained loading."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from mlc_ray.data.images import PreprocessConfig, normalize_batch_numpy
from mlc_ray.models import (
    ImageTagger,
    build_tagger,
    create_model,
    list_models,
    load_pretrained,
    model_complexity,
    model_spec,
    register_model,
    unregister_model,
)

EXPECTED_MODELS = {
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "resnet50",
    "resnext50_32x4d",
}


def _calibrated(model: nn.Module, size: int = 32, seed: int = 0) -> nn.Module:
    """Give BatchNorm real running statistics (fresh ones make every output ~equal) and go to eval."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=gen))
    return model.eval()


def _tagger_input(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)


# ---- registry ---------------------------------------------------------------------------------


def test_registry_lists_the_required_models() -> None:
    assert set(list_models()) >= EXPECTED_MODELS
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 5, dropout=0.2).train()
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0, 1, 0, 0]] * 2)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    head = model.get_submodule(model.head_key)
    assert isinstance(head, nn.Linear) and head.out_features == 5
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown model 'mobilenet_v4'.*did you mean 'mobilenet_v2'.*resnet50"
    ):
        create_model("mobilenet_v4", 3)


def test_duplicate_registration_is_an_error() -> None:
    def tiny_test_model(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
        return nn.Linear(3, num_labels)

    register_model(tiny_test_model)
    try:
        assert "tiny_test_model" in list_models()
        with pytest.raises(ValueError, match="already registered"):
            register_model(tiny_test_model)
    finally:
        unregister_model("tiny_test_model")
    assert "tiny_test_model" not in list_models()

    def mobilenet_v1(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
        return nn.Linear(3, num_labels)

    with pytest.raises(ValueError, match="'mobilenet_v1' is already registered"):
        register_model(mobilenet_v1)


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="num_labels"):
        create_model("mobilenet_v1", 0)
    with pytest.raises(ValueError, match="dropout"):
        create_model("mobilenet_v1", 3, dropout=1.0)
    with pytest.raises(ValueError, match="resnet50 has no width multiplier"):
        create_model("resnet50", 3, width=0.5)
    with pytest.raises(ValueError, match="mobilenet_v3_small has no width multiplier"):
        create_model("mobilenet_v3_small", 3, width=0.75)


def test_width_and_dropout_reach_the_model() -> None:
    full = sum(p.numel() for p in create_model("mobilenet_v2", 3).parameters())
    half = sum(p.numel() for p in create_model("mobilenet_v2", 3, width=0.5).parameters())
    assert half < 0.6 * full
    model = create_model("mobilenet_v1", 3, dropout=0.35)
    assert model.classifier[0].p == pytest.approx(0.35)
    assert create_model("resnet50", 3, dropout=0.1).fc[0].p == pytest.approx(0.1)


# ---- MobileNet V1 vs the paper ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "params_m", "madds_m", "params_tol"),
    [
        (1.0, 4.2, 569, 0.05),  # Table 8 (and Table 6, first row)
        (0.75, 2.6, 325, 0.05),  # Table 6
        (0.5, 1.3, 149, 0.05),
        (0.25, 0.5, 41, 0.05),
    ],
)
def test_mobilenet_v1_matches_the_paper(
    width: float, params_m: float, madds_m: float, params_tol: float
) -> None:
    c = model_complexity(create_model("mobilenet_v1", 1000, width=width), image_size=224)
    assert c.params / 1e6 == pytest.approx(params_m, abs=params_tol)
    assert c.macs / 1e6 == pytest.approx(madds_m, rel=0.01 if width >= 0.5 else 0.02)


def test_mobilenet_v1_structure_follows_table_1() -> None:
    model = create_model("mobilenet_v1", 1000)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 13 * 2  # stem + 13 depthwise-separable blocks
    assert sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d)) == len(convs)
    assert sum(1 for m in model.modules() if isinstance(m, nn.ReLU)) == len(convs)
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 13 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert [c.stride[0] for c in depthwise] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert convs[0].stride == (2, 2) and convs[-1].out_channels == 1024
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 3, 224, 224))
    assert feats.shape == (1, 1024, 7, 7)


# ---- ImageTagger ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_backbone() -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(create_model("mobilenet_v1", 4, width=0.25, dropout=0.0))


@pytest.mark.parametrize("normalization", ["imagenet", "per_image"])
def test_tagger_equals_backbone_on_reference_normalisation(
    small_backbone: nn.Module, normalization: str
) -> None:
    cfg = PreprocessConfig(image_size=32, normalization=normalization)
    tagger = ImageTagger(small_backbone, cfg).eval()
    x = _tagger_input()
    x[1] = 128  # a flat image: per_image std is clamped to 1/sqrt(N)
    normalised = tagger.normalize(x)
    ref = torch.from_numpy(normalize_batch_numpy(x.numpy(), cfg))
    torch.testing.assert_close(normalised, ref, atol=1e-5, rtol=1e-5)
    assert normalised.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = tagger(x), small_backbone(ref)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[0] - got[2]).abs().max() > 1e-3  # outputs depend on the image
    with torch.no_grad():
        torch.testing.assert_close(tagger.with_sigmoid()(x), torch.sigmoid(got))


def test_tagger_state_dict_holds_only_backbone_weights(small_backbone: nn.Module) -> None:
    tagger = ImageTagger(small_backbone, PreprocessConfig(image_size=32))
    keys = list(tagger.state_dict())
    assert keys and all(k.startswith("backbone.") for k in keys)


def test_build_tagger_from_model_json(small_backbone: nn.Module) -> None:
    cfg = PreprocessConfig(image_size=32, normalization="per_image")
    spec = model_spec("mobilenet_v1", 4, width=0.25, dropout=0.0)
    assert spec == {"arch": "mobilenet_v1", "num_labels": 4, "width": 0.25, "dropout": 0.0}
    original = ImageTagger(small_backbone, cfg).eval()
    rebuilt = build_tagger(json.loads(json.dumps(spec)), cfg.to_dict())
    rebuilt.load_state_dict(original.state_dict())
    rebuilt.eval()
    x = _tagger_input(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        build_tagger({**spec, "depth": 3}, cfg)
    with pytest.raises(ValueError, match=r"missing keys \['arch'\]"):
        build_tagger({"num_labels": 4}, cfg)


@pytest.mark.parametrize(("normalization", "dynamo"), [("imagenet", False), ("per_image", True)])
def test_tagger_exports_to_onnx_with_dynamic_batch(
    small_backbone: nn.Module, tmp_path, normalization: str, dynamo: bool
) -> None:
    import onnxruntime as ort

    tagger = ImageTagger(small_backbone, PreprocessConfig(image_size=32, normalization=normalization)).eval()
    wrapper = tagger.with_sigmoid()
    path = tmp_path / "model.onnx"
    kwargs = (
        {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
        if dynamo
        else {"dynamic_axes": {"images": {0: "batch"}, "probabilities": {0: "batch"}}}
    )
    torch.onnx.export(
        wrapper,
        (_tagger_input(n=2),),
        str(path),
        input_names=["images"],
        output_names=["probabilities"],
        opset_version=17,
        dynamo=dynamo,
        **kwargs,
    )
    assert not tagger.training and not tagger.backbone.training  # export left the tagger in eval mode
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    for n in (1, 5):
        x = _tagger_input(n=n, seed=n)
        (probs,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(probs, wrapper(x).numpy(), atol=1e-5)
        assert probs.shape == (n, 4)


# ---- pretrained loading -----------------------------------------------------------------------


def _params_equal(a: nn.Module, b: nn.Module, skip_prefix: str | None = None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if skip_prefix is None or not k.startswith(skip_prefix))


def test_pretrained_round_trip_and_head_reinit(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(1)
    source = _calibrated(create_model("mobilenet_v1", 5, width=0.25))
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)

    same = create_model("mobilenet_v1", 5, width=0.25, pretrained=str(path))
    assert _params_equal(same, source)

    with caplog.at_level(logging.INFO, logger="mlc_ray.models.registry"):
        other = create_model("mobilenet_v1", 7, width=0.25, pretrained=str(path))
    assert "re-initialising the classifier" in caplog.text and "5 labels, model has 7" in caplog.text
    assert _params_equal(other, source, skip_prefix="classifier.")
    assert other.classifier[1].weight.shape == (7, source.classifier[1].in_features)
    assert torch.count_nonzero(other.classifier[1].bias) == 0

    # an ImageTagger state dict (backbone.*), wrapped by DDP (module.*) and nested in a checkpoint
    tagger_state = ImageTagger(source, PreprocessConfig(image_size=32)).state_dict()
    nested = {"model": {f"module.{k}": v for k, v in tagger_state.items()}, "epoch": 3}
    torch.save(nested, tmp_path / "ckpt.pt")
    from_ckpt = create_model("mobilenet_v1", 5, width=0.25, pretrained=f"file://{tmp_path / 'ckpt.pt'}")
    assert _params_equal(from_ckpt, source)


@pytest.mark.parametrize(("arch", "head"), [("mobilenet_v3_small", "classifier.3"), ("resnet50", "fc.1")])
def test_pretrained_accepts_torchvision_layout(tmp_path, arch: str, head: str) -> None:
    from torchvision import models as tvm

    torch.manual_seed(2)
    reference = getattr(tvm, arch)(weights=None, num_classes=1000)  # torchvision's own layout, ImageNet head
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(arch, 3, pretrained=str(path))
    ref_state = reference.state_dict()
    own = model.state_dict()
    for key, value in ref_state.items():
        if (
            key.startswith(head.split(".")[0] + ".")
            and key.endswith((".weight", ".bias"))
            and value.shape[0] == 1000
        ):
            continue  # the 1000-way ImageNet layer: re-initialised for 3 labels
        assert torch.equal(own[key], value), key
    assert model.get_submodule(head).out_features == 3


def test_pretrained_errors_are_actionable(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_model("mobilenet_v1", 3, pretrained=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable state dict"):
        create_model("mobilenet_v1", 3, pretrained=str(tmp_path / "junk.pt"))
    torch.save(create_model("mobilenet_v1", 3, width=0.5).state_dict(), tmp_path / "half.pt")
    with pytest.raises(ValueError, match="other shapes.*same arch and width"):
        create_model("mobilenet_v1", 3, width=0.25, pretrained=str(tmp_path / "half.pt"))
    torch.save(create_model("mobilenet_v3_small", 3).state_dict(), tmp_path / "v3.pt")
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        load_pretrained(create_model("mobilenet_v1", 3), str(tmp_path / "v3.pt"))

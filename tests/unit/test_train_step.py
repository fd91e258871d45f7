"""The worker's training step (mlc_ray.train.step) on CPU with AMP on: the GPU code path, never dead code.

bf16 autocast on CPU runs the same ``train_step`` the Ray Train worker calls, with the scaler made the
way the worker makes it (disabled for bf16) and the model in channels-last memory. A forward hook on
the first convolution proves autocast was really active (its output is bf16) and that input and
weights were channels-last; fp16 on CPU runs the *enabled* scaler (scale, unscale, inf check).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mlc_ray.data.images import PreprocessConfig
from mlc_ray.models import build_tagger, list_models, model_spec
from mlc_ray.train.losses import build_loss
from mlc_ray.train.step import (
    amp_dtype_for,
    autocast,
    build_optimizer,
    make_grad_scaler,
    param_groups,
    to_device,
    train_step,
)

NUM_LABELS = 5
IMAGE_SIZE = 32


def _tagger(arch: str = "mobilenet_v2", width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    spec = model_spec(arch, NUM_LABELS, width=width)
    return build_tagger(spec, PreprocessConfig(image_size=IMAGE_SIZE))


def _batch(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (b, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=gen)
    targets = (torch.rand(b, NUM_LABELS, generator=gen) < 0.4).float()
    return images, targets


class ConvProbe:
    """Forward hook on the first Conv2d: what dtype it computed in, and in which memory layout."""

    def __init__(self, model: nn.Module) -> None:
        self.conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        self.calls: list[dict[str, object]] = []
        self.handle = self.conv.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.calls.append(
            {
                "out_dtype": output.dtype,
                "in_channels_last": inputs[0].is_contiguous(memory_format=torch.channels_last),
                "weight_channels_last": module.weight.is_contiguous(memory_format=torch.channels_last),
                "autocast_on": torch.is_autocast_enabled("cpu"),
            }
        )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    return [k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())]


@pytest.mark.parametrize("arch", list_models())
def test_bf16_autocast_step_on_cpu_is_the_amp_path(arch: str) -> None:
    amp_dtype = torch.bfloat16
    model = to_device(_tagger(arch), "cpu", channels_last=True)
    model.train()
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    scaler = make_grad_scaler("cpu", amp_dtype)
    assert not scaler.is_enabled()  # bf16 needs no loss scaling, exactly as on the GPU
    criterion = build_loss("bce", num_labels=NUM_LABELS, label_smoothing=0.1)
    probe = ConvProbe(model)
    before = _snapshot(model)
    images, targets = _batch()

    loss = train_step(
        model, images, targets, criterion=criterion, optimizer=optimizer, scaler=scaler, amp_dtype=amp_dtype
    )

    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert math.isfinite(float(loss))
    assert len(probe.calls) == 1
    call = probe.calls[0]
    assert call["autocast_on"], "autocast was not active inside the forward"
    assert call["out_dtype"] == torch.bfloat16, f"first conv computed in {call['out_dtype']}, not bf16"
    assert call["weight_channels_last"], "to_device(channels_last=True) left the weights NCHW-contiguous"
    assert call["in_channels_last"], "the ImageTagger's input to the first conv is not channels-last"
    changed = set(_changed(before, model))
    first_conv = next(k for k, v in model.named_parameters() if v is probe.conv.weight)
    head = list(before)[-1]  # the last Linear's bias
    assert {first_conv, head} <= changed, "the optimiser step did not reach the first conv and the head"
    # At 32 px a few BatchNorm biases on 1x1 maps can see a zero gradient; nearly all must move.
    assert len(changed) >= 0.9 * len(before), f"{len(before) - len(changed)} parameter tensors did not change"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp32_step_computes_in_fp32() -> None:
    """The control: without AMP the same probe sees fp32, so the bf16 assertion above can fail."""
    model = to_device(_tagger(), "cpu", channels_last=False).train()
    probe = ConvProbe(model)
    images, targets = _batch()
    before = _snapshot(model)
    loss = train_step(
        model,
        images,
        targets,
        criterion=build_loss("bce", num_labels=NUM_LABELS),
        optimizer=build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05),
        scaler=make_grad_scaler("cpu", None),
        amp_dtype=None,
    )
    assert math.isfinite(float(loss))
    assert probe.calls[0]["out_dtype"] == torch.float32
    assert not probe.calls[0]["autocast_on"]
    assert _changed(before, model)


def test_fp16_step_runs_the_enabled_scaler() -> None:
    """fp16 (the GPU's fallback without bf16): the scaler is on, scales the loss and steps the optimiser."""
    amp_dtype = torch.float16
    # CPU fp16 kernels are slow: the smallest registered net keeps this test short.
    model = to_device(_tagger("mobilenet_v1", width=0.25), "cpu", channels_last=True).train()
    scaler = make_grad_scaler("cpu", amp_dtype)
    assert scaler.is_enabled()
    optimizer = build_optimizer(model, "sgd", lr=0.05, weight_decay=0.0)
    criterion = build_loss("bce", num_labels=NUM_LABELS)
    probe = ConvProbe(model)
    images, targets = _batch()
    before = _snapshot(model)
    scales, losses = [], []
    # The scaler starts at 2**16: fp16 gradients overflow, the step is skipped and the scale halves,
    # until a step is applied -- the dynamics of the GPU's fp16 path.
    for _ in range(24):
        losses.append(
            float(
                train_step(
                    model,
                    images,
                    targets,
                    criterion=criterion,
                    optimizer=optimizer,
                    scaler=scaler,
                    amp_dtype=amp_dtype,
                )
            )
        )
        scales.append(scaler.get_scale())
        if _changed(before, model):
            break
    assert all(math.isfinite(v) for v in losses)
    assert all(c["out_dtype"] == torch.float16 for c in probe.calls)
    assert _changed(before, model), f"no fp16 step was applied in {len(scales)} steps (scales {scales})"
    assert all(b == a / 2 for a, b in zip([65536.0, *scales[:-2]], scales[:-1], strict=True))
    assert set(scaler.state_dict()) >= {"scale", "_growth_tracker"}  # what the checkpoint saves


def test_validation_autocast_context_matches_training() -> None:
    model = to_device(_tagger(), "cpu", channels_last=True).eval()
    probe = ConvProbe(model)
    images, _ = _batch()
    with torch.inference_mode(), autocast("cpu", torch.bfloat16):
        logits = model(images)
    assert probe.calls[0]["out_dtype"] == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    with torch.inference_mode(), autocast("cpu", None):
        assert model(images).dtype == torch.float32


def test_amp_dtype_follows_the_device() -> None:
    assert amp_dtype_for("cuda", True, bf16_supported=True) == torch.bfloat16
    assert amp_dtype_for("cuda", True, bf16_supported=False) == torch.float16
    assert amp_dtype_for("cuda", False, bf16_supported=True) is None
    assert amp_dtype_for("cpu", True) is None  # the worker trains in fp32 on CPU (TrainConfig.amp)
    assert not make_grad_scaler("cuda", torch.bfloat16).is_enabled()


def test_optimizer_groups_and_unknown_name() -> None:
    model = _tagger()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0), torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(model, "adam", lr=0.1, weight_decay=0.0)


def test_the_worker_has_one_training_step() -> None:
    """loop.py calls train_step/autocast/make_grad_scaler; it keeps no second copy of the step."""
    source = (Path(__file__).resolve().parents[2] / "mlc_ray" / "train" / "loop.py").read_text()
    assert "train_step(" in source and "make_grad_scaler(" in source and "amp_dtype_for(" in source
    for duplicate in (".backward(", "torch.autocast(", "GradScaler(", "optimizer.step(", "scaler.step("):
        assert duplicate not in source, f"loop.py has its own {duplicate!r}: use mlc_ray.train.step"


@pytest.mark.parametrize("channels_last", [True, False])
def test_ddp_takes_the_grads_of_channels_last_weights_without_a_copy(
    channels_last: bool, monkeypatch
) -> None:
    # the loop puts the weights in channels-last memory on CPU too: the NHWC batch makes conv backward
    # return channels-last grads, and MobileNetV1's contiguous depthwise weights made DDP warn "Grad
    # strides do not match bucket view strides" on every worker (and copy those grads)
    import warnings

    import torch.distributed as dist

    from tests.helpers import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = to_device(_tagger("mobilenet_v1", width=0.25), "cpu", channels_last=channels_last)
        ddp = nn.parallel.DistributedDataParallel(model)
        images, _ = _batch(4)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ddp(images).sum().backward()
    finally:
        dist.destroy_process_group()
    stride_warnings = [w for w in seen if "Grad strides do not match" in str(w.message)]
    assert bool(stride_warnings) is (not channels_last), [str(w.message)[:80] for w in seen]

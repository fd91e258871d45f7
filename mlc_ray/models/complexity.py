"""Model size and cost: parameter count and multiply-adds, measured with forward hooks.

Multiply-adds are counted for Conv2d (output elements x in_channels/groups x kH x kW) and Linear
(in_features x out_features per output row), the convention of the MobileNet paper's tables;
BatchNorm, activations and pooling are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Complexity:
    """Parameters and multiply-adds of one forward pass on one image."""

    params: int
    macs: int
    image_size: int

    def __str__(self) -> str:
        return f"{self.params / 1e6:.2f}M params, {self.macs / 1e6:.0f}M mult-adds at {self.image_size}px"


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, image_size: int = 224, channels: int = 3) -> int:
    """Multiply-adds of one forward pass of ``model`` on a ``1 x channels x S x S`` input."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += (output.numel() // module.out_features) * module.in_features * module.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def model_complexity(model: nn.Module, image_size: int = 224) -> Complexity:
    """Parameters and multiply-adds of ``model`` at ``image_size`` x ``image_size``."""
    return Complexity(
        params=count_parameters(model), macs=count_macs(model, image_size), image_size=image_size
    )

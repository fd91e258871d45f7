"""The training step, without Ray: what a GPU exercises in every training worker.

``mlc_ray.train.loop`` (the Ray Train worker) builds its model, optimiser and scaler with these
functions and calls ``train_step`` for every batch; ``benchmarks/gpu.py`` and the unit tests call the
same functions, so the AMP / scaler / channels-last path that runs on a GPU is the one that is tested
on CPU (bf16 autocast) and measured on a device machine. Nothing here imports Ray or MLflow.

* ``amp_dtype_for``: the autocast dtype of a device — bf16 on a GPU that supports it, else fp16 (with
  a loss scaler); ``None`` (fp32) on CPU, where the worker does not use AMP;
* ``make_grad_scaler``: enabled only for fp16 (bf16 has fp32's exponent range: no scaling needed);
* ``to_device``: model to the device, in channels-last memory on GPU (``ImageTagger`` turns uint8
  NHWC pixels into an NCHW view whose memory is already channels-last, so input and weights match);
* ``autocast``: the one autocast context, for training and validation;
* ``build_optimizer``: SGD (Nesterov) or AdamW, no weight decay on norms and biases;
* ``train_step``: forward under autocast, loss in fp32, backward through the scaler, optimiser step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "OPTIMIZERS",
    "amp_dtype_for",
    "autocast",
    "build_optimizer",
    "make_grad_scaler",
    "param_groups",
    "to_device",
    "train_step",
]

OPTIMIZERS = ("sgd", "adamw")


def amp_dtype_for(
    device_type: str, enabled: bool, *, bf16_supported: bool | None = None
) -> torch.dtype | None:
    """The autocast dtype the worker trains with on ``device_type`` ("cuda" or "cpu"); None = fp32.

    ``bf16_supported`` defaults to ``torch.cuda.is_bf16_supported()`` (Ampere and newer).
    """
    if not enabled or device_type != "cuda":
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def make_grad_scaler(device_type: str, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler that is enabled only for fp16 autocast (its state is saved in checkpoints)."""
    return torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)


def to_device(model: nn.Module, device: torch.device | str, *, channels_last: bool) -> nn.Module:
    """``model`` on ``device``; its 4-d weights in channels-last memory when ``channels_last``."""
    if channels_last:
        return model.to(device=device, memory_format=torch.channels_last)
    return model.to(device=device)


def autocast(device_type: str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` in ``amp_dtype``, or a disabled one when ``amp_dtype`` is None."""
    return torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases (1-d tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9, Nesterov) or ``adamw`` over ``param_groups(model, weight_decay)``."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def train_step(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    criterion: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
) -> Tensor:
    """One optimisation step on a batch; returns the (detached, fp32) loss.

    ``images`` are uint8 NHWC on the model's device (the ``ImageTagger`` normalises them); the loss is
    computed in fp32 outside autocast, so label smoothing and ASL's clamps keep their precision.
    With the scaler disabled (fp32, bf16) ``scale``/``step``/``update`` are plain backward + step.
    """
    with autocast(images.device.type, amp_dtype):
        logits = model(images)
    loss = criterion(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()

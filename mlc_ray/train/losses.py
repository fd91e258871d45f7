"""Multi-label losses: sigmoid BCE with label smoothing and per-label pos_weight, and ASL.

* ``bce``: ``binary_cross_entropy_with_logits`` on smoothed targets. Label smoothing is seed 000's
  formula, ``y * (1 - eps) + eps / num_labels`` (a positive becomes ``1 - eps + eps/L``, a negative
  ``eps/L``). ``pos_weight`` (one value per label) multiplies the positive term, e.g. from
  ``pos_weight_from_frequency``.
* ``asl``: Asymmetric Loss (Ridnik et al., ICCV 2021): positives are focused with ``(1 - p)^gamma_pos``;
  negatives use the shifted probability ``p_m = max(p - clip, 0)``, focused with ``p_m^gamma_neg``,
  so easy negatives (p <= clip) contribute nothing and the many easy negatives of multi-label data
  do not drown the few positives. The logs are computed with ``logsigmoid`` (and ``log1p`` of a
  value kept >= clip) so extreme logits stay finite; the math runs in fp32 even under autocast.
  With ``gamma_neg = gamma_pos = 0`` and ``clip = 0`` it equals ``bce``.

Both return the mean over batch and labels (the paper sums; the mean keeps learning rates
comparable between the two losses and batch sizes).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("bce", "asl")
DEFAULT_MAX_POS_WEIGHT = 10.0
# Floor under the focusing bases: pow(0, gamma < 1) has an infinite gradient (0 * inf = NaN).
_TINY = 1e-12


def smooth_targets(targets: Tensor, label_smoothing: float, num_labels: int) -> Tensor:
    """Seed 000's label smoothing: ``y * (1 - eps) + eps / num_labels``."""
    targets = targets.float()
    if label_smoothing == 0.0:
        return targets
    return targets * (1.0 - label_smoothing) + label_smoothing / num_labels


def _check_shapes(logits: Tensor, targets: Tensor, num_labels: int) -> None:
    if logits.shape != targets.shape or logits.ndim != 2 or logits.shape[1] != num_labels:
        raise ValueError(
            f"loss expects logits and targets of shape (B, {num_labels}); got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )


class SmoothedBCEWithLogits(nn.Module):
    """Sigmoid binary cross-entropy with seed-000 label smoothing and optional per-label pos_weight."""

    pos_weight: Tensor | None

    def __init__(
        self, num_labels: int, label_smoothing: float = 0.0, pos_weight: Tensor | None = None
    ) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_shapes(logits, targets, self.num_labels)
        y = smooth_targets(targets, self.label_smoothing, self.num_labels).to(logits.dtype)
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, label_smoothing={self.label_smoothing}"


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al. 2021): asymmetric focusing and probability shifting for negatives."""

    pos_weight: Tensor | None

    def __init__(
        self,
        num_labels: int,
        *,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        label_smoothing: float = 0.0,
        pos_weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_shapes(logits, targets, self.num_labels)
        x = logits.float()  # fp32 math even under autocast: the logs/powers need the range
        y = smooth_targets(targets, self.label_smoothing, self.num_labels).to(x.dtype)
        p = torch.sigmoid(x)
        # positive part: log p, focused by (1 - p)^gamma_pos; 1 - p = sigmoid(-x) is exact for large x
        loss_pos = F.logsigmoid(x)
        if self.gamma_pos > 0:
            loss_pos = loss_pos * torch.sigmoid(-x).clamp(min=_TINY).pow(self.gamma_pos)
        if self.pos_weight is not None:
            loss_pos = loss_pos * self.pos_weight.to(x.dtype)
        # negative part: shifted probability p_m = max(p - clip, 0); log(1 - p_m) >= log(1 - p)
        if self.clip > 0:
            p_m = (p - self.clip).clamp(min=0.0)
            loss_neg = torch.log1p(-p_m.clamp(max=1.0 - self.clip))  # 1 - p_m >= clip > 0: finite
        else:
            p_m = p
            loss_neg = F.logsigmoid(-x)
        if self.gamma_neg > 0:
            loss_neg = loss_neg * p_m.clamp(min=_TINY).pow(self.gamma_neg)
        loss = y * loss_pos + (1.0 - y) * loss_neg
        return -loss.mean()

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.num_labels}, gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, "
            f"clip={self.clip}, label_smoothing={self.label_smoothing}"
        )


def _as_pos_weight(
    pos_weight: Tensor | np.ndarray | Sequence[float] | None, num_labels: int
) -> Tensor | None:
    if pos_weight is None:
        return None
    w = torch.as_tensor(
        np.asarray(pos_weight, dtype=np.float32) if not isinstance(pos_weight, Tensor) else pos_weight
    )
    w = w.detach().float().flatten()
    if w.numel() != num_labels:
        raise ValueError(f"pos_weight has {w.numel()} values; expected one per label ({num_labels})")
    if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError(f"pos_weight values must be finite and > 0, got {w.tolist()}")
    return w.clone()


def build_loss(
    name: str = "bce",
    *,
    num_labels: int,
    label_smoothing: float = 0.0,
    pos_weight: Tensor | np.ndarray | Sequence[float] | None = None,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
) -> nn.Module:
    """The loss ``name`` (``bce`` or ``asl``) as a module ``loss(logits, targets) -> scalar``.

    ``gamma_neg``, ``gamma_pos`` and ``clip`` only apply to ``asl``.
    """
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), LOSSES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint}; choose one of {', '.join(LOSSES)}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    num_labels = int(num_labels)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    weights = _as_pos_weight(pos_weight, num_labels)
    if name == "bce":
        return SmoothedBCEWithLogits(num_labels, label_smoothing=label_smoothing, pos_weight=weights)
    if gamma_neg < 0 or gamma_pos < 0:
        raise ValueError(f"ASL gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"ASL clip must be in [0, 1), got {clip}")
    return AsymmetricLoss(
        num_labels,
        gamma_neg=gamma_neg,
        gamma_pos=gamma_pos,
        clip=clip,
        label_smoothing=label_smoothing,
        pos_weight=weights,
    )


def pos_weight_from_frequency(
    multi_hot: np.ndarray | Tensor, *, max_weight: float = DEFAULT_MAX_POS_WEIGHT
) -> Tensor:
    """Per-label ``negatives / positives`` from an (N, L) 0/1 matrix, clipped to [1/max, max].

    A label with no positives (nothing to up-weight) gets 1; the lower clip keeps a label present
    in every image from getting weight 0.
    """
    if max_weight < 1.0:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    y = np.asarray(multi_hot.cpu() if isinstance(multi_hot, Tensor) else multi_hot)
    if y.ndim != 2:
        raise ValueError(f"multi_hot must be (N, L), got shape {y.shape}")
    y = y.astype(bool)
    pos = y.sum(axis=0).astype(np.float64)
    neg = y.shape[0] - pos
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(pos > 0, neg / np.maximum(pos, 1.0), 1.0)
    w = np.clip(w, 1.0 / max_weight, max_weight)
    return torch.as_tensor(w, dtype=torch.float32)

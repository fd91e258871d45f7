"""Losses: seed-000 label smoothing, pos_weight, ASL (reduces to BCE; finite at extreme logits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlc_ray.train.losses import AsymmetricLoss, build_loss, pos_weight_from_frequency


def _batch(seed: int = 0, b: int = 6, n_labels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n_labels, generator=gen) * 3
    targets = (torch.rand(b, n_labels, generator=gen) < 0.4).float()
    return logits, targets


def test_label_smoothing_matches_hand_computation() -> None:
    eps, n_labels = 0.1, 4
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss = build_loss("bce", num_labels=n_labels, label_smoothing=eps)(logits, targets)
    # seed 000: y * (1 - eps) + eps / N  -> positives 0.925, negatives 0.025
    expected = 0.0
    for x, y in zip(logits[0].tolist(), targets[0].tolist(), strict=True):
        t = y * (1 - eps) + eps / n_labels
        p = 1 / (1 + math.exp(-x))
        expected += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    assert loss.item() == pytest.approx(expected / n_labels, rel=1e-6)


def test_no_smoothing_equals_torch_bce_and_pos_weight_is_applied() -> None:
    logits, targets = _batch()
    loss = build_loss("bce", num_labels=4)
    torch.testing.assert_close(loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))
    pw = [1.0, 2.0, 0.5, 4.0]
    weighted = build_loss("bce", num_labels=4, pos_weight=np.array(pw))
    torch.testing.assert_close(
        weighted(logits, targets),
        F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(pw)),
    )
    assert "pos_weight" in dict(weighted.named_buffers())  # moves with .to(device)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_asl_without_focusing_or_clip_equals_bce(eps: float) -> None:
    logits, targets = _batch(1)
    bce = build_loss("bce", num_labels=4, label_smoothing=eps, pos_weight=[1.0, 3.0, 1.0, 2.0])
    asl = build_loss(
        "asl",
        num_labels=4,
        label_smoothing=eps,
        gamma_neg=0,
        gamma_pos=0,
        clip=0,
        pos_weight=[1.0, 3.0, 1.0, 2.0],
    )
    assert isinstance(asl, AsymmetricLoss)
    torch.testing.assert_close(asl(logits, targets), bce(logits, targets))


def test_asl_matches_the_paper_formula() -> None:
    logits, targets = _batch(2)
    gn, gp, clip = 4.0, 1.0, 0.05
    loss = build_loss("asl", num_labels=4, gamma_neg=gn, gamma_pos=gp, clip=clip)(logits, targets)
    p = torch.sigmoid(logits.double())
    p_m = (p - clip).clamp(min=0)
    ref = targets * (1 - p) ** gp * torch.log(p) + (1 - targets) * p_m**gn * torch.log(1 - p_m)
    assert loss.item() == pytest.approx(-ref.mean().item(), rel=1e-5)
    # easy negatives (p <= clip) cost nothing
    easy = build_loss("asl", num_labels=1, clip=0.05)(torch.tensor([[-5.0]]), torch.tensor([[0.0]]))
    assert easy.item() == 0.0


@pytest.mark.parametrize("name", ["bce", "asl"])
@pytest.mark.parametrize("gamma", [4.0, 0.5])
def test_finite_loss_and_gradients_at_extreme_logits(name: str, gamma: float) -> None:
    logits = torch.tensor([[-1e4, 1e4, -200.0, 200.0, 0.0, 60.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    loss_fn = build_loss(name, num_labels=6, label_smoothing=0.1, gamma_neg=gamma, gamma_pos=gamma, clip=0.05)
    loss = loss_fn(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all()
    # under bf16 autocast-style inputs too
    loss_bf16 = loss_fn(logits.detach().bfloat16(), targets.bfloat16())
    assert torch.isfinite(loss_bf16)


def test_pos_weight_from_frequency() -> None:
    y = np.zeros((100, 4), dtype=np.uint8)
    y[:20, 0] = 1  # 20 pos / 80 neg -> 4
    y[:1, 1] = 1  # 1 / 99 -> clipped to 10
    y[:, 3] = 1  # every image: clipped up to 1/10, never 0
    w = pos_weight_from_frequency(y)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([4.0, 10.0, 1.0, 0.1]))  # label 2: no positives -> 1
    torch.testing.assert_close(
        pos_weight_from_frequency(torch.from_numpy(y), max_weight=50.0)[1], torch.tensor(50.0)
    )
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        pos_weight_from_frequency(np.zeros(5))


def test_build_loss_validation() -> None:
    with pytest.raises(ValueError, match="unknown loss 'bcee'.*did you mean 'bce'"):
        build_loss("bcee", num_labels=3)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("bce", num_labels=3, label_smoothing=1.0)
    with pytest.raises(ValueError, match="one per label"):
        build_loss("bce", num_labels=3, pos_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        build_loss("asl", num_labels=2, pos_weight=[1.0, 0.0])
    with pytest.raises(ValueError, match="clip"):
        build_loss("asl", num_labels=2, clip=1.0)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        build_loss("bce", num_labels=3)(torch.zeros(2, 4), torch.zeros(2, 4))

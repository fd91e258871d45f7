"""Training augmentation: seed 002's recipe (``AugmentConfig``) applied to the decoded uint8 pixels of
the one image path (``mlc_ray.data.images``) by ``TrainAugment``, before the resize to the model's size.

It goes through ``torchvision.transforms.v2``: measured no slower per image than the hand-written
PIL + numpy version it replaced for every default recipe (BENCHMARKS.md "Augmentation: PIL vs
torchvision.transforms.v2").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mlc_ray.data.images import PreprocessConfig, check_hwc

__all__ = ["AugmentConfig", "TrainAugment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Seed 002's training augmentation, tuned down for multi-label data (a crop must not cut labels out).

    No hue jitter: colours can be labels (the demo's ``red``).
    """

    crop_scale: tuple[float, float] = (0.7, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    hflip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.2  # factor drawn from [1-b, 1+b]
    contrast: float = 0.2
    saturation: float = 0.2
    degrees: float = 10.0  # affine rotation range +-degrees
    translate: float = 0.05  # affine shift, fraction of the size
    scale: tuple[float, float] = (0.9, 1.1)  # affine zoom range
    fill: tuple[int, int, int] = (124, 116, 104)  # ImageNet mean colour for pixels the affine uncovers

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"augment.crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"augment.hflip is a probability in [0, 1], got {self.hflip}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"augment.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.degrees <= 180 or not 0 <= self.translate < 0.5:
            raise ValueError(f"augment.degrees in [0, 180] and translate in [0, 0.5), got {self}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment.scale must satisfy 0 < lo <= hi, got {self.scale}")


@dataclass
class TrainAugment:
    """uint8 HWC -> (S, S, 3) uint8 through ``torchvision.transforms.v2``: random resized crop (a plain
    ``Resize`` when ``crop_scale`` is (1, 1), so the small-image default only shifts), horizontal flip,
    small affine (bilinear, ``fill`` outside; v2 shifts by whole pixels), colour jitter (brightness,
    contrast, saturation, in v2's random order). Deterministic for a given seed (or pass ``rng`` per
    call); torch's global generator is left as it was.

    A recipe with a random resized crop runs on the uint8 CHW tensor; the whole-image recipe (resize,
    flip, whole-pixel shifts) on a PIL image, so its pixels are ``preprocess_eval``'s, shifted.
    Measured per image on one thread against the hand-written PIL + numpy version this replaced
    (``benchmarks/augment.py``, BENCHMARKS.md "Augmentation: PIL vs torchvision.transforms.v2",
    2026-12-02): no slower for every default (photo recipe at 224 px: 0.83x from 640x480, 1.0x
    from a draft-size 320x240, 0.4x from 1920x1080; small-image recipe at 64 px: 0.67x); the photo
    recipe at 64 px, which no default uses, costs ~0.5 ms more (2.5x: v2's fixed per-step cost)."""

    cfg: PreprocessConfig
    seed: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._pipeline, self._on_tensor = _v2_pipeline(self.cfg, self.augment)

    def __call__(self, array: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        import torch

        check_hwc(array)
        rng = self.rng if rng is None else rng
        seed = int(rng.integers(0, 2**63 - 1))
        # v2 draws from torch's default generator: run on a state seeded from ``rng``, then put the
        # caller's state back (what ``torch.random.fork_rng`` does, without its ``torch.manual_seed``,
        # which costs more than a small image's whole augmentation)
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            if self._on_tensor:  # HWC uint8 -> CHW tensor view (a read-only array is copied first)
                chw = torch.from_numpy(array if array.flags.writeable else array.copy()).permute(2, 0, 1)
                return self._pipeline(chw).permute(1, 2, 0).contiguous().numpy()
            return np.array(self._pipeline(Image.fromarray(array, "RGB")), dtype=np.uint8)
        finally:
            generator.set_state(saved)


def _v2_pipeline(cfg: PreprocessConfig, a: AugmentConfig) -> tuple[Any, bool]:
    """``TrainAugment``'s ``v2.Compose`` and whether it runs on tensors (a random resized crop; the
    steps after it on float32 0..1) or PIL images (the whole-image resize). A step a setting switches
    off is left out."""
    import torch
    from torchvision.transforms import InterpolationMode, v2

    s = cfg.image_size
    jitter = a.brightness > 0 or a.contrast > 0 or a.saturation > 0
    interp = {"bilinear": InterpolationMode.BILINEAR}[cfg.interpolation]
    whole = tuple(a.crop_scale) == (1.0, 1.0)  # the whole image: no crop draw, no aspect fallback crop
    if whole:
        steps: list[Any] = [v2.Resize((s, s), interpolation=interp, antialias=True)]
    else:
        steps = [
            v2.RandomResizedCrop(
                (s, s), scale=a.crop_scale, ratio=a.crop_ratio, interpolation=interp, antialias=True
            )
        ]
    on_float = not whole and (a.degrees > 0 or a.translate > 0 or tuple(a.scale) != (1.0, 1.0) or jitter)
    if on_float:  # the affine and each jitter step would convert uint8 <-> float on their own
        steps.append(v2.ToDtype(torch.float32, scale=True))
    fill = tuple(f / 255 for f in a.fill) if on_float else tuple(a.fill)
    if a.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(a.hflip))
    shift = round(a.translate * s)
    if a.degrees == 0 and tuple(a.scale) == (1.0, 1.0):
        if shift > 0:  # shifts only: pad + crop, the whole-pixel shifts RandomAffine draws, 5x cheaper
            steps.append(v2.RandomCrop((s, s), padding=shift, fill=fill))
    else:
        steps.append(
            v2.RandomAffine(
                degrees=a.degrees,
                translate=(a.translate, a.translate) if a.translate > 0 else None,
                scale=a.scale if tuple(a.scale) != (1.0, 1.0) else None,
                interpolation=interp,
                fill=fill,
            )
        )
    if jitter:
        steps.append(v2.ColorJitter(brightness=a.brightness, contrast=a.contrast, saturation=a.saturation))
    if on_float:
        steps.append(v2.ToDtype(torch.uint8, scale=True))
    return v2.Compose(steps), not whole

"""Per-image cost of the training augmentation: ``TrainAugment`` (torchvision.transforms.v2) vs the
hand-written PIL + numpy version it replaced, and its v2 ``Compose`` on either input type.

    .venv/bin/python benchmarks/augment.py [--images 200] [--repeats 3] [--out augment.json]

Every variant does the same work per image with the same ``AugmentConfig``:

* ``old``: ``LegacyAugment`` below, the PIL + numpy ``TrainAugment`` before the switch to v2 (one
  box resize for the crop, PIL flip and affine, jitter on float32 pixels); kept here as the
  reference, not in the library;
* ``new``: ``mlc_ray.data.augment.TrainAugment`` (what ``train/data.py`` runs in its decode tasks):
  its v2 ``Compose`` on a uint8 tensor (recipes with a random resized crop) or a PIL image (the
  whole-image recipe), seeded per call on torch's default generator, whose state is put back;
* ``v2_tensor`` / ``v2_pil``: the same ``Compose`` on a uint8 CHW tensor
  (``torch.from_numpy(hwc).permute(2, 0, 1)``, back to HWC numpy) / on a ``PIL.Image``, without
  the seeding: the two input types ``TrainAugment`` chooses between (on PIL the ``ToDtype`` steps of
  the photo recipe pass the image through and its fill is off-colour; the cost is what it measures).

Inputs: decoded RGB arrays as the decode tasks hand them over, smooth random content: a 640x480
photo to 224 px (full decode), 320x240 to 224 px (the same photo after the ``draft`` decode, which
stops at the smallest DCT scale not below the model size), 1920x1080 to 224 px, and a 64x64 image
to 64 px, once with the photo recipe (``AugmentConfig()``) and once with ``small_image_augment()``
(what a 64 px config gets by default). One thread (``torch.set_num_threads(1)``: a Ray Data decode
task is one CPU). Prints per-image milliseconds, the median of ``--repeats`` passes (interleaved: each repeat
times every variant once).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np

# (width, height, model side, recipe): "photo" = AugmentConfig(), "small" = small_image_augment()
CASES = (
    (640, 480, 224, "photo"),
    (320, 240, 224, "photo"),
    (1920, 1080, 224, "photo"),
    (64, 64, 64, "photo"),
    (64, 64, 64, "small"),
)


class LegacyAugment:
    """The hand-written ``TrainAugment`` (PIL + numpy) that v2 replaced: the benchmark's reference."""

    def __init__(self, cfg, seed: int | None = None, augment=None) -> None:
        from mlc_ray.data.augment import AugmentConfig

        self.cfg, self.augment = cfg, augment or AugmentConfig()
        self.rng = np.random.default_rng(seed)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        from PIL import Image

        rng, a, s = self.rng, self.augment, self.cfg.image_size
        interp = Image.Resampling.BILINEAR
        im = Image.fromarray(array, "RGB")
        im = im.resize((s, s), interp, box=self._crop_box(array.shape[1], array.shape[0]))
        if rng.random() < a.hflip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if a.degrees > 0 or a.translate > 0 or a.scale != (1.0, 1.0):
            angle = math.radians(rng.uniform(-a.degrees, a.degrees))
            zoom = rng.uniform(*a.scale)
            tx, ty = rng.uniform(-a.translate, a.translate, size=2) * s
            c = s / 2.0
            cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
            ox, oy = -c - tx, -c - ty
            matrix = (cos, sin, cos * ox + sin * oy + c, -sin, cos, -sin * ox + cos * oy + c)
            im = im.transform((s, s), Image.Transform.AFFINE, matrix, interp, fill=1, fillcolor=a.fill)
        out = np.asarray(im, dtype=np.float32)
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if a.brightness > 0:
            out = out * rng.uniform(1 - a.brightness, 1 + a.brightness)
        if a.contrast > 0:
            gray_mean = float((out @ weights).mean())
            out = (out - gray_mean) * rng.uniform(1 - a.contrast, 1 + a.contrast) + gray_mean
        if a.saturation > 0:
            gray = (out @ weights)[:, :, None]
            out = (out - gray) * rng.uniform(1 - a.saturation, 1 + a.saturation) + gray
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        rng, area = self.rng, width * height
        lo, hi = self.augment.crop_ratio
        for _ in range(10):
            target = area * rng.uniform(*self.augment.crop_scale)
            ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width and h <= height:
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                return (x, y, x + w, y + h)
        return (0.0, 0.0, float(width), float(height))


def _time(fn, arrays: list[np.ndarray]) -> float:
    """Milliseconds per image of one pass over ``arrays``."""
    t = time.perf_counter()
    for array in arrays:
        fn(array)
    return (time.perf_counter() - t) / len(arrays) * 1e3


def main(argv: list[str] | None = None) -> int:
    import torch
    from PIL import Image

    from mlc_ray.data.augment import AugmentConfig, TrainAugment, _v2_pipeline
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.train.config import small_image_augment

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images per size per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    recipes = {"photo": AugmentConfig(), "small": small_image_augment()}
    report: dict = {"recipes": {"photo": "AugmentConfig()", "small": "small_image_augment()"}}
    report |= {"threads": 1, "ms_per_image": {}}
    for width, height, size, recipe in CASES:
        a = recipes[recipe]
        # smooth random images (JPEG-like content; pure noise would favour no kernel in particular)
        small = rng.integers(0, 256, size=(args.images, height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        arrays = [
            np.array(Image.fromarray(s, "RGB").resize((width, height), Image.Resampling.BILINEAR))
            for s in small
        ]
        cfg = PreprocessConfig(image_size=size)
        old = LegacyAugment(cfg, seed=0, augment=a)
        new = TrainAugment(cfg, seed=0, augment=a)
        steps, _ = _v2_pipeline(cfg, a)

        def v2_tensor(array: np.ndarray, steps=steps) -> np.ndarray:
            return steps(torch.from_numpy(array).permute(2, 0, 1)).permute(1, 2, 0).numpy()

        def v2_pil(array: np.ndarray, steps=steps) -> np.ndarray:
            return np.asarray(steps(Image.fromarray(array, "RGB")))

        variants = {"old": old, "new": new, "v2_tensor": v2_tensor, "v2_pil": v2_pil}
        for fn in variants.values():  # warm-up, and the output contract
            out = fn(arrays[0])
            assert out.shape == (size, size, 3) and out.dtype == np.uint8, (out.shape, out.dtype)
        key = f"{width}x{height}->{size} {recipe}"
        passes: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved, so a burst of other load hits every variant
            for name, fn in variants.items():
                passes[name].append(_time(fn, arrays))
        report["ms_per_image"][key] = {name: round(statistics.median(p), 3) for name, p in passes.items()}
        print(json.dumps({key: report["ms_per_image"][key]}), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

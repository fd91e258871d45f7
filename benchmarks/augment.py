"""Per-image cost of the training augmentation: ``TrainAugment`` (PIL + numpy) vs torchvision.transforms.v2.

    .venv/bin/python benchmarks/augment.py [--images 200] [--repeats 3] [--out augment.json]

Both pipelines do the same work per image with the same ``AugmentConfig`` (the defaults: random
resized crop to S x S, flip, affine rotate/shift/zoom, brightness/contrast/saturation jitter):

* ``pil``: ``mlc_ray.data.images.TrainAugment`` (what ``train/data.py`` runs in its decode tasks);
* ``v2_tensor``: ``v2.Compose([RandomResizedCrop(antialias), RandomHorizontalFlip, RandomAffine,
  ColorJitter])`` on a uint8 CHW tensor (``torch.from_numpy(hwc).permute(2, 0, 1)``), back to HWC numpy;
* ``v2_pil``: the same Compose on a ``PIL.Image`` (torchvision dispatches to its PIL kernels).

Inputs: decoded RGB arrays as the decode tasks hand them over, at three sizes (a 640x480 photo to
224 px, 1920x1080 to 224 px, a 64x64 image to 64 px). One thread (``torch.set_num_threads(1)``: a
Ray Data decode task is one CPU). Prints per-image milliseconds, the median of ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

CASES = ((640, 480, 224), (1920, 1080, 224), (64, 64, 64))


def v2_pipeline(size: int, a):  # a: AugmentConfig
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=a.crop_scale, ratio=a.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(a.hflip),
            v2.RandomAffine(
                degrees=a.degrees, translate=(a.translate, a.translate), scale=a.scale, fill=list(a.fill)
            ),
            v2.ColorJitter(brightness=a.brightness, contrast=a.contrast, saturation=a.saturation),
        ]
    )


def _time(fn, arrays: list[np.ndarray], repeats: int) -> float:
    passes = []
    for _ in range(repeats):
        t = time.perf_counter()
        for array in arrays:
            fn(array)
        passes.append((time.perf_counter() - t) / len(arrays) * 1e3)
    return statistics.median(passes)


def main(argv: list[str] | None = None) -> int:
    import torch
    from PIL import Image

    from mlc_ray.data.images import AugmentConfig, PreprocessConfig, TrainAugment

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images per size per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a = AugmentConfig()
    report: dict = {"augment": "AugmentConfig() defaults", "threads": 1, "ms_per_image": {}}
    for width, height, size in CASES:
        # smooth random images (JPEG-like content; pure noise would favour no kernel in particular)
        small = rng.integers(0, 256, size=(args.images, height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        arrays = [
            np.array(Image.fromarray(s, "RGB").resize((width, height), Image.Resampling.BILINEAR))
            for s in small
        ]
        pil = TrainAugment(PreprocessConfig(image_size=size), seed=0, augment=a)
        pipe = v2_pipeline(size, a)

        def v2_tensor(array: np.ndarray, pipe=pipe) -> np.ndarray:
            return pipe(torch.from_numpy(array).permute(2, 0, 1)).permute(1, 2, 0).numpy()

        def v2_pil(array: np.ndarray, pipe=pipe) -> np.ndarray:
            return np.asarray(pipe(Image.fromarray(array, "RGB")))

        for fn in (pil, v2_tensor, v2_pil):  # warm-up, and the output contract
            out = fn(arrays[0])
            assert out.shape == (size, size, 3) and out.dtype == np.uint8, (out.shape, out.dtype)
        key = f"{width}x{height}->{size}"
        report["ms_per_image"][key] = {
            "pil": round(_time(pil, arrays, args.repeats), 3),
            "v2_tensor": round(_time(v2_tensor, arrays, args.repeats), 3),
            "v2_pil": round(_time(v2_pil, arrays, args.repeats), 3),
        }
        print(json.dumps({key: report["ms_per_image"][key]}), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode policy: PIL draft (reduced-scale JPEG decode) vs full decode, speed and what it changes.

    .venv/bin/python benchmarks/decode_policy.py [--size 224] [--images 4] [--repeats 3]

For photo-like JPEGs (``mlc_ray.data.photos``: gradients, shapes, texture, noise; quality 90, 4:2:0)
at 640x480, 1920x1080 and 4000x3000, and each policy of ``PreprocessConfig.decode``:

* ms per image of ``prepare_image`` (decode + EXIF/RGB + resize to size x size), best of
  ``--repeats`` passes (the two policies interleaved, so load from other processes hits both), one thread;
* the pixel difference between the two policies' model inputs (mean / max |delta| grey levels);
* as the yardstick, what JPEG q90 compression itself changes: the uncompressed pixels resized the
  same way vs the full decode (pixels, and logits below);
* the score difference: max |delta logit| over labels and images of an ImageTagger (MobileNetV1
  x0.5, 27 labels, random init seeded, BatchNorm statistics set on 8 other photo-like images; fp32 torch) fed both inputs, next to the spread of the same
  logits *between* images (their std over images, averaged over labels). A random-init network is
  no trained tagger, so the absolute numbers say little; the ratio says how much of what tells one
  image from another the policy changes.

Prints one JSON object (and a table on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

SIZES = ((640, 480), (1920, 1080), (4000, 3000))


def main(argv: list[str] | None = None) -> int:
    import torch

    from mlc_ray.data.images import PreprocessConfig, prepare_image, preprocess_eval
    from mlc_ray.data.photos import photo_like_array, photo_like_bytes
    from mlc_ray.models import ImageTagger, create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4, help="images per resolution")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfgs = {p: PreprocessConfig(image_size=args.size, decode=p) for p in ("full", "draft")}
    model = ImageTagger(create_model("mobilenet_v1", 27, width=0.5), cfgs["full"])
    # A random-init net's activations vanish with depth (BatchNorm's running stats are still 0/1), so
    # set the BN statistics from 8 other photo-like images first: a random-feature network whose
    # logits do tell images apart.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    warm = np.stack(
        [prepare_image(photo_like_bytes(640, 480, seed=100 + i), cfgs["full"]).pixels for i in range(8)]
    )
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(warm))
    model.eval()
    blob_seeds = range(args.images)
    rows = []
    for w, h in SIZES:
        blobs = [photo_like_bytes(w, h, "jpeg", seed=i) for i in blob_seeds]
        row: dict = {"resolution": f"{w}x{h}", "images": len(blobs)}
        inputs = {}
        best = dict.fromkeys(cfgs, float("inf"))
        for _ in range(args.repeats):
            for policy, cfg in cfgs.items():
                t0 = time.perf_counter()
                out = [prepare_image(b, cfg).pixels for b in blobs]
                best[policy] = min(best[policy], time.perf_counter() - t0)
                inputs[policy] = np.stack(out)
        for policy in cfgs:
            row[f"{policy}_ms_per_image"] = round(1000 * best[policy] / len(blobs), 2)
        # reference: what JPEG q90 itself changes (the uncompressed pixels, resized the same way)
        originals = np.stack(
            [preprocess_eval(photo_like_array(w, h, seed=i), cfgs["full"]) for i in blob_seeds]
        )
        jpeg_delta = np.abs(originals.astype(np.int16) - inputs["full"].astype(np.int16))
        row["jpeg_q90_pixel_mean_abs_diff"] = round(float(jpeg_delta.mean()), 3)
        delta = np.abs(inputs["full"].astype(np.int16) - inputs["draft"].astype(np.int16))
        row["pixel_mean_abs_diff"] = round(float(delta.mean()), 3)
        row["pixel_max_abs_diff"] = int(delta.max())
        with torch.inference_mode():
            z_full = model(torch.from_numpy(inputs["full"])).numpy()
            z_draft = model(torch.from_numpy(inputs["draft"])).numpy()
        row["logit_max_abs_diff"] = round(float(np.abs(z_full - z_draft).max()), 5)
        row["logit_between_image_std"] = round(float(z_full.std(axis=0).mean()), 5)
        with torch.inference_mode():
            z_orig = model(torch.from_numpy(originals)).numpy()
        row["jpeg_q90_logit_max_abs_diff"] = round(float(np.abs(z_orig - z_full).max()), 5)
        row["speedup"] = round(row["full_ms_per_image"] / row["draft_ms_per_image"], 2)
        rows.append(row)
        print(
            f"{row['resolution']:>10}  full {row['full_ms_per_image']:7.2f} ms  draft "
            f"{row['draft_ms_per_image']:7.2f} ms  x{row['speedup']:<5}  pixels mean {row['pixel_mean_abs_diff']}"
            f" max {row['pixel_max_abs_diff']}  logits max {row['logit_max_abs_diff']}"
            f" (between images {row['logit_between_image_std']}); JPEG q90 itself: pixels mean"
            f" {row['jpeg_q90_pixel_mean_abs_diff']} logits max {row['jpeg_q90_logit_max_abs_diff']}",
            file=sys.stderr,
        )
    print(json.dumps({"size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

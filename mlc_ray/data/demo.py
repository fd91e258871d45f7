"""The embedded demo data set: a small multi-label set of drawn shapes that trains in minutes.

``generate_demo`` draws a small multi-label set of coloured shapes on textured backgrounds that a
small CNN learns in minutes on 2 CPUs. Its labels (``LABELS``):

* four shapes: ``circle``, ``square``, ``triangle``, ``star`` (0-2 kinds per image, imbalanced:
  circle is ~4x as common as star);
* two background textures: ``stripes``, ``dots`` (else a plain, noisy background);
* ``red``: at least one shape is red (other shapes use non-red colours).

Every image has 1-3 labels. ``RARE_COMBINATION`` = (circle, square): both are common alone but appear
together in only ~2% of images (seed 000's ``cat_dog`` situation), so hard-sample mining has
something to fix. Shape-set counts are exact quotas per split (``SHAPE_SET_WEIGHTS``), so every
generation with the same arguments has the same label counts, and the same seed gives the same bytes.

Layout under ``root`` (a local folder or ``s3://bucket/prefix``)::

    manifest.csv        image,labels,split   (image paths relative: images/00000.jpg)
    labels.txt          LABELS, one per line
    images/NNNNN.jpg
    _DEMO_COMPLETE      JSON of the generation arguments, written last (see ensure_demo_data)

The corpora of good and bad image files (``bad_image_samples``, ``good_image_samples``,
``pattern_problems``, ``Sample``) live in ``mlc_ray.data.samples``; they are re-exported here for the
callers that know them as ``demo.*``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw

# Re-exported: tests and benchmarks know the image corpora as demo.*.
from mlc_ray.data.samples import Sample, bad_image_samples, good_image_samples, pattern_problems  # noqa: F401

log = logging.getLogger(__name__)

DEMO_ROOT = "data/demo"
SHAPES = ("circle", "square", "triangle", "star")
TEXTURES = ("stripes", "dots")
LABELS = (*SHAPES, *TEXTURES, "red")
RARE_COMBINATION = ("circle", "square")
MARKER = "_DEMO_COMPLETE"
DEMO_FORMAT_VERSION = 1  # bump when the drawing changes: ensure_demo_data then regenerates

# Fraction of images per set of shape kinds. The rare pair is 2%; each shape alone is common.
SHAPE_SET_WEIGHTS: dict[tuple[str, ...], float] = {
    ("circle",): 0.26,
    ("square",): 0.22,
    ("triangle",): 0.16,
    ("star",): 0.08,
    ("circle", "triangle"): 0.06,
    ("square", "triangle"): 0.05,
    ("circle", "star"): 0.04,
    ("square", "star"): 0.04,
    ("triangle", "star"): 0.03,
    ("circle", "square"): 0.02,  # RARE_COMBINATION
    (): 0.04,  # texture only
}
TEXTURE_WEIGHTS = {"stripes": 0.25, "dots": 0.15, None: 0.60}
RED_PROBABILITY = 0.3  # per drawn shape

_RED = (215, 35, 35)
_NON_RED = ((40, 80, 220), (40, 165, 60), (230, 205, 40), (40, 195, 210), (130, 60, 185))


# ----------------------------------------------------------------------------------------------
# the demo data set


def _quota(weights: dict, n: int) -> list:
    """Exact counts per key summing to n (largest remainder), in a fixed key order."""
    keys = list(weights)
    raw = np.array([weights[k] for k in keys], dtype=np.float64)
    raw = raw / raw.sum() * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [k for k, c in zip(keys, counts, strict=True) for _ in range(c)]


def _plan(n: int, rng: np.random.Generator) -> list[tuple[tuple[str, ...], str | None, list[bool]]]:
    """(shape kinds, texture, red flag per shape) for n images with exact shape-set quotas."""
    shape_sets = _quota(SHAPE_SET_WEIGHTS, n)
    rng.shuffle(shape_sets)
    textures = list(TEXTURE_WEIGHTS)
    probs = np.array(list(TEXTURE_WEIGHTS.values()))
    plan = []
    for shapes in shape_sets:
        if shapes:
            texture = textures[rng.choice(len(textures), p=probs / probs.sum())]
        else:  # an image needs at least one label
            texture = TEXTURES[int(rng.random() < 0.4)]
        reds = [bool(rng.random() < RED_PROBABILITY) for _ in shapes]
        if len(shapes) + (texture is not None) + any(reds) > 3:
            reds = [False] * len(shapes)  # keep 1-3 labels per image
        plan.append((tuple(shapes), texture, reds))
    return plan


def _labels_of(shapes: tuple[str, ...], texture: str | None, reds: list[bool]) -> list[str]:
    present = set(shapes) | ({texture} if texture else set()) | ({"red"} if any(reds) else set())
    return [x for x in LABELS if x in present]


def _star_points(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.42
        a = angle + k * math.pi / 5
        pts.append((cx + radius * math.sin(a), cy - radius * math.cos(a)))
    return pts


def _polygon(n: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.sin(angle + 2 * math.pi * k / n), cy - r * math.cos(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _draw_image(
    size: int, shapes: tuple[str, ...], texture: str | None, reds: list[bool], rng: np.random.Generator
) -> Image.Image:
    # background: a low-saturation grey, never reddish, so "red" stays a property of the shapes
    level = int(rng.integers(90, 200))
    tint = rng.integers(-12, 13, size=3)
    tint[0] = min(tint[0], 0)
    base = tuple(int(np.clip(level + t, 0, 255)) for t in tint)
    im = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(im)
    contrast = 70 if level < 145 else -70
    line = tuple(int(np.clip(c + contrast, 0, 255)) for c in base)
    if texture == "stripes":
        spacing = int(rng.integers(8, 13))
        width = max(2, spacing // 3)
        offset = int(rng.integers(0, spacing))
        if rng.random() < 0.5:  # diagonal
            for k in range(-size, 2 * size, spacing):
                draw.line([(k + offset, 0), (k + offset - size, size)], fill=line, width=width)
        else:
            for k in range(offset, size, spacing):
                draw.line([(0, k), (size, k)], fill=line, width=width)
    elif texture == "dots":
        spacing = int(rng.integers(9, 13))
        radius = max(1.5, size / 64)
        for y in range(spacing // 2, size, spacing):
            for x in range(spacing // 2, size, spacing):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=line)

    # shapes: two kinds go to different halves (left/right or top/bottom) so they don't overlap
    n = len(shapes)
    vertical = rng.random() < 0.5
    for i, (shape, red) in enumerate(zip(shapes, reds, strict=True)):
        r = size * rng.uniform(0.16, 0.195) if n == 2 else size * rng.uniform(0.22, 0.32)
        reach = r * 1.2 + 1  # square, triangle and star reach 1.2 r from the centre
        lo, hi = reach, size - reach
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if n == 2:
            half_lo, half_hi = (reach, size / 2 - reach) if i == 0 else (size / 2 + reach, size - reach)
            along = rng.uniform(half_lo, max(half_lo, half_hi))
            cx, cy = (cx, along) if vertical else (along, cy)
        color = _RED if red else _NON_RED[int(rng.integers(len(_NON_RED)))]
        color = tuple(
            int(np.clip(c + d, 0, 255)) for c, d in zip(color, rng.integers(-15, 16, size=3), strict=True)
        )
        # near-canonical poses (an upright triangle, an axis-aligned square): the shapes stay
        # tellable apart at 64 px, which a small CNN needs to learn them in minutes
        tilt = rng.uniform(-0.25, 0.25)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif shape == "square":
            draw.polygon(_polygon(4, cx, cy, r * 1.2, math.pi / 4 + tilt), fill=color)
        elif shape == "triangle":
            draw.polygon(_polygon(3, cx, cy, r * 1.2, tilt), fill=color)
        else:
            draw.polygon(_star_points(cx, cy, r * 1.2, tilt), fill=color)

    noise = rng.normal(0, 6, size=(size, size, 3))
    pixels = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _root_uri(root: str) -> str:
    from mlc_ray import storage

    return root.rstrip("/") if storage.is_s3(root) else os.path.abspath(root)


def _params(seed: int, num_train: int, num_val: int, image_size: int) -> dict:
    return {
        "version": DEMO_FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
    }


def generate_demo(
    root: str, *, seed: int = 0, num_train: int = 1200, num_val: int = 300, image_size: int = 96
) -> str:
    """Write the demo set (JPEGs, manifest.csv with a split column, labels.txt) under ``root``.

    Returns the manifest URI (an absolute path locally). The same arguments give the same bytes.
    """
    from mlc_ray import storage

    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (shapes become unrecognisable), got {image_size}")
    root = _root_uri(root)
    storage.delete(storage.join(root, MARKER))  # an interrupted regeneration must not look complete
    rows = ["image,labels,split"]
    index = 0
    for split, n, split_seed in (("train", num_train, 0), ("val", num_val, 1)):
        plan_rng = np.random.default_rng([seed, split_seed])
        for shapes, texture, reds in _plan(n, plan_rng):
            # one generator per image: image k's pixels don't depend on how many came before
            rng = np.random.default_rng([seed, split_seed, index])
            name = f"images/{index:05d}.jpg"
            storage.write_bytes(
                storage.join(root, name), _jpeg(_draw_image(image_size, shapes, texture, reds, rng))
            )
            rows.append(f"{name},{'|'.join(_labels_of(shapes, texture, reds))},{split}")
            index += 1
    manifest_uri = storage.join(root, "manifest.csv")
    storage.write_text(storage.join(root, "labels.txt"), "\n".join(LABELS) + "\n")
    storage.write_text(manifest_uri, "\n".join(rows) + "\n")
    storage.write_text(
        storage.join(root, MARKER), json.dumps(_params(seed, num_train, num_val, image_size), sort_keys=True)
    )
    log.info("demo data: %d train + %d val images at %dpx in %s", num_train, num_val, image_size, root)
    return manifest_uri


def ensure_demo_data(
    root: str = DEMO_ROOT, *, seed: int = 0, num_train: int = 1200, num_val: int = 300, image_size: int = 96
) -> str:
    """Generate the demo set under ``root`` unless a complete one with the same arguments is there.

    The marker file is written last, so an interrupted generation is redone, not half-used.
    """
    from mlc_ray import storage

    root_uri = _root_uri(root)
    marker = storage.join(root_uri, MARKER)
    wanted = _params(seed, num_train, num_val, image_size)
    if storage.exists(marker):
        try:
            if json.loads(storage.read_text(marker)) == wanted:
                return storage.join(root_uri, "manifest.csv")
        except (ValueError, OSError):
            pass
        log.info("demo data in %s was made with other arguments; regenerating", root_uri)
    return generate_demo(root_uri, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)

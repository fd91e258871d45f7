"""The embedded demo data set, and corpora of good and bad image files for tests and benchmarks.

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

``bad_image_samples()`` / ``good_image_samples()`` build in memory one file of every kind that
``mlc_ray.data.images.decode_image`` must reject or decode; the good ones carry a colour pattern
(left half red, right half blue, a green band across the top: see ``pattern_problems``) so tests can
check orientation and colour, not just that something decoded.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

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


# ----------------------------------------------------------------------------------------------
# corpora of good and bad image files


@dataclass(frozen=True)
class Sample:
    """One image file: ``name`` (with the extension a user would see) and its bytes.

    Bad samples set ``expected_error`` (an ``ImageError`` code). Good samples set ``expected_size``
    ((width, height) upright) and ``expected_regions``: (x0, y0, x1, y1) fractions of the upright
    image -> the RGB colour its pixels should have, within ``tolerance``.
    """

    name: str
    data: bytes
    expected_error: str | None = None
    expected_size: tuple[int, int] | None = None
    expected_regions: tuple[tuple[tuple[float, float, float, float], tuple[int, int, int]], ...] = field(
        default_factory=tuple
    )
    tolerance: int = 40


# Upright pattern: a green band over the top quarter, then left half red, right half blue. Any wrong
# rotation, flip or transpose moves one of the three regions.
_PW, _PH = 64, 40
_RED_P, _BLUE_P, _GREEN_P = (220, 30, 30), (30, 40, 220), (30, 200, 40)
_REGIONS_RGB = (
    ((0.1, 0.02, 0.9, 0.18), _GREEN_P),
    ((0.05, 0.4, 0.4, 0.95), _RED_P),
    ((0.6, 0.4, 0.95, 0.95), _BLUE_P),
)


def _pattern(width: int = _PW, height: int = _PH) -> np.ndarray:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = _RED_P
    arr[:, width // 2 :] = _BLUE_P
    arr[: height // 4] = _GREEN_P
    return arr


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (PIL cannot write 48-bit RGB, nor a header that lies about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _exif_jpeg(orientation: int) -> bytes:
    """A JPEG whose stored pixels need EXIF ``orientation`` to show the upright pattern."""
    upright = Image.fromarray(_pattern(), "RGB")
    from mlc_ray.data.images import _ORIENTATION_FIX

    fix = _ORIENTATION_FIX[orientation]
    inverse = {
        Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
        Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
    }.get(fix, fix)  # flips, 180, transpose and transverse are their own inverse
    stored = upright.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _noisy_jpeg(size: int = 256) -> bytes:
    rng = np.random.default_rng(7)
    return _encode(
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB"), "JPEG", quality=90
    )


def good_image_samples() -> list[Sample]:
    """One valid file of every awkward kind, each decoding to the upright test pattern."""
    rgb = Image.fromarray(_pattern(), "RGB")
    size = (_PW, _PH)

    def good(name: str, data: bytes, regions=_REGIONS_RGB, expected_size=size, tolerance: int = 40) -> Sample:
        return Sample(
            name, data, expected_size=expected_size, expected_regions=tuple(regions), tolerance=tolerance
        )

    samples = [good("plain.jpg", _encode(rgb, "JPEG", quality=95)), good("plain.png", _encode(rgb, "PNG"))]
    samples += [good(f"exif_orientation_{o}.jpg", _exif_jpeg(o)) for o in (2, 3, 5, 6, 8)]
    samples.append(good("progressive.jpg", _encode(rgb, "JPEG", quality=95, progressive=True)))
    samples.append(good("cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG", quality=95)))
    samples.append(
        good("palette.png", _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG"))
    )

    # transparency: the top band is fully transparent -> composited on white
    rgba = rgb.convert("RGBA")
    alpha = np.full((_PH, _PW), 255, dtype=np.uint8)
    alpha[: _PH // 4] = 0
    rgba.putalpha(Image.fromarray(alpha, "L"))
    white_top = (((0.1, 0.02, 0.9, 0.18), (255, 255, 255)), *_REGIONS_RGB[1:])
    samples.append(good("rgba.png", _encode(rgba, "PNG"), regions=white_top))
    transparent_p = rgba.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    samples.append(
        good("palette_transparent.png", _encode(transparent_p, "PNG"), regions=white_top, tolerance=60)
    )

    # greyscale: left dark, right light, top band 255 (white) / transparent
    gray = np.zeros((_PH, _PW), dtype=np.uint8)
    gray[:, : _PW // 2], gray[:, _PW // 2 :], gray[: _PH // 4] = 60, 180, 250
    gray_regions = (
        ((0.1, 0.02, 0.9, 0.18), (250, 250, 250)),
        ((0.05, 0.4, 0.4, 0.95), (60, 60, 60)),
        ((0.6, 0.4, 0.95, 0.95), (180, 180, 180)),
    )
    samples.append(
        good("gray.jpg", _encode(Image.fromarray(gray, "L"), "JPEG", quality=95), regions=gray_regions)
    )
    samples.append(good("gray.png", _encode(Image.fromarray(gray, "L"), "PNG"), regions=gray_regions))
    la_alpha = np.full((_PH, _PW), 255, dtype=np.uint8)
    la_alpha[: _PH // 4] = 0
    la = Image.merge(
        "LA",
        (
            Image.fromarray(np.where(la_alpha == 0, 0, gray).astype(np.uint8), "L"),
            Image.fromarray(la_alpha, "L"),
        ),
    )
    la_regions = (((0.1, 0.02, 0.9, 0.18), (255, 255, 255)), *gray_regions[1:])
    samples.append(good("la.png", _encode(la, "PNG"), regions=la_regions))
    bilevel = np.zeros((_PH, _PW), dtype=bool)
    bilevel[:, _PW // 2 :] = True
    bilevel[: _PH // 4] = True
    samples.append(
        good(
            "bilevel.png",
            _encode(Image.fromarray(bilevel), "PNG"),
            regions=(
                ((0.1, 0.02, 0.9, 0.18), (255, 255, 255)),
                ((0.05, 0.4, 0.4, 0.95), (0, 0, 0)),
                ((0.6, 0.4, 0.95, 0.95), (255, 255, 255)),
            ),
        )
    )

    # 16-bit: values 0x4000/0xC000/0xFFFF must become ~64/~191/255, not 255 (clipped) everywhere
    g16 = np.zeros((_PH, _PW), dtype=np.uint16)
    g16[:, : _PW // 2], g16[:, _PW // 2 :], g16[: _PH // 4] = 0x4000, 0xC000, 0xFFFF
    rows16 = [g16[y].astype(">u2").tobytes() for y in range(_PH)]
    regions16 = (
        ((0.1, 0.02, 0.9, 0.18), (255, 255, 255)),
        ((0.05, 0.4, 0.4, 0.95), (64, 64, 64)),
        ((0.6, 0.4, 0.95, 0.95), (191, 191, 191)),
    )
    samples.append(good("gray16.png", _raw_png(_PW, _PH, 16, 0, rows16), regions=regions16, tolerance=2))
    rgb16 = (_pattern().astype(np.uint16) * 257).astype(">u2")
    rows48 = [rgb16[y].tobytes() for y in range(_PH)]
    samples.append(good("rgb16.png", _raw_png(_PW, _PH, 16, 2, rows48), tolerance=2))

    # animated: the first frame is the pattern, the second is solid green
    frames = [rgb, Image.new("RGB", size, _GREEN_P)]
    samples.append(
        good(
            "animated.gif",
            _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        )
    )
    samples.append(
        good(
            "animated.webp",
            _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, quality=95),
        )
    )
    samples.append(good("really_a_jpeg.png", _encode(rgb, "JPEG", quality=95)))
    return samples


def bad_image_samples() -> list[Sample]:
    """One broken file of every kind, each with the single ImageError code decode_image must give."""
    jpeg = _noisy_jpeg()
    png = _encode(
        Image.fromarray(np.random.default_rng(8).integers(0, 256, (128, 128, 3), dtype=np.uint8)), "PNG"
    )
    one_row = [b"\x00\x00\x00"]  # a single RGB pixel row of a 1x1 image, reused by the lying headers

    def lying_png(width: int, height: int) -> bytes:
        return _raw_png(1, 1, 8, 2, one_row).replace(
            struct.pack(">II", 1, 1) + bytes([8, 2, 0, 0, 0]),
            struct.pack(">II", width, height) + bytes([8, 2, 0, 0, 0]),
        )

    def fix_crc(data: bytes) -> bytes:
        # the IHDR CRC must be valid or PIL rejects the file before reading the size
        ihdr = data[12:29]
        return data[:29] + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]

    gif_bomb = (
        b"GIF89a"
        + struct.pack("<HH", 30000, 30000)
        + b"\x00\x00\x00"
        + b","
        + struct.pack("<HHHH", 0, 0, 30000, 30000)
        + b"\x00\x02\x02\x44\x01\x00;"
    )
    corrupt_png = bytearray(png)
    idat = corrupt_png.index(b"IDAT") + 4
    corrupt_png[idat : idat + 2] = b"\x00\x00"  # not a zlib stream header any more
    corrupt_jpeg_header = bytearray(jpeg)
    sof = corrupt_jpeg_header.index(b"\xff\xc0")
    corrupt_jpeg_header[sof + 4 : sof + 12] = b"\xff" * 8  # garbage frame header
    return [
        Sample("empty.jpg", b"", expected_error="empty"),
        Sample("notes.jpg", b"this is a text file, not a photo\n" * 20, expected_error="not_image"),
        Sample(
            "page.png",
            b"<!doctype html><html><body>404 Not Found</body></html>\n",
            expected_error="not_image",
        ),
        Sample("truncated.jpg", jpeg[: len(jpeg) * 6 // 10], expected_error="truncated"),
        Sample("truncated.png", png[: len(png) * 6 // 10], expected_error="truncated"),
        Sample("bomb.png", fix_crc(lying_png(30000, 30000)), expected_error="too_large"),
        Sample("bomb.gif", gif_bomb, expected_error="too_large"),
        Sample("over_limit.png", fix_crc(lying_png(9000, 9000)), expected_error="too_large"),  # 81 MP > 50 MP
        Sample("corrupt.png", bytes(corrupt_png), expected_error="corrupt"),
        Sample("corrupt_header.jpg", bytes(corrupt_jpeg_header), expected_error="corrupt"),
    ]


def pattern_problems(sample: Sample, array: np.ndarray) -> list[str]:
    """What is wrong with a decoded good sample (empty when size, orientation and colours match)."""
    problems = []
    h, w = array.shape[:2]
    if sample.expected_size is not None and (w, h) != tuple(sample.expected_size):
        problems.append(f"size {w}x{h}, expected {sample.expected_size[0]}x{sample.expected_size[1]}")
        return problems
    for (x0, y0, x1, y1), color in sample.expected_regions:
        region = array[
            int(y0 * h) : max(int(y1 * h), int(y0 * h) + 1), int(x0 * w) : max(int(x1 * w), int(x0 * w) + 1)
        ]
        mean = region.reshape(-1, 3).mean(axis=0)
        if np.abs(mean - np.asarray(color)).max() > sample.tolerance:
            problems.append(
                f"region {(x0, y0, x1, y1)} has mean colour {tuple(int(round(v)) for v in mean)}, expected {color}"
            )
    return problems

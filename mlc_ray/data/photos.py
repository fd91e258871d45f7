"""Photo-like test images: what the decode-policy benchmark and the parity tests feed the image path.

Flat colours and 56x44 thumbnails hide what matters on real photos (libjpeg's reduced-scale decode
only engages on large JPEGs; chroma subsampling and noise change pixels after resizing), so these
images have the statistics of a camera photo: smooth illumination gradients, shapes with sharp
edges, fine texture and sensor noise, saved as the formats users send: baseline JPEG (4:2:0), PNG,
CMYK JPEG and a JPEG whose EXIF orientation says "rotate" (tag 0x0112 = 6).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["photo_like_array", "photo_like_bytes", "REALISTIC_SET"]

_EXIF_ORIENTATION = 0x0112

# (name, width, height, kind): the realistic inputs of the parity test and the benchmark.
REALISTIC_SET: tuple[tuple[str, int, int, str], ...] = (
    ("vga.jpg", 640, 480, "jpeg"),
    ("fullhd.jpg", 1920, 1080, "jpeg"),
    ("camera.jpg", 4000, 3000, "jpeg"),
    ("screenshot.png", 1280, 720, "png"),
    ("print.cmyk.jpg", 1600, 1200, "cmyk"),
    ("portrait.exif6.jpg", 2000, 1500, "exif_rotated"),
)


def photo_like_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: gradients + shapes + texture + noise, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    # illumination: two smooth gradients at random angles, per-channel tints
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    img = np.empty((height, width, 3), dtype=np.float32)
    a1, a2 = rng.uniform(0, 2 * np.pi, 2)
    g1 = np.cos(a1) * x + np.sin(a1) * y
    g2 = np.cos(a2) * x + np.sin(a2) * y
    for c in range(3):
        lo, hi = sorted(rng.uniform(20, 235, 2))
        img[:, :, c] = lo + (hi - lo) * (0.6 * g1 + 0.4 * g2 * rng.uniform(0.5, 1.0))
    # objects: filled ellipses / rectangles / polygons with hard edges (drawn at full size)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    scale = min(width, height)
    for _ in range(int(rng.integers(6, 12))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.04, 0.25) * scale
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        box = (cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
            draw.polygon([(cx + r * np.cos(t), cy + r * np.sin(t)) for t in angles], fill=colour)
    img = np.asarray(canvas, dtype=np.float32)
    # texture (foliage / fabric-like): a few sinusoids of a few pixels' period, modulated
    for _ in range(3):
        fx, fy = rng.uniform(0.05, 0.6, 2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * x * width / 8 + fy * y * height / 8) + phase)
        img += (rng.uniform(4, 14) * wave)[:, :, None]
    # sensor noise
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def photo_like_bytes(width: int, height: int, kind: str = "jpeg", seed: int = 0, quality: int = 90) -> bytes:
    """Encoded photo-like image. ``kind``: jpeg | png | cmyk (CMYK JPEG) | exif_rotated (JPEG with
    EXIF orientation 6; the stored pixels are ``height x width`` so the upright image is ``width x height``)."""
    array = photo_like_array(width, height, seed)
    im = Image.fromarray(array, "RGB")
    buf = io.BytesIO()
    if kind == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    elif kind == "png":
        im.save(buf, "PNG")
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif kind == "exif_rotated":
        # orientation 6 = "rotate 90 CW to display": store the upright image rotated 90 CCW
        stored = im.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = 6
        stored.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"kind must be jpeg, png, cmyk or exif_rotated, got {kind!r}")
    return buf.getvalue()

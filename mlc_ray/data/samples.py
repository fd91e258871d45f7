"""Corpora of good and bad image files, built in memory, for the decoder's tests and benchmarks.

``bad_image_samples()`` / ``good_image_samples()`` return one file of every kind that
``mlc_ray.data.images.decode_image`` must reject or decode (truncated, not an image, too large, CMYK,
16-bit PNG, EXIF-rotated, ...). The good ones carry a colour pattern (left half red, right half blue, a
green band across the top: see ``pattern_problems``) so tests can check orientation and colour, not
just that something decoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = ["Sample", "bad_image_samples", "good_image_samples", "pattern_problems"]


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
    from mlc_ray.data.decode import _ORIENTATION_FIX

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

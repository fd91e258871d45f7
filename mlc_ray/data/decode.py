"""Robust image decoding: bytes -> an RGB uint8 array, or a structured ``ImageError``.

``decode_image`` turns bytes into an RGB uint8 array *or* a structured ``ImageError``; it never raises
for bad data, because one damaged file among millions must not kill a batch (the caller records the
error and moves on). What it handles:

* EXIF orientation (the eight TIFF orientations, as ``ImageOps.exif_transpose`` applies them);
  ``width``/``height`` are the original image's size *after* orientation, even when the pixels were
  decoded at a reduced scale;
* every PIL mode we have met in the wild -> RGB: CMYK, palette (with transparency), L, LA, RGBA
  (alpha composited on white), 1-bit, 16-bit greyscale (scaled to 8 bits, never clipped);
* animated GIF/WebP: the first frame; content is sniffed, so a JPEG named ``.png`` decodes fine;
* failures as codes: ``empty`` (zero bytes), ``not_image`` (no known image signature),
  ``truncated``, ``too_large`` (more than ``max_pixels``, checked from the header *before* any pixel
  is decoded; PIL's own decompression-bomb guard too), ``corrupt`` (anything else PIL rejects),
  ``unsupported`` (a mode with no sensible RGB conversion).

Speed: bulk tagging calls this for millions of images. Pass ``target_size`` (the size the image will
be resized to) and JPEGs are decoded by libjpeg at a reduced DCT scale (``Image.draft``) that is never
smaller than the target: a 4000x3000 photo tagged at 224 px decodes at 500x375, ~8x less work.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ERROR_CODES", "DecodedImage", "ImageError", "decode_image"]

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: larger than any camera photo we tag, far below a bomb
ERROR_CODES = ("empty", "not_image", "truncated", "too_large", "corrupt", "unsupported")

_EXIF_ORIENTATION = 0x0112
# orientation -> the transpose that displays the image upright (the table ImageOps.exif_transpose uses)
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Leading bytes of formats PIL can open: data that starts like an image but fails is "corrupt",
# anything else is "not_image".
_IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"\x00\x00\x01\x00",  # ICO
)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageError:
    """Why an image could not be decoded: a stable ``code`` (one of ERROR_CODES) and a message."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class DecodedImage:
    """The result of ``decode_image``: ``array`` (H, W, 3) uint8 RGB or ``error``, never both.

    ``width``/``height`` are the original image's dimensions after EXIF orientation (0 when unknown);
    the array may be smaller when ``target_size`` let a JPEG decode at reduced scale.
    """

    array: np.ndarray | None
    width: int
    height: int
    error: ImageError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _failed(code: str, message: str, width: int = 0, height: int = 0) -> DecodedImage:
    return DecodedImage(array=None, width=width, height=height, error=ImageError(code, message))


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_IMAGE_SIGNATURES):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in _ORIENTATION_FIX else 1
    except Exception:  # a broken EXIF block must not cost us the pixels
        return 1


def _as_size(target_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if target_size is None:
        return None
    if isinstance(target_size, int):
        return (target_size, target_size)
    w, h = target_size
    return (int(w), int(h))


def _to_rgb(im: Image.Image) -> Image.Image | None:
    """Any PIL mode -> RGB (alpha on white, 16-bit scaled); None when there is no sensible mapping."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("L", "1", "CMYK", "YCbCr"):
        return im.convert("RGB")
    if mode == "P":
        if "transparency" in im.info:
            return _composite_on_white(im.convert("RGBA"))
        return im.convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite_on_white(im.convert("RGBA") if mode != "RGBA" else im)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (PNG/TIFF): scale 0..65535 -> 0..255 (not clip: clipping turns everything
        # brighter than 255/65535 white). Mode "I" holds 16-bit PNG data in older Pillow versions.
        arr = np.asarray(im).astype(np.uint32)
        gray = ((np.minimum(arr, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    return None


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _classify_load_error(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncat" in text or "premature end" in text:
        return "truncated"
    if isinstance(exc, MemoryError):
        return "too_large"
    return "corrupt"


def decode_image(
    data: bytes | bytearray | memoryview | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | tuple[int, int] | None = None,
    finish: Callable[[Image.Image], np.ndarray] | None = None,
) -> DecodedImage:
    """Decode image bytes to an RGB uint8 (H, W, 3) array, EXIF-oriented; never raises for bad data.

    ``target_size`` (an int or (width, height) in upright orientation) is a hint: a JPEG may be
    decoded at a reduced DCT scale whose size is still >= target_size in both dimensions.

    ``finish``: what turns the upright RGB ``PIL.Image`` into the returned array (default: a copy of
    its pixels). The model-input path passes its resize here, so the decoded pixels go from PIL to
    the resize without a round trip through numpy (``images.prepare_image``); an exception it
    raises is this image's error, as any other.
    """
    if data is None or len(data) == 0:
        return _failed("empty", "zero bytes")
    data = bytes(data)
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _failed("too_large", f"decompression bomb guard: {exc}")
    except UnidentifiedImageError:
        if _looks_like_image(data):
            return _failed("corrupt", "has an image signature but PIL cannot parse its header")
        return _failed("not_image", f"no known image format ({len(data)} bytes, starts {data[:8]!r})")
    except Exception as exc:  # any parser failure in a header is a broken file, not a crash
        return _failed(_classify_load_error(exc), f"{type(exc).__name__}: {exc}")

    try:
        raw_w, raw_h = im.size
        if raw_w <= 0 or raw_h <= 0:
            return _failed("corrupt", f"header says {raw_w}x{raw_h} pixels")
        if raw_w * raw_h > max_pixels:  # from the header, before a single pixel is decoded
            return _failed(
                "too_large",
                f"{raw_w}x{raw_h} = {raw_w * raw_h} pixels exceeds max_pixels={max_pixels}",
                raw_w,
                raw_h,
            )
        # JPEG's EXIF sits in the header; PNG's getexif() decodes the whole image, so ask after load()
        is_jpeg = im.format == "JPEG"
        orientation = _orientation(im) if is_jpeg else 1
        target = _as_size(target_size)
        if target is not None and is_jpeg:
            tw, th = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
            im.draft(None, (max(1, tw), max(1, th)))  # libjpeg picks a scale that stays >= (tw, th)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()  # first frame only for animated GIF/WebP
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return _failed("too_large", f"decompression bomb guard: {exc}", raw_w, raw_h)
        except Exception as exc:
            return _failed(_classify_load_error(exc), f"{type(exc).__name__}: {exc}", raw_w, raw_h)
        if not is_jpeg:
            orientation = _orientation(im)
        width, height = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)

        rgb = _to_rgb(im)
        if rgb is None:
            return _failed("unsupported", f"image mode '{im.mode}' has no RGB conversion", width, height)
        if orientation != 1:
            rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
        # a writable copy the caller owns, or what ``finish`` makes of the upright RGB image
        array = np.array(rgb, dtype=np.uint8) if finish is None else finish(rgb)
        if array.ndim != 3 or array.shape[2] != 3:
            return _failed(
                "unsupported", f"decoded to shape {array.shape}, expected (H, W, 3)", width, height
            )
        return DecodedImage(array=array, width=width, height=height)
    except Exception as exc:  # never let one image kill a batch
        return _failed(_classify_load_error(exc), f"{type(exc).__name__}: {exc}")
    finally:
        im.close()

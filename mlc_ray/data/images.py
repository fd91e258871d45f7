"""The one image path: decode + preprocess shared by training, evaluation and bulk tagging.

Decoding (``decode_image``: bytes -> RGB uint8 or a structured ``ImageError``, never raising for bad
data) lives in ``mlc_ray.data.decode`` and is re-exported here.

Preprocessing is described by one ``PreprocessConfig`` (saved as ``preprocess.json`` in every model
bundle). Pixels travel as uint8 NHWC; ``normalize_batch_numpy`` is the reference implementation of the
normalisation that the model applies in its graph (ImageNet mean/std, or seed 000's per-image
standardisation).

**The one image path.** Every consumer of a model's pixels goes through this module with the
bundle's ``PreprocessConfig``: ``decode_for_model`` (the decode, with the bundle's ``decode`` policy:
``draft`` = reduced-scale JPEG decode never smaller than the resize that follows, or ``full``) is what
training decodes with before augmenting; ``prepare_image`` / ``read_and_prepare`` (decode +
``preprocess_eval`` or ``ten_crop``) is what validation, calibration, 10-crop scoring, the export
parity checks and the int8 gate, promotion, the pyfunc model and bulk tagging feed the model. So the
thresholds fitted on validation scores were fitted on the pixels tagging produces.

Training augmentation (``AugmentConfig``, ``TrainAugment``) is in ``mlc_ray.data.augment``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Re-exported: the decode is part of the one image path and its callers import it from here.
from mlc_ray.data.decode import (  # noqa: F401
    DEFAULT_MAX_PIXELS,
    ERROR_CODES,
    DecodedImage,
    ImageError,
    decode_image,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "per_image")
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR}
# How JPEGs are decoded for a model: "draft" lets libjpeg decode at a reduced DCT scale that is never
# smaller than the size the image is resized to next (the resize averages the rest away); "full"
# decodes every pixel. Chosen by measurement (BENCHMARKS.md "Decode policy"): draft is what new bundles
# record. A preprocess.json written before the field existed was calibrated on full decodes, so a
# bundle without the key reads as LEGACY_DECODE.
DECODE_POLICIES = ("draft", "full")
DEFAULT_DECODE = "draft"
LEGACY_DECODE = "full"
VIEWS = ("single", "10crop")  # what prepare_image returns: one resized view, or seed 003's 10 crops


# ----------------------------------------------------------------------------------------------
# preprocessing


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels reach the model; written to ``preprocess.json`` by training, only read afterwards."""

    image_size: int = 224  # the model's input is image_size x image_size
    normalization: str = "imagenet"  # "imagenet": (x/255 - mean)/std; "per_image": seed 000 standardisation
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB, on the 0..1 scale (imagenet only)
    std: tuple[float, float, float] = IMAGENET_STD
    resize_scale: float = 1.14  # 10-crop: resize to round(image_size * resize_scale), then crop
    interpolation: str = "bilinear"  # PIL bilinear (antialiased when shrinking)
    channel_order: str = "RGB"  # pixels are RGB everywhere; recorded for non-Python consumers (ncnn)
    decode: str = DEFAULT_DECODE  # JPEG decode policy (DECODE_POLICIES); absent in old bundles -> "full"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"preprocess.image_size must be an integer >= 8, got {self.image_size!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"preprocess.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"preprocess.{name} must be 3 numbers (R, G, B), got {value!r}") from None
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"preprocess.{name} must be 3 finite numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocess.std must be > 0, got {self.std}")
        if not (isinstance(self.resize_scale, int | float) and 1.0 <= float(self.resize_scale) <= 4.0):
            raise ValueError(f"preprocess.resize_scale must be in [1, 4], got {self.resize_scale!r}")
        object.__setattr__(self, "resize_scale", float(self.resize_scale))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.channel_order != "RGB":
            raise ValueError(f"preprocess.channel_order must be 'RGB', got {self.channel_order!r}")
        if self.decode not in DECODE_POLICIES:
            raise ValueError(f"preprocess.decode must be one of {DECODE_POLICIES}, got {self.decode!r}")

    @property
    def resize_size(self) -> int:
        """The side the image is resized to before 10-crop."""
        return max(self.image_size, round(self.image_size * self.resize_scale))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocess config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"preprocess config: unknown key(s) {unknown}; known keys are {sorted(known)} "
                "(was preprocess.json written by a newer mlc_ray?)"
            )
        data = dict(data)
        # written before the decode policy was recorded: those bundles were calibrated on full decodes
        data.setdefault("decode", LEGACY_DECODE)
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PreprocessConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"preprocess.json is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def check_hwc(array: np.ndarray) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", None)
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}")
    return array


def _resize(array: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    if array.shape[1] == width and array.shape[0] == height:
        return array
    im = Image.fromarray(array, "RGB")
    return np.asarray(im.resize((width, height), INTERPOLATIONS[interpolation]))


def preprocess_eval(array: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8: a plain resize to image_size x image_size (aspect not kept)."""
    check_hwc(array)
    return _resize(array, cfg.image_size, cfg.image_size, cfg.interpolation)


def ten_crop(array: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(H, W, 3) uint8 -> (10, S, S, 3) uint8 (seed 003): resize to R = round(S*resize_scale), take the
    four corners and the centre, then the same five crops mirrored left-right."""
    check_hwc(array)
    s, r = cfg.image_size, cfg.resize_size
    big = _resize(array, r, r, cfg.interpolation)
    c = (r - s) // 2
    origins = [(0, 0), (0, r - s), (r - s, 0), (r - s, r - s), (c, c)]  # (top, left): tl, tr, bl, br, centre
    crops = [big[y : y + s, x : x + s] for y, x in origins]
    crops += [crop[:, ::-1] for crop in crops]
    return np.ascontiguousarray(np.stack(crops))


# ----------------------------------------------------------------------------------------------
# the one image path: bytes -> decode (the bundle's policy) -> preprocess


def decode_for_model(
    data: bytes | bytearray | memoryview | None,
    cfg: PreprocessConfig,
    *,
    view: str = "single",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    finish: Callable[[Image.Image], np.ndarray] | None = None,
) -> DecodedImage:
    """``decode_image`` with ``cfg.decode``: the decode training (before augmenting), evaluation and
    tagging all use. ``draft`` never decodes below the size the view resizes to (``image_size``;
    ``resize_size`` for 10-crop). ``finish``: see ``decode_image``."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    target = None
    if cfg.decode == "draft":
        target = cfg.resize_size if view == "10crop" else cfg.image_size
    return decode_image(data, max_pixels=max_pixels, target_size=target, finish=finish)


def _resized_pil(cfg: PreprocessConfig) -> Callable[[Image.Image], np.ndarray]:
    """``preprocess_eval`` on the decoder's PIL image: the same ``Image.resize`` call on the same
    pixels (so the same bytes out) without the two copies of ``np.array`` then ``Image.fromarray``
    (measured 1.82 -> 1.69 ms per 500x375 JPEG: BENCHMARKS.md "Pixel path copies"). An image already
    at the model's size is returned as a writable copy, as ``preprocess_eval`` returns it."""
    size = (cfg.image_size, cfg.image_size)
    resample = INTERPOLATIONS[cfg.interpolation]

    def finish(rgb: Image.Image) -> np.ndarray:
        if rgb.size == size:
            return np.array(rgb, dtype=np.uint8)
        return np.asarray(rgb.resize(size, resample))

    return finish


@dataclass
class PreparedImage:
    """Model input for one image: ``pixels`` uint8 (S, S, 3) for view "single", (10, S, S, 3) for
    "10crop"; or ``error`` ("code: message"). ``width``/``height``: the upright original (0 = unknown)."""

    pixels: np.ndarray | None
    width: int
    height: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def prepare_image(
    data: bytes | bytearray | memoryview | None,
    cfg: PreprocessConfig,
    *,
    view: str = "single",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Bytes -> model input, the way every evaluation consumer and bulk tagging do it; never raises
    for bad data (the error is in the result)."""
    single = view == "single"
    decoded = decode_for_model(
        data, cfg, view=view, max_pixels=max_pixels, finish=_resized_pil(cfg) if single else None
    )
    if decoded.error is not None:
        return PreparedImage(
            None, decoded.width, decoded.height, f"{decoded.error.code}: {decoded.error.message}"
        )
    pixels = decoded.array if single else ten_crop(decoded.array, cfg)  # single: resized in the decode
    return PreparedImage(pixels, decoded.width, decoded.height)


def read_and_prepare(uri: str, cfg: PreprocessConfig, *, view: str = "single") -> PreparedImage:
    """``prepare_image`` of the object at ``uri`` (local path or s3://, through ``mlc_ray.storage``).
    A missing object is ``missing: ...``, any other read failure ``unreadable: ...``."""
    from mlc_ray import storage

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        return PreparedImage(None, 0, 0, f"missing: {exc}")
    except Exception as exc:  # permissions, network after retries: one image's problem, not the job's
        return PreparedImage(None, 0, 0, f"unreadable: {type(exc).__name__}: {exc}")
    return prepare_image(data, cfg, view=view)


def stack_views(prepared: list[PreparedImage], cfg: PreprocessConfig, view: str = "single") -> np.ndarray:
    """The uint8 batch of the images that prepared without error (an empty batch of the right shape)."""
    pixels = [p.pixels for p in prepared if p.error is None]
    if pixels:
        return np.stack(pixels)
    s = cfg.image_size
    return np.zeros((0, 10, s, s, 3) if view == "10crop" else (0, s, s, 3), dtype=np.uint8)


def normalize_batch_numpy(batch: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, normalised as the model does in its graph (the parity reference).

    ``imagenet``: (x/255 - mean) / std per channel. ``per_image`` (seed 000, TF's
    ``per_image_standardization`` on 0..255 values): (x - mean) / max(std, 1/sqrt(N)), mean and std
    over all H*W*C values of each image.
    """
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"expected a uint8 NHWC batch with 3 channels, got shape {batch.shape}")
    x = batch.astype(np.float32)
    if cfg.normalization == "imagenet":
        mean = np.asarray(cfg.mean, dtype=np.float32) * 255.0
        std = np.asarray(cfg.std, dtype=np.float32) * 255.0
        x = (x - mean) / std
    else:
        n = x.shape[1] * x.shape[2] * x.shape[3]
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(axis=1, dtype=np.float64).astype(np.float32)
        std = flat.std(axis=1, dtype=np.float64).astype(np.float32)
        adjusted = np.maximum(std, np.float32(1.0 / math.sqrt(n)))
        x = (x - mean[:, None, None, None]) / adjusted[:, None, None, None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

"""decode_image on every good and bad kind of file; preprocessing shapes, determinism and normalisation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageFile

from mlc_ray.data.augment import AugmentConfig, TrainAugment
from mlc_ray.data.demo import bad_image_samples, good_image_samples, pattern_problems
from mlc_ray.data.images import (
    ERROR_CODES,
    DecodedImage,
    ImageError,
    PreprocessConfig,
    decode_image,
    normalize_batch_numpy,
    preprocess_eval,
    ten_crop,
)

BAD = bad_image_samples()
GOOD = good_image_samples()


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("sample", BAD, ids=[s.name for s in BAD])
def test_bad_image_gives_exactly_its_structured_error(sample) -> None:
    decoded = decode_image(sample.data)
    assert isinstance(decoded, DecodedImage)
    assert decoded.array is None
    assert isinstance(decoded.error, ImageError)
    assert decoded.error.code == sample.expected_error, decoded.error
    assert decoded.error.code in ERROR_CODES
    assert decoded.error.message
    assert not decoded.ok


def test_bad_corpus_covers_every_kind() -> None:
    codes = {s.expected_error for s in BAD}
    assert codes == {"empty", "not_image", "truncated", "too_large", "corrupt"}
    names = {s.name for s in BAD}
    assert {"truncated.jpg", "truncated.png", "bomb.png", "bomb.gif", "empty.jpg"} <= names


@pytest.mark.parametrize("sample", GOOD, ids=[s.name for s in GOOD])
def test_good_image_decodes_upright_in_the_right_colours(sample) -> None:
    decoded = decode_image(sample.data)
    assert decoded.error is None, decoded.error
    assert decoded.array is not None
    assert decoded.array.dtype == np.uint8 and decoded.array.ndim == 3 and decoded.array.shape[2] == 3
    assert (decoded.width, decoded.height) == sample.expected_size
    assert pattern_problems(sample, decoded.array) == []


def test_pattern_check_catches_a_wrong_orientation() -> None:
    sample = next(s for s in GOOD if s.name == "plain.png")
    array = decode_image(sample.data).array
    assert pattern_problems(sample, array[:, ::-1]) != []  # mirrored
    assert pattern_problems(sample, array[::-1]) != []  # upside down
    assert pattern_problems(sample, np.ascontiguousarray(np.rot90(array, 2))) != []


def test_16_bit_png_is_scaled_not_clipped() -> None:
    sample = next(s for s in GOOD if s.name == "gray16.png")
    array = decode_image(sample.data).array
    h, w = array.shape[:2]
    assert abs(int(array[h - 2, 2, 0]) - 64) <= 1  # 0x4000 -> 64 (clipping would give 255)
    assert abs(int(array[h - 2, w - 2, 0]) - 191) <= 1  # 0xC000 -> 191
    assert int(array[1, w // 2, 0]) == 255  # 0xFFFF -> 255


def test_jpeg_named_png_and_animated_first_frame() -> None:
    names = {s.name for s in GOOD}
    assert {"really_a_jpeg.png", "animated.gif", "animated.webp", "cmyk.jpg", "la.png", "rgba.png"} <= names
    webp = next(s for s in GOOD if s.name == "animated.webp")
    with Image.open(io.BytesIO(webp.data)) as im:
        assert getattr(im, "n_frames", 1) == 2  # really animated; the pattern check proves frame 0 was used


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = _jpeg(np.zeros((100, 120, 3), dtype=np.uint8))
    decoded = decode_image(data, max_pixels=100 * 120 - 1)
    assert decoded.error is not None and decoded.error.code == "too_large"
    assert (decoded.width, decoded.height) == (120, 100)
    assert decode_image(data, max_pixels=100 * 120).ok


def test_truncated_images_do_not_flip_the_global_pil_switch() -> None:
    truncated = next(s for s in BAD if s.name == "truncated.jpg")
    decode_image(truncated.data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_target_size_decodes_jpeg_reduced_but_never_below_target() -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    data = _jpeg(big)
    full = decode_image(data)
    assert full.array.shape == (768, 1024, 3)
    small = decode_image(data, target_size=224)
    assert (small.width, small.height) == (1024, 768)  # the original size is reported
    h, w = small.array.shape[:2]
    assert 224 <= h < 768 and 224 <= w < 1024
    exact = decode_image(data, target_size=(1024, 768))
    assert exact.array.shape == (768, 1024, 3)


def test_target_size_with_exif_rotation_keeps_the_upright_bound() -> None:
    upright = np.zeros((300, 800, 3), dtype=np.uint8)  # wide once rotated
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 800 high, 300 wide
    data = _jpeg(stored, exif=exif.tobytes())
    decoded = decode_image(data, target_size=(200, 140))
    assert (decoded.width, decoded.height) == (800, 300)
    h, w = decoded.array.shape[:2]
    assert w >= 200 and h >= 140 and w > h


def test_decode_never_raises_on_mangled_files() -> None:
    rng = np.random.default_rng(1)
    sources = [s.data for s in GOOD if s.name in ("plain.jpg", "plain.png", "animated.gif", "animated.webp")]
    for k in range(120):
        data = bytearray(sources[k % len(sources)])
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(0, len(data)))
            data[pos] = int(rng.integers(0, 256))
        if k % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        decoded = decode_image(bytes(data))
        assert (decoded.error is None) != (decoded.array is None)
        if decoded.error is not None:
            assert decoded.error.code in ERROR_CODES


def test_none_and_memoryview_inputs() -> None:
    assert decode_image(None).error.code == "empty"
    data = next(s for s in GOOD if s.name == "plain.png").data
    assert decode_image(memoryview(data)).ok


# ---------------------------------------------------------------------------------------------
# PreprocessConfig


def test_preprocess_config_round_trips() -> None:
    cfg = PreprocessConfig(image_size=96, normalization="per_image", resize_scale=1.25)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig.from_json(cfg.to_json()) == cfg
    assert cfg.to_dict()["mean"] == [0.485, 0.456, 0.406]
    # a preprocess.json from before the decode policy was recorded: its bundle was calibrated on full decodes
    assert PreprocessConfig.from_dict({"image_size": 64}) == PreprocessConfig(image_size=64, decode="full")
    assert PreprocessConfig().decode == "draft" and cfg.to_dict()["decode"] == "draft"
    assert PreprocessConfig(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    assert cfg.resize_size == 120


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"image_size": 4}, "image_size"),
        ({"normalization": "zscore"}, "normalization"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"resize_scale": 0.5}, "resize_scale"),
        ({"interpolation": "nearest"}, "interpolation"),
        ({"channel_order": "BGR"}, "channel_order"),
        ({"decode": "fast"}, "decode"),
    ],
)
def test_preprocess_config_rejects_bad_values(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        PreprocessConfig(**kwargs)


def test_preprocess_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['img_size'\]"):
        PreprocessConfig.from_dict({"img_size": 224})
    with pytest.raises(ValueError, match="not valid JSON"):
        PreprocessConfig.from_json("{oops")


# ---------------------------------------------------------------------------------------------
# preprocessing


def test_preprocess_eval_resizes_to_a_square() -> None:
    cfg = PreprocessConfig(image_size=32)
    array = np.full((50, 80, 3), 200, dtype=np.uint8)
    out = preprocess_eval(array, cfg)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.all(out == 200)
    same = np.zeros((32, 32, 3), dtype=np.uint8)
    assert preprocess_eval(same, cfg) is same
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        preprocess_eval(np.zeros((32, 32), dtype=np.uint8), cfg)


def test_ten_crop_corners_centre_and_mirrors() -> None:
    cfg = PreprocessConfig(image_size=16, resize_scale=1.5)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)  # already the resize size: crops are exact
    crops = ten_crop(array, cfg)
    assert crops.shape == (10, 16, 16, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0], array[:16, :16])
    np.testing.assert_array_equal(crops[1], array[:16, 8:])
    np.testing.assert_array_equal(crops[2], array[8:, :16])
    np.testing.assert_array_equal(crops[3], array[8:, 8:])
    np.testing.assert_array_equal(crops[4], array[4:20, 4:20])
    for k in range(5):
        np.testing.assert_array_equal(crops[5 + k], crops[k][:, ::-1])
    assert ten_crop(np.zeros((100, 60, 3), dtype=np.uint8), cfg).shape == (10, 16, 16, 3)


def test_train_augment_is_deterministic_per_seed() -> None:
    cfg = PreprocessConfig(image_size=48)
    array = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    a = TrainAugment(cfg, seed=5)
    b = TrainAugment(cfg, seed=5)
    outs_a = [a(array) for _ in range(4)]
    outs_b = [b(array) for _ in range(4)]
    for x, y in zip(outs_a, outs_b, strict=True):
        assert x.shape == (48, 48, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(outs_a[0], outs_a[1])  # a stream of different draws
    c = TrainAugment(cfg, seed=6)(array)
    assert not np.array_equal(c, outs_a[0])
    explicit = TrainAugment(cfg)(array, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(explicit, TrainAugment(cfg)(array, rng=np.random.default_rng(9)))


def test_train_augment_without_randomness_is_a_resize() -> None:
    cfg = PreprocessConfig(image_size=32)
    off = AugmentConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, brightness=0, contrast=0, saturation=0,
        degrees=0, translate=0, scale=(1.0, 1.0),
    )  # fmt: skip
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = TrainAugment(cfg, seed=0, augment=off)(array)
    np.testing.assert_array_equal(out, array)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))


def test_train_augment_flip_changes_orientation() -> None:
    cfg = PreprocessConfig(image_size=32)
    always = AugmentConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, brightness=0, contrast=0, saturation=0,
        degrees=0, translate=0, scale=(1.0, 1.0),
    )  # fmt: skip
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(TrainAugment(cfg, seed=0, augment=always)(array), array[:, ::-1])


_OFF = {
    "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "hflip": 0.0, "brightness": 0.0, "contrast": 0.0,
    "saturation": 0.0, "degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0),
}  # fmt: skip


def _only(**settings) -> AugmentConfig:
    """Every random step off except ``settings``."""
    return AugmentConfig(**{**_OFF, **settings})


def _smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful image (a bilinear blow-up of random pixels): no two shifts of it agree."""
    small = np.random.default_rng(seed).integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR))


def test_train_augment_output_contract_on_any_input(monkeypatch) -> None:
    import torch

    for image_size, (h, w) in ((48, (70, 90)), (32, (300, 20)), (64, (64, 64)), (64, (16, 16))):
        cfg = PreprocessConfig(image_size=image_size)
        for augment in (AugmentConfig(), _only()):
            out = TrainAugment(cfg, seed=0, augment=augment)(_smooth(h, w))
            assert out.shape == (image_size, image_size, 3) and out.dtype == np.uint8
            assert out.flags.c_contiguous and out.flags.writeable
    frozen = _smooth(40, 50)
    frozen.setflags(write=False)  # a read-only decode is augmented, never wrapped by a tensor
    from_numpy = torch.from_numpy

    def writable_only(array: np.ndarray):  # torch does not support tensors over read-only memory
        assert array.flags.writeable
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", writable_only)
    assert TrainAugment(PreprocessConfig(image_size=32), seed=0)(frozen).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="uint8"):
        TrainAugment(PreprocessConfig(image_size=32))(frozen.astype(np.float32))


def test_train_augment_seed_is_its_own_and_leaves_torch_alone() -> None:
    import torch

    cfg = PreprocessConfig(image_size=48)
    array = _smooth(70, 90)
    torch.manual_seed(1)
    first = [TrainAugment(cfg, seed=3)(array) for _ in range(2)]
    torch.manual_seed(2)  # another global torch state: the same augmentations
    before = torch.get_rng_state()
    again = TrainAugment(cfg, seed=3)
    out = again(array)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is untouched
    np.testing.assert_array_equal(out, first[0])
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(again(array), out)  # the next call draws afresh


def test_train_augment_hflip_probability_is_honoured() -> None:
    cfg = PreprocessConfig(image_size=32)
    array = _smooth(32, 32)
    never = TrainAugment(cfg, seed=0, augment=_only(hflip=0.0))
    always = TrainAugment(cfg, seed=0, augment=_only(hflip=1.0))
    half = TrainAugment(cfg, seed=0, augment=_only(hflip=0.5))
    for _ in range(20):
        np.testing.assert_array_equal(never(array), array)
        np.testing.assert_array_equal(always(array), array[:, ::-1])
    flipped = [np.array_equal(half(array), array[:, ::-1]) for _ in range(40)]
    assert 8 <= sum(flipped) <= 32  # both orientations, about half each


def _shift_of(
    out: np.ndarray, base: np.ndarray, fill: tuple[int, int, int], reach: int
) -> tuple[int, int] | None:
    """The whole-pixel (dx, dy) that turns ``base`` into ``out`` with ``fill`` uncovered, or None."""
    size = base.shape[0]
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            shifted = np.empty_like(base)
            shifted[:] = fill
            shifted[max(dy, 0) : size + min(dy, 0), max(dx, 0) : size + min(dx, 0)] = base[
                max(-dy, 0) : size + min(-dy, 0), max(-dx, 0) : size + min(-dx, 0)
            ]
            if np.array_equal(shifted, out):
                return dx, dy
    return None


def test_small_image_default_only_shifts_the_whole_resized_image() -> None:
    import dataclasses

    from mlc_ray.train.config import small_image_augment

    augment = dataclasses.replace(small_image_augment(), hflip=0.0)
    cfg = PreprocessConfig(image_size=64)
    array = _smooth(48, 80)  # not square: a crop (even a fallback centre crop) would cut the sides off
    base = preprocess_eval(array, cfg)  # the plain resize of the whole image
    transform = TrainAugment(cfg, seed=0, augment=augment)
    shifts = set()
    for _ in range(30):
        shift = _shift_of(transform(array), base, augment.fill, reach=3)
        assert shift is not None  # a whole-pixel shift of the resize, nothing resampled or jittered
        assert max(abs(shift[0]), abs(shift[1])) <= round(augment.translate * 64)  # +-2 px at 64
        shifts.add(shift)
    assert len(shifts) >= 8  # shifts in both directions on both axes
    assert {dx for dx, _ in shifts} >= {-1, 1} and {dy for _, dy in shifts} >= {-1, 1}


def test_train_augment_crop_rotation_and_jitter_settings_are_honoured() -> None:
    cfg = PreprocessConfig(image_size=48)
    array = _smooth(48, 48)
    fill = np.array(AugmentConfig().fill, dtype=np.uint8)

    def draws(**settings) -> list[np.ndarray]:
        transform = TrainAugment(cfg, seed=0, augment=_only(**settings))
        return [transform(array) for _ in range(8)]

    for out in draws():
        np.testing.assert_array_equal(out, array)
    # a random resized crop of a quarter of the area zooms in: never the whole image
    for out in draws(crop_scale=(0.25, 0.25)):
        assert np.abs(out.astype(int) - array).mean() > 5
    # rotation uncovers the corners (fill colour) unless the angle is ~0
    rotated = draws(degrees=40.0)
    assert all(not np.array_equal(out, array) for out in rotated)
    assert sum(np.array_equal(out[0, 0], fill) or np.array_equal(out[-1, -1], fill) for out in rotated) >= 4
    # the same on the tensor path (a random resized crop; float steps): fill at the corners, flat areas kept
    flat = np.full((60, 80, 3), 200, dtype=np.uint8)
    crop_rotate = _only(crop_scale=(0.8, 1.0), crop_ratio=(3 / 4, 4 / 3), degrees=40.0)
    transform = TrainAugment(cfg, seed=0, augment=crop_rotate)
    outs = [transform(flat) for _ in range(8)]
    assert all(np.array_equal(out[24, 24], [200, 200, 200]) for out in outs)
    assert sum(np.abs(out[0, 0].astype(int) - fill).max() <= 1 for out in outs) >= 4
    # brightness scales the mean by a factor within [1 - b, 1 + b], a different one per draw
    ratios = [out.astype(float).mean() / array.astype(float).mean() for out in draws(brightness=0.5)]
    assert all(0.45 <= r <= 1.55 for r in ratios) and max(ratios) - min(ratios) > 0.1
    # contrast scales the spread around the mean
    spreads = [out.astype(float).std() / array.astype(float).std() for out in draws(contrast=0.5)]
    assert max(spreads) - min(spreads) > 0.1

    # saturation scales each pixel's distance from its grey
    def colourfulness(x: np.ndarray) -> float:
        return float((x.astype(float) - x.astype(float).mean(axis=2, keepdims=True)).std())

    chroma = [colourfulness(out) / colourfulness(array) for out in draws(saturation=0.5)]
    assert max(chroma) - min(chroma) > 0.1


def test_normalize_imagenet_matches_the_formula() -> None:
    cfg = PreprocessConfig(image_size=8)
    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    out = normalize_batch_numpy(batch, cfg)
    assert out.shape == (3, 3, 8, 8) and out.dtype == np.float32
    mean, std = np.array(cfg.mean), np.array(cfg.std)
    expected = ((batch / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_normalize_per_image_standardises_each_image() -> None:
    cfg = PreprocessConfig(image_size=8, normalization="per_image")
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    batch[1] = 77  # constant image: std floors at 1/sqrt(N), result all zeros, no NaN
    out = normalize_batch_numpy(batch, cfg)
    assert out.shape == (2, 3, 8, 8)
    assert abs(float(out[0].mean())) < 1e-4 and abs(float(out[0].std()) - 1) < 1e-3
    assert np.all(out[1] == 0)
    x = batch[0].astype(np.float64)
    expected = (x - x.mean()) / max(x.std(), 1 / math.sqrt(x.size))
    np.testing.assert_allclose(out[0], expected.transpose(2, 0, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="NHWC"):
        normalize_batch_numpy(np.zeros((2, 3, 8, 8), dtype=np.uint8), cfg)

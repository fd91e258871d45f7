"""The one image path: decode policy (draft vs full) recorded in preprocess.json, prepare_image for
every evaluation consumer, and photo-like inputs at real camera sizes (draft engages only there)."""

from __future__ import annotations

import numpy as np
import pytest

from mlc_ray.data.images import (
    PreprocessConfig,
    decode_for_model,
    decode_image,
    prepare_image,
    preprocess_eval,
    read_and_prepare,
    ten_crop,
)
from mlc_ray.data.photos import REALISTIC_SET, photo_like_array, photo_like_bytes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def camera_jpeg() -> bytes:
    return photo_like_bytes(4000, 3000, "jpeg", seed=3)


def test_draft_decodes_a_camera_photo_at_reduced_scale_never_below_the_resize(camera_jpeg) -> None:
    draft = PreprocessConfig(image_size=224, decode="draft")
    full = PreprocessConfig(image_size=224, decode="full")
    small, big = decode_for_model(camera_jpeg, draft), decode_for_model(camera_jpeg, full)
    assert big.array.shape == (3000, 4000, 3)
    assert small.array.shape == (375, 500, 3)  # libjpeg's 1/8 scale: still >= 224 (and 10-crop's 255)
    assert min(decode_for_model(camera_jpeg, draft, view="10crop").array.shape[:2]) >= draft.resize_size
    vga = photo_like_bytes(640, 480, seed=2)
    assert decode_for_model(vga, draft).array.shape == (240, 320, 3)  # 1/2 >= 224
    assert decode_for_model(vga, draft, view="10crop").array.shape == (480, 640, 3)  # 1/2 < 255
    assert (small.width, small.height) == (big.width, big.height) == (4000, 3000)
    # the two policies give different model inputs: which one a bundle uses must be recorded
    a, b = preprocess_eval(small.array, draft), preprocess_eval(big.array, full)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_prepare_image_is_decode_for_model_then_the_view(camera_jpeg) -> None:
    cfg = PreprocessConfig(image_size=32)
    single = prepare_image(camera_jpeg, cfg)
    crops = prepare_image(camera_jpeg, cfg, view="10crop")
    assert single.ok and single.pixels.shape == (32, 32, 3) and (single.width, single.height) == (4000, 3000)
    np.testing.assert_array_equal(
        single.pixels, preprocess_eval(decode_for_model(camera_jpeg, cfg).array, cfg)
    )
    decoded = decode_for_model(camera_jpeg, cfg, view="10crop")
    np.testing.assert_array_equal(crops.pixels, ten_crop(decoded.array, cfg))
    bad = prepare_image(b"not an image", cfg)
    assert bad.pixels is None and bad.error.startswith("not_image: ")
    with pytest.raises(ValueError, match="view"):
        prepare_image(camera_jpeg, cfg, view="5crop")


@pytest.mark.parametrize(
    ("name", "width", "height", "kind"), [*REALISTIC_SET, ("at-size.png", 64, 64, "png")]
)
def test_prepare_image_single_view_is_byte_equal_to_decode_then_preprocess_eval(
    name, width, height, kind
) -> None:
    """The single view resizes the decoder's PIL image directly (no numpy round trip): the model input
    must stay byte for byte what ``preprocess_eval`` makes of the decoded array, for every kind of
    input (big JPEGs at draft scale, PNG, CMYK, EXIF-rotated, an image already at the model's size)."""
    data = photo_like_bytes(width, height, kind, seed=11)
    for cfg in (PreprocessConfig(image_size=64), PreprocessConfig(image_size=224, decode="full")):
        prepared = prepare_image(data, cfg)
        assert prepared.ok, prepared.error
        reference = preprocess_eval(decode_for_model(data, cfg).array, cfg)
        assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == reference.shape
        np.testing.assert_array_equal(prepared.pixels, reference, err_msg=name)
        assert prepared.pixels.flags.writeable == reference.flags.writeable  # at size: a writable copy
        assert (prepared.width, prepared.height) == (width, height)


def test_read_and_prepare_names_missing_and_reads_local_files(tmp_path) -> None:
    cfg = PreprocessConfig(image_size=32)
    path = tmp_path / "a.jpg"
    path.write_bytes(photo_like_bytes(640, 480, seed=1))
    assert read_and_prepare(str(path), cfg).ok
    missing = read_and_prepare(str(tmp_path / "nope.jpg"), cfg)
    assert missing.pixels is None and missing.error.startswith("missing: ")


@pytest.mark.parametrize(("name", "width", "height", "kind"), REALISTIC_SET)
def test_realistic_inputs_decode_upright_to_their_size(name, width, height, kind) -> None:
    data = photo_like_bytes(width, height, kind, seed=7)
    full = decode_image(data)
    assert full.ok, full.error
    assert (full.width, full.height) == (width, height) and full.array.shape == (height, width, 3)
    prepared = prepare_image(data, PreprocessConfig(image_size=64))
    assert prepared.ok and prepared.pixels.shape == (64, 64, 3)
    assert prepared.pixels.std() > 10  # photo-like content, not a flat colour
    # upright content: the decoded pixels are the generated ones (JPEG/CMYK error aside), EXIF applied
    diff = np.abs(full.array.astype(np.int16) - photo_like_array(width, height, seed=7).astype(np.int16))
    assert diff.mean() < 6, (name, diff.mean())

"""Manifests on the S3 server load exactly like the same files on local disk; demo data on S3."""

from __future__ import annotations

import numpy as np
import pytest

from mlc_ray.data.manifest import ManifestError, load_manifest
from tests.helpers import FORMATS, check_same_data, write_formats

pytestmark = pytest.mark.integration


@pytest.fixture
def both(s3_bucket: str, tmp_path) -> tuple[str, dict[str, str], str, dict[str, str]]:
    s3_root = f"s3://{s3_bucket}/datasets/small"
    local_root = str(tmp_path / "small")
    return s3_root, write_formats(s3_root), local_root, write_formats(local_root)


def _relative(images: list[str], root: str) -> list[str]:
    assert all(x.startswith(root + "/") for x in images), images[:2]
    return [x[len(root) + 1 :] for x in images]


def test_every_format_on_s3_loads_like_local(both) -> None:
    from mlc_ray import storage

    s3_root, s3_uris, local_root, local_uris = both
    for fmt in [*FORMATS, "folder", "folder_twin"]:
        remote, local = load_manifest(s3_uris[fmt]), load_manifest(local_uris[fmt])
        assert remote.source == s3_uris[fmt]
        assert all(x.startswith(f"{s3_root}/") for x in remote.images), fmt
        assert _relative(remote.images, s3_root) == _relative(local.images, local_root), fmt
        assert remote.vocabulary == local.vocabulary, fmt
        assert remote.labels == local.labels, fmt
        assert remote.splits == local.splits, fmt
        np.testing.assert_array_equal(remote.multi_hot(), local.multi_hot())
        assert storage.exists(remote.images[0]), fmt
    for fmt in FORMATS:
        check_same_data(load_manifest(s3_uris[fmt]), s3_root, with_splits=fmt in ("csv", "jsonl", "parquet"))


def test_s3_errors_name_the_object(s3_bucket: str) -> None:
    from mlc_ray import storage

    missing = f"s3://{s3_bucket}/nope/manifest.csv"
    with pytest.raises(ManifestError, match=f"{missing}: manifest file does not exist"):
        load_manifest(missing)
    bad = f"s3://{s3_bucket}/bad/manifest.csv"
    storage.write_text(bad, "image,labels\n../../escape.jpg,a\n")
    with pytest.raises(ManifestError, match="row 1 .*above the bucket root"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="no label subfolders"):
        load_manifest(f"s3://{s3_bucket}/empty-prefix/")


def test_write_to_s3_round_trips(both) -> None:
    s3_root, s3_uris, _, _ = both
    manifest = load_manifest(s3_uris["csv"])
    out = manifest.write(f"{s3_root}/copies/m.parquet")
    again = load_manifest(out)
    assert again.images == manifest.images and again.labels == manifest.labels
    assert again.sha256 == manifest.sha256


def test_demo_data_on_s3(s3_bucket: str) -> None:
    from mlc_ray import storage
    from mlc_ray.data.demo import MARKER, ensure_demo_data

    root = f"s3://{s3_bucket}/demo"
    uri = ensure_demo_data(root, num_train=12, num_val=6, image_size=48)
    assert uri == f"{root}/manifest.csv"
    assert storage.exists(f"{root}/{MARKER}")
    manifest = load_manifest(uri)
    assert len(manifest) == 18 and manifest.images[0] == f"{root}/images/00000.jpg"
    assert storage.read_bytes(manifest.images[0])[:3] == b"\xff\xd8\xff"
    assert ensure_demo_data(root, num_train=12, num_val=6, image_size=48) == uri

"""The model cache is keyed by content: an s3:// bundle re-exported under the same prefix is
downloaded again (checked against its sha256.json on every resolve; by listing for old bundles)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mlc_ray import storage
from mlc_ray.bundle import SHA256_MANIFEST, ModelBundle, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LABELS = ["a", "b", "c"]


def write_bundle(root: Path, seed: int, threshold: float, manifest: bool = True) -> dict[str, str]:
    """A tiny exported bundle (its own weights per seed); returns {file: sha256}."""
    import torch

    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.export.onnx import export_onnx
    from mlc_ray.models import ImageTagger, create_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pre = PreprocessConfig(image_size=32)
    tagger = ImageTagger(create_model("mobilenet_v1", len(LABELS), width=0.25), pre).eval()
    export_onnx(tagger, str(root / "model.onnx"), image_size=32)
    (root / "labels.json").write_text('["a", "b", "c"]')
    (root / "preprocess.json").write_text(pre.to_json())
    Thresholds(labels=LABELS, values=[threshold] * 3, method="fixed").save(str(root / "thresholds.json"))
    bundle = ModelBundle(root)
    return bundle.write_manifest() if manifest else bundle.sha256s()


def upload(local: Path, uri: str) -> None:
    """Like export does: the bundle's files, then sha256.json last; files the new bundle lacks go."""
    names = sorted(p.name for p in local.iterdir())
    names.sort(key=lambda n: n == SHA256_MANIFEST)
    prefix = uri.rstrip("/") + "/"
    for obj in list(storage.iter_objects(prefix)):
        if obj.uri[len(prefix) :] not in names:
            storage.delete(obj.uri)
    for name in names:
        storage.upload_file(local / name, storage.join(uri, name))


@pytest.mark.parametrize("with_manifest", [True, False], ids=["sha256.json", "legacy-listing"])
def test_reexported_bundle_under_the_same_prefix_is_downloaded_again(
    s3_bucket, tmp_path, with_manifest
) -> None:
    from mlc_ray.registry import resolve_model

    uri = f"s3://{s3_bucket}/models/tagger"
    cache = tmp_path / "cache"
    first = write_bundle(tmp_path / "v1", seed=0, threshold=0.5, manifest=with_manifest)
    upload(tmp_path / "v1", uri)
    local = Path(resolve_model(uri, cache).local_dir)
    assert sha256_file(local / "model.onnx") == first["model.onnx"]
    assert ModelBundle(local).thresholds().values == [0.5] * 3
    # resolving again without a change keeps the cached copy (same directory, same files)
    assert Path(resolve_model(uri, cache).local_dir) == local

    # re-export under the same prefix: new weights, new thresholds
    second = write_bundle(tmp_path / "v2", seed=1, threshold=0.3, manifest=with_manifest)
    assert second["model.onnx"] != first["model.onnx"]
    upload(tmp_path / "v2", uri)
    again = Path(resolve_model(uri, cache).local_dir)
    assert sha256_file(again / "model.onnx") == second["model.onnx"]
    assert ModelBundle(again).thresholds().values == [0.3] * 3


def test_a_cached_file_changed_on_disk_is_replaced_on_the_next_resolve(s3_bucket, tmp_path) -> None:
    from mlc_ray.registry import resolve_model

    uri = f"s3://{s3_bucket}/models/tagger"
    digests = write_bundle(tmp_path / "v1", seed=0, threshold=0.5)
    upload(tmp_path / "v1", uri)
    local = Path(resolve_model(uri, tmp_path / "cache").local_dir)
    (local / "thresholds.json").write_text("{}")  # damaged cache
    shutil.copy(tmp_path / "v1" / "model.onnx", local / "model.int8.onnx")  # a file the bundle lacks
    local = Path(resolve_model(uri, tmp_path / "cache").local_dir)
    assert sha256_file(local / "thresholds.json") == digests["thresholds.json"]
    assert not (local / "model.int8.onnx").exists()

"""ModelBundle: artifact paths, loaders, sha256 verification that names a tampered file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mlc_ray.bundle import ARTIFACT_FILES, BundleIntegrityError, ModelBundle
from mlc_ray.calibrate import Thresholds
from mlc_ray.export.parity import synthetic_images, torch_probabilities
from tests.unit.test_export_ncnn import LABELS, SIZE, write_bundle

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def bundle_dir(tmp_path):
    folder, model = write_bundle(tmp_path / "bundle", "mobilenet_v3_small")
    Thresholds(LABELS, [0.5, 0.4, 0.3, 0.6], "f1_max").save(str(folder / "thresholds.json"))
    return folder, model


def test_loaders_rebuild_the_trained_model(bundle_dir):
    folder, model = bundle_dir
    bundle = ModelBundle(folder)
    assert bundle.labels() == LABELS
    assert bundle.preprocess().image_size == SIZE
    assert bundle.model_spec()["arch"] == "mobilenet_v3_small"
    assert bundle.thresholds().values == [0.5, 0.4, 0.3, 0.6]
    loaded = bundle.load_model()
    assert not loaded.training
    images = synthetic_images(3, SIZE, seed=4)
    np.testing.assert_allclose(
        torch_probabilities(loaded, images), torch_probabilities(model, images), atol=1e-6
    )
    assert bundle.present() == ["model.pt", "model.json", "labels.json", "preprocess.json", "thresholds.json"]
    assert bundle.onnx_path == folder / "model.onnx" and not bundle.has("model.onnx")
    assert set(bundle.present()) <= set(ARTIFACT_FILES)


def test_sha256s_and_verify_name_the_tampered_file(bundle_dir):
    folder, _ = bundle_dir
    bundle = ModelBundle(folder)
    digests = bundle.sha256s()
    assert digests["labels.json"] == hashlib.sha256((folder / "labels.json").read_bytes()).hexdigest()
    assert set(digests) == set(bundle.present())
    bundle.verify(digests)  # untouched: no error
    (folder / "labels.json").write_text('["cat", "dog", "red", "txet"]')
    with pytest.raises(BundleIntegrityError, match=r"labels\.json was modified") as info:
        bundle.verify(digests)
    assert "model.pt" not in str(info.value)
    (folder / "model.json").unlink()
    with pytest.raises(BundleIntegrityError, match=r"model\.json is missing"):
        bundle.verify(digests)


def test_clear_errors_for_bad_bundles(tmp_path, bundle_dir):
    folder, _ = bundle_dir
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ModelBundle(tmp_path / "nope")
    with pytest.raises(ValueError, match="download it first"):
        ModelBundle("s3://bucket/models/x")
    with pytest.raises(ValueError, match="not a bundle artifact"):
        ModelBundle(folder).path("weights.pkl")
    (folder / "model.json").write_text('{"arch": "mobilenet_v3_small", "num_labels": 7}')
    with pytest.raises(ValueError, match="does not fit model.json"):
        ModelBundle(folder).load_model()
    (folder / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"metrics\.json: not valid JSON"):
        ModelBundle(folder).metrics()

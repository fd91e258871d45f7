"""ModelBundle: artifact paths, loaders, sha256 verification that names a tampered file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mlc_ray.bundle import ARTIFACT_FILES, BundleIntegrityError, ModelBundle
from mlc_ray.calibrate import Thresholds
from mlc_ray.export.parity import synthetic_images, torch_probabilities
from tests.helpers import EXPORT_LABELS as LABELS
from tests.helpers import EXPORT_SIZE as SIZE
from tests.helpers import write_bundle

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


def test_manifest_of_hashes_and_one_file_list(bundle_dir):
    import json

    from mlc_ray.bundle import (
        EXPORT_FILES,
        PYFUNC_KEYS,
        REQUIRED_FOR_INFERENCE,
        SHA256_MANIFEST,
        TRAINING_FILES,
    )
    from mlc_ray.registry import ARTIFACT_FILES as REGISTRY_FILES
    from mlc_ray.tagging.backends import NCNN_FILES, ONNX_FILES
    from mlc_ray.train.runner import BUNDLE_FILES

    folder, _ = bundle_dir
    bundle = ModelBundle(folder)
    assert bundle.manifest() is None  # written before manifests: no sha256.json
    digests = bundle.write_manifest()
    assert bundle.manifest() == digests == bundle.sha256s()
    assert json.loads((folder / SHA256_MANIFEST).read_text())["files"] == digests
    # every other module speaks of the bundle's files through bundle.py's list
    assert set(REGISTRY_FILES.values()) == set(ARTIFACT_FILES) == set(PYFUNC_KEYS)
    assert set(BUNDLE_FILES) == {*TRAINING_FILES, SHA256_MANIFEST}
    assert set(ONNX_FILES.values()) | set(NCNN_FILES) == {n for names in EXPORT_FILES.values() for n in names}
    assert set(REQUIRED_FOR_INFERENCE) <= set(ARTIFACT_FILES)


def test_thresholds_for_other_labels_and_legacy_preprocess(bundle_dir):
    import json

    from mlc_ray.bundle import BundleError
    from mlc_ray.cli import UserError

    folder, _ = bundle_dir
    Thresholds(list(reversed(LABELS)), [0.5] * 4, "fixed").save(str(folder / "thresholds.json"))
    with pytest.raises(BundleError, match="inconsistent") as info:
        ModelBundle(folder).thresholds()
    assert isinstance(info.value, UserError)  # jobs print one error: line, no traceback
    data = json.loads((folder / "preprocess.json").read_text())
    data.pop("decode", None)  # a preprocess.json from before the decode policy was recorded
    (folder / "preprocess.json").write_text(json.dumps(data))
    assert ModelBundle(folder).preprocess().decode == "full"

"""Tag table = pyfunc model = evaluation path, on the images users send (not 56x44 thumbnails).

JPEGs at 640x480, 1920x1080 and 4000x3000 (where libjpeg's reduced-scale decode engages), a PNG, a
CMYK JPEG and an EXIF-rotated JPEG, photo-like (``mlc_ray.data.photos``), on the S3 server. The same
objects go through ``run_tagging`` (Ray Data, onnxruntime fp32), the pyfunc model as MLflow loads it
(``mlc_ray/pyfunc_model.py``) and ``mlc_ray.evaluation.BundleScorer`` (promotion's path): scores
within 1e-5 and the same labels. The model is a small MobileNetV1 whose BatchNorm statistics were
set on other photo-like images, so its scores move with the pixels: the test first checks that
decoding with the *other* policy moves them by more than the tolerance, i.e. that it can fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mlc_ray import storage
from mlc_ray.data.photos import REALISTIC_SET, photo_like_bytes
from mlc_ray.tagging.config import TagConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LABELS = ["a", "b", "c", "d", "e", "f", "g"]
IMAGE_SIZE = 64
TOLERANCE = 1e-5


def make_photo_bundle(root: Path) -> str:
    """A bundle whose model reacts to photo content; thresholds at each label's median score."""
    import torch

    from mlc_ray.bundle import ModelBundle
    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.images import PreprocessConfig, prepare_image
    from mlc_ray.export.onnx import export_onnx
    from mlc_ray.models import ImageTagger, create_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pre = PreprocessConfig(image_size=IMAGE_SIZE)
    tagger = ImageTagger(create_model("mobilenet_v1", len(LABELS), width=0.25), pre)
    for module in tagger.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    warm = np.stack([prepare_image(photo_like_bytes(320, 240, seed=50 + i), pre).pixels for i in range(16)])
    tagger.train()
    with torch.no_grad():
        tagger(torch.from_numpy(warm))
    tagger.eval()
    with torch.no_grad():
        probs = torch.sigmoid(tagger(torch.from_numpy(warm))).numpy()
    export_onnx(tagger, str(root / "model.onnx"), image_size=IMAGE_SIZE)
    (root / "labels.json").write_text(json.dumps(LABELS))
    (root / "preprocess.json").write_text(pre.to_json())
    thresholds = np.median(probs, axis=0).astype(float).tolist()
    Thresholds(labels=LABELS, values=thresholds, method="fixed").save(str(root / "thresholds.json"))
    ModelBundle(root).write_manifest()
    return str(root)


@pytest.fixture(scope="module")
def photo_bundle(tmp_path_factory) -> str:
    return make_photo_bundle(tmp_path_factory.mktemp("parity") / "photo-tagger")


@pytest.fixture(scope="module")
def realistic_images(s3_server, ray_local) -> dict[str, bytes]:
    import boto3

    bucket = "parity-inputs"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    storage.reset_clients()
    client = storage.s3_client()
    images = {}
    for i, (name, width, height, kind) in enumerate(REALISTIC_SET):
        data = photo_like_bytes(width, height, kind, seed=i)
        client.put_object(Bucket=bucket, Key=f"in/{name}", Body=data)
        images[f"s3://{bucket}/in/{name}"] = data
    return images


def test_tag_table_equals_pyfunc_and_evaluation_on_realistic_images(photo_bundle, realistic_images) -> None:
    import dataclasses

    import pandas as pd
    from mlflow.pyfunc import PythonModelContext

    from mlc_ray.bundle import PYFUNC_KEYS, REQUIRED_FOR_INFERENCE
    from mlc_ray.evaluation import BundleScorer
    from mlc_ray.pyfunc_model import ImageTaggerModel
    from mlc_ray.tagging.pipeline import run_tagging
    from tests.helpers import read_table

    uris = sorted(realistic_images)
    scorer = BundleScorer(photo_bundle)
    assert scorer.preprocess.decode == "draft"
    eval_scores, errors = scorer.score_bytes([realistic_images[u] for u in uris])
    assert errors == [None] * len(uris)

    # [0] the test can fail: the other decode policy moves the big JPEGs' scores past the tolerance
    other = dataclasses.replace(scorer.preprocess, decode="full")
    from mlc_ray.data.images import prepare_image

    moved = scorer.run(np.stack([prepare_image(realistic_images[u], other).pixels for u in uris]))
    big = [i for i, u in enumerate(uris) if u.endswith(("camera.jpg", "fullhd.jpg"))]
    assert np.abs(moved[big] - eval_scores[big]).max() > 10 * TOLERANCE

    # [1] the tag table (Ray Data actors, onnxruntime fp32)
    output = "s3://parity-inputs/tags"
    cfg = TagConfig(model=photo_bundle, input="s3://parity-inputs/in/", output=output, batch_size=4)
    summary = run_tagging(cfg)
    assert summary.images == len(uris) and summary.errors == 0
    rows = {r["image_uri"]: r for r in read_table(output).to_pylist()}
    assert sorted(rows) == uris

    # [2] the pyfunc model as MLflow loads it, on the same URIs
    files = {PYFUNC_KEYS[name]: os.path.join(photo_bundle, name) for name in REQUIRED_FOR_INFERENCE}
    model = ImageTaggerModel()
    model.load_context(PythonModelContext(files, None))
    predicted = {p["image"]: p for _, p in model.predict(None, pd.DataFrame({"image": uris})).iterrows()}

    thresholds = scorer.bundle.threshold_values()
    n_labels_on = 0
    for i, uri in enumerate(uris):
        row, pred = rows[uri], predicted[uri]
        assert row["error"] is None and pd.isna(pred["error"]), (uri, row["error"], pred["error"])
        table_scores = np.array([s["score"] for s in row["scores"]])
        assert [s["label"] for s in row["scores"]] == LABELS
        np.testing.assert_allclose(table_scores, [s["score"] for s in pred["scores"]], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(table_scores, eval_scores[i], atol=TOLERANCE, rtol=0)
        expected_labels = [
            label for label, s, t in zip(LABELS, eval_scores[i], thresholds, strict=True) if s >= t
        ]
        assert row["labels"] == list(pred["labels"]) == expected_labels, uri
        n_labels_on += len(row["labels"])
        name = uri.rsplit("/", 1)[1]
        width, height = next((w, h) for n, w, h, _ in REALISTIC_SET if n == name)
        assert (row["width"], row["height"]) == (width, height), uri  # upright size (EXIF applied)
    assert 0 < n_labels_on < len(uris) * len(LABELS)  # thresholds that both include and exclude labels

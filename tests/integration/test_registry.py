"""The MLflow registry against a real ``mlflow server`` process: register, resolve, pyfunc.

One server per test session (the ``mlflow_server`` fixture in tests/conftest.py: sqlite backend,
local proxied artifact root, 127.0.0.1, a free port), shared with ``test_promote.py`` and
``test_alias_history.py``; the colour bundles are built by tests/helpers.py. The bundles are real ONNX graphs with a known quality on a
colour data set: label c ("red"/"green"/"blue") is present when channel c is bright, and a model
scores label c from a weighted mix of the channel means. The weights decide how good it is, so
promotion tests can build a better or a worse model without training one.

The one test that trains (``test_trained_model_end_to_end_through_the_server``) trains in Ray Train's
local mode (``tests.helpers.ray_train_in_process``: the training loop in this process, no worker
actors; ~25 s of worker start-up saved on 2 CPUs): what it tests is the bundle's way through export,
the registry, promotion and pyfunc. Real-worker training is tested in test_train.py,
test_train_defaults.py (mobilenet_v1 and the resume test) and the chaos checkpoint test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import COLOR_LABELS as LABELS
from tests.helpers import (
    GOOD,
    REPO_ROOT,
    MlflowServer,
    build_color_bundle,
    onnx_reference,
    ray_train_in_process,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


# ---------------------------------------------------------------------------------------------- server


# ---------------------------------------------------------------------------------------------- data


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def registered(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mlc_ray.registry import register_bundle

    bundle = build_color_bundle(tmp_path_factory.mktemp("bundle") / "good", GOOD)
    mv = register_bundle(
        bundle,
        "reg-test",
        tags={"manifest_sha256": "abc123"},
        command_line="python jobs/train.py --register-as reg-test",
    )
    return {"bundle": bundle, "version": mv}


def test_register_records_artifacts_tags_and_challenger(registered: dict) -> None:
    from mlflow import MlflowClient

    bundle, mv = registered["bundle"], registered["version"]
    client = MlflowClient()
    assert client.get_model_version_by_alias("reg-test", "challenger").version == mv.version
    for name in (
        "model.onnx",
        "labels.json",
        "preprocess.json",
        "thresholds.json",
        "metrics.json",
        "model.json",
    ):
        assert mv.tags[f"sha256.{name}"] == hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    assert mv.tags["manifest_sha256"] == "abc123"
    assert mv.tags["command_line"] == "python jobs/train.py --register-as reg-test"
    assert mv.tags["metric.macro_f1"] == "0.5"
    assert mv.tags["arch"] == "color-test"
    assert len(mv.tags["git_commit"].split("-")[0]) == 40
    run_id = mv.tags["training_run_id"]
    assert run_id == mv.run_id
    logged = {f.path for f in client.list_artifacts(run_id, "bundle")}
    assert {"bundle/thresholds.json", "bundle/labels.json", "bundle/preprocess.json"} <= logged
    # The pyfunc model records a signature and an input example.
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/reg-test/{mv.version}")
    assert info.signature.inputs.input_names() == ["image"]
    assert "scores" in info.signature.outputs.input_names()
    assert info.saved_input_example_info is not None


def test_resolve_pins_alias_downloads_once_and_verifies(registered: dict, tmp_path: Path) -> None:
    from mlc_ray.registry import resolve_model

    mv = registered["version"]
    resolved = resolve_model("models:/reg-test@challenger", cache_dir=tmp_path)
    assert (resolved.name, resolved.version, resolved.alias) == ("reg-test", str(mv.version), "challenger")
    assert resolved.pinned_uri == f"models:/reg-test/{mv.version}"
    local = Path(resolved.local_dir)
    assert local == tmp_path / "reg-test" / str(mv.version) / "artifacts"
    assert (local / "model.onnx").read_bytes() == (registered["bundle"] / "model.onnx").read_bytes()
    # A second resolve reuses the verified cache (a marker file in it survives) ...
    (local.parent / "marker").write_text("cached")
    again = resolve_model(f"models:/reg-test/{mv.version}", cache_dir=tmp_path)
    assert again.local_dir == resolved.local_dir and (local.parent / "marker").exists()
    # ... and a damaged cached copy is replaced by a fresh, verified download.
    (local / "thresholds.json").write_text("{}")
    healed = resolve_model("models:/reg-test@challenger", cache_dir=tmp_path)
    assert (Path(healed.local_dir) / "thresholds.json").read_bytes() == (
        registered["bundle"] / "thresholds.json"
    ).read_bytes()


def test_resolve_errors_name_what_exists(registered: dict, tmp_path: Path) -> None:
    from mlc_ray.cli import UserError
    from mlc_ray.registry import ModelNotFoundError, resolve_model

    with pytest.raises(ModelNotFoundError, match=r"no alias '@champ'.*@challenger -> v1"):
        resolve_model("models:/reg-test@champ", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"no registered model 'nope'.*reg-test"):
        resolve_model("models:/nope@champion", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="no version 99"):
        resolve_model("models:/reg-test/99", cache_dir=tmp_path)
    with pytest.raises(UserError, match="bad model URI"):
        resolve_model("models:/reg-test", cache_dir=tmp_path)
    assert issubclass(ModelNotFoundError, UserError)


def test_resolve_bundle_directory(registered: dict, tmp_path: Path) -> None:
    from mlc_ray.cli import UserError
    from mlc_ray.registry import resolve_model

    resolved = resolve_model(str(registered["bundle"]), cache_dir=tmp_path)
    assert resolved.name is None and Path(resolved.local_dir) == registered["bundle"].resolve()
    with pytest.raises(UserError, match="lacks thresholds.json"):
        (tmp_path / "partial").mkdir()
        (tmp_path / "partial" / "model.onnx").write_bytes(b"x")
        (tmp_path / "partial" / "labels.json").write_text("[]")
        (tmp_path / "partial" / "preprocess.json").write_text("{}")
        resolve_model(str(tmp_path / "partial"))


FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
uris = json.loads(sys.argv[2])
images = uris + [open(uris[0], "rb").read(), sys.argv[3]]
out = model.predict(pd.DataFrame({"image": images}))
print("RESULT" + out.to_json(orient="records"))
"""


def predict_in_fresh_process(model_uri: str, uris: list[str], bad_uri: str) -> list[dict]:
    """``mlflow.pyfunc.load_model(model_uri).predict`` in a new interpreter on the URIs, the first
    image's bytes and ``bad_uri``; the rows as JSON records."""
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, model_uri, json.dumps(uris), bad_uri],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_pyfunc_champion_in_fresh_process_matches_onnx(registered: dict, color_data: str) -> None:
    from mlflow import MlflowClient

    from mlc_ray.registry import promote

    decision = promote("reg-test", color_data, candidate="challenger")
    assert decision.promoted and "first promotion" in decision.reason
    assert (
        MlflowClient().get_model_version_by_alias("reg-test", "champion").version
        == registered["version"].version
    )

    root = Path(color_data).parent
    uris = [str(root / f"images/{i:03d}.jpg") for i in range(6)]
    rows = predict_in_fresh_process("models:/reg-test@champion", uris, str(root / "corrupt.jpg"))
    assert len(rows) == len(uris) + 2

    data = [Path(u).read_bytes() for u in uris]
    expected = onnx_reference(registered["bundle"], data)
    for i, row in enumerate(rows[: len(uris) + 1]):
        ref = expected[i % len(uris)]
        assert row["error"] is None
        assert [s["label"] for s in row["scores"]] == LABELS
        np.testing.assert_allclose([s["score"] for s in row["scores"]], ref, rtol=0, atol=1e-6)
        assert row["labels"] == [label for label, p in zip(LABELS, ref, strict=True) if p > 0.5]
    assert rows[0]["image"] == uris[0] and rows[len(uris)]["image"] is None  # bytes input has no URI
    bad = rows[-1]
    assert bad["error"] and bad["labels"] == [] and bad["image"].endswith("corrupt.jpg")


def test_register_and_resolve_an_s3_bundle(
    mlflow_server: MlflowServer, s3_bucket: str, registered: dict, tmp_path: Path
) -> None:
    from mlc_ray import storage
    from mlc_ray.registry import register_bundle, resolve_model

    prefix = f"s3://{s3_bucket}/models/run-1/bundle"
    for path in registered["bundle"].iterdir():
        storage.upload_file(str(path), f"{prefix}/{path.name}")
    mv = register_bundle(prefix, "reg-s3", alias="challenger")
    assert mv.tags["bundle_uri"] == prefix
    assert mv.tags["sha256.model.onnx"] == registered["version"].tags["sha256.model.onnx"]
    direct = resolve_model(prefix, cache_dir=tmp_path)
    assert direct.name is None
    assert (Path(direct.local_dir) / "model.onnx").read_bytes() == (
        registered["bundle"] / "model.onnx"
    ).read_bytes()


def test_parse_uri_verify_and_report_without_a_server(tmp_path: Path) -> None:
    from mlc_ray.registry import ArtifactIntegrityError, PromotionDecision, parse_model_uri, verify_artifacts

    assert parse_model_uri("models:/tagger@champion") == ("tagger", None, "champion")
    assert parse_model_uri("models:/tagger/12") == ("tagger", "12", None)
    (tmp_path / "model.onnx").write_bytes(b"weights")
    good = {"sha256.model.onnx": hashlib.sha256(b"weights").hexdigest()}
    verify_artifacts(tmp_path, good, where="t v1")
    with pytest.raises(ArtifactIntegrityError, match="t v1: artifact model.onnx does not match"):
        verify_artifacts(tmp_path, {"sha256.model.onnx": "0" * 64}, where="t v1")
    with pytest.raises(ArtifactIntegrityError, match="labels.json is missing"):
        verify_artifacts(tmp_path, {**good, "sha256.labels.json": "0" * 64}, where="t v1")
    with pytest.raises(ArtifactIntegrityError, match="no sha256"):
        verify_artifacts(tmp_path, {}, where="t v1")

    decision = PromotionDecision(
        name="t", action="promote", promoted=False, reason="macro_f1 0.5000 < champion 0.6000 + min delta 0.0000",
        candidate_version="3", champion_version="2", candidate_value=0.5, champion_value=0.6,
        label_drops={"cat": 0.2}, eval_data="m.csv [auto]", n_images=10,
    )  # fmt: skip
    report = decision.report()
    assert decision.exit_code == 3 and len(report.splitlines()) <= 24
    assert "v3 vs v2 (champion)" in report and "delta -0.1000" in report and "cat -0.200" in report
    tags = decision.audit_tags("candidate")
    assert tags["promotion.decision"] == "refused" and tags["promotion.champion_value"] == "0.600000"
    assert sum(k.startswith("promotion.log.") for k in tags) == 1


def test_trained_model_end_to_end_through_the_server(
    mlflow_server: MlflowServer, ray_local: None, tmp_path: Path
) -> None:
    """train (tiny) -> export + register -> promote -> pyfunc in a fresh process == the ONNX path."""
    from mlflow import MlflowClient

    from mlc_ray.data.demo import generate_demo
    from mlc_ray.registry import promote
    from mlc_ray.train.config import TrainConfig
    from mlc_ray.train.job import run_train_job

    data = generate_demo(str(tmp_path / "demo"), seed=4, num_train=64, num_val=16, image_size=32)
    cfg = TrainConfig(
        data=data,
        storage_path=str(tmp_path / "runs"),
        run_name="e2e",
        model="mobilenet_v1",
        width=0.5,
        image_size=32,
        epochs=1,
        batch_size=16,
        warmup_epochs=0.5,
        experiment="registry-e2e",
        register_as="trained-e2e",
    )
    with ray_train_in_process() as local:
        result = run_train_job(cfg)
    assert local.starts, "the job did not start a TorchTrainer"
    client = MlflowClient()
    version = client.get_model_version_by_alias("trained-e2e", "challenger")
    assert version.run_id == result.mlflow_run_id
    assert {"sha256.model.onnx", "sha256.thresholds.json", "command_line"} <= set(version.tags)
    # training recorded its seeded split's val rows as the evaluation data, and its training images
    assert version.tags["eval_data_uri"] == f"runs:/{result.mlflow_run_id}/evidence/val_manifest.csv"
    assert version.tags["eval_data_sha256"] == result.val_manifest.sha256
    given = promote("trained-e2e", candidate="challenger", eval_data=data, dry_run=True)  # rows given
    assert given.n_images == 16 and given.candidate_value is not None and given.thresholds_fit == ""
    decision = promote("trained-e2e", candidate="challenger")  # the version's own val split
    assert decision.promoted and decision.exit_code == 0
    assert decision.n_images == len(result.val_manifest) == 16
    assert decision.train_overlap.startswith("0 of 16 evaluation images"), decision.train_overlap
    # ... and its thresholds were fitted on those rows: the report says the figure is in-sample and
    # gives the cross-fitted one training measured on them
    metrics = json.loads((Path(cfg.bundle_dir) / "metrics.json").read_text())
    assert decision.thresholds_fit.startswith(
        "v1's were fitted on these rows (fitted on all 16 validation rows)"
    )
    assert (
        f"(cross-fitted on them at training: {metrics['calibrated']['macro_f1']:.4f})"
        in decision.thresholds_fit
    )
    assert f"thresholds {decision.thresholds_fit}" in decision.report()

    bundle = Path(cfg.bundle_dir)
    uris = [str(Path(data).parent / f"images/{i:05d}.jpg") for i in range(6)]
    rows = predict_in_fresh_process("models:/trained-e2e@champion", uris, str(tmp_path / "missing.jpg"))
    expected = onnx_reference(bundle, [Path(u).read_bytes() for u in uris])
    labels = json.loads((bundle / "labels.json").read_text())
    thresholds = json.loads((bundle / "thresholds.json").read_text())
    for i, row in enumerate(rows[: len(uris)]):
        assert row["error"] is None
        np.testing.assert_allclose([s["score"] for s in row["scores"]], expected[i], rtol=0, atol=1e-6)
        want = [
            lab for lab, p, t in zip(labels, expected[i], thresholds["thresholds"], strict=True) if p >= t
        ]
        assert row["labels"] == want
    assert rows[-1]["error"] and rows[-1]["labels"] == []  # a missing file is an error row

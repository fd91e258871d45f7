"""Hard-sample mining as one job on a local Ray: base -> score the train split -> mine -> fine-tune.

A tiny demo set and short stages: this checks the plumbing (nested MLflow runs, the mined manifest
with its reasons, the fine-tune starting from the base weights on the same validation rows, the
before/after report); whether mining helps on the full demo set is measured by the demo-scale run
recorded in README.md's mining section.

The three training stages (base, fine-tune, random control) run in Ray Train's local mode
(``tests.helpers.ray_train_in_process``: the training loop in this process, no worker actors; ~25 s
of worker start-up saved per stage on 2 CPUs): mining's plumbing is what this module tests, and each
stage is its own run started from weights it is given, never a resume. Scoring the train split and
the report run on the local Ray as in a job. Real-worker training is tested in test_train.py,
test_train_defaults.py (mobilenet_v1 and the resume test) and the chaos checkpoint test.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from mlc_ray.data.demo import generate_demo
from mlc_ray.train.config import TrainConfig
from mlc_ray.train.job import run_train_job
from mlc_ray.train.mining import MiningConfig
from mlc_ray.train.runner import TrainResult
from tests.helpers import ray_train_in_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def mined(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, TrainConfig, str]:
    root = tmp_path_factory.mktemp("mining")
    data = generate_demo(str(root / "demo"), seed=1, num_train=96, num_val=32, image_size=32)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = TrainConfig(
        data=data,
        storage_path=str(root / "runs"),
        run_name="mine",
        model="mobilenet_v1",
        width=0.5,
        image_size=32,
        epochs=2,
        batch_size=16,
        warmup_epochs=0.5,
        experiment="test-mining",
        mining=MiningConfig(enabled=True, top_k=8, fine_tune_epochs=1, replay_fraction=0.2),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        with ray_train_in_process() as local:
            result = run_train_job(cfg)
    assert local.starts, "the job did not start a TorchTrainer"
    return result, cfg, uri


def test_three_stages_are_nested_runs_under_one_parent(mined) -> None:
    from mlflow import MlflowClient

    result, cfg, uri = mined
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("test-mining")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlc_ray.mining") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = sorted(r.data.tags.get("mlc_ray.mining.stage") for r in children)
    assert stages == ["base", "control", "fine_tune", "report", "score"]
    assert parent.data.tags["mlc_ray.mining.fine_tune_run_id"] == result.mlflow_run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "mining")}
    assert {"mining/mined_manifest.csv", "mining/mining_report.md", "mining/mining_report.csv"} <= artifacts


def test_mined_manifest_names_a_reason_per_sample(mined) -> None:
    from mlc_ray.data.manifest import load_manifest

    _, cfg, _ = mined
    path = Path(cfg.run_dir) / "mining" / "mined_manifest.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    reasons = [row["reason"] for row in rows]
    assert reasons and all(reasons)
    known = ("hard_positive", "hard_negative", "misclassified", "rare_combination", "replay")
    assert all(part.split(":")[0] in known for r in reasons for part in r.split(";"))
    assert len(load_manifest(str(path))) == len(reasons)  # loads back as a manifest


def test_fine_tune_is_the_job_model_and_the_report_compares_the_same_rows(mined) -> None:
    result, cfg, _ = mined
    assert result.run_name == "mine-fine-tune"
    assert result.bundle_dir == cfg.bundle_dir and (Path(cfg.bundle_dir) / "thresholds.json").is_file()
    assert (Path(cfg.run_dir) / "mining" / "base-model" / "model.pt").is_file()
    report = result.mining_report
    assert report is not None and report.has_control
    assert [r["label"] for r in report.label_rows] == result.labels
    # the report is measured on held-out rows: validation rows no stage selected or calibrated on
    from mlc_ray.data.manifest import load_manifest

    holdout = load_manifest(str(Path(cfg.run_dir) / "mining" / "holdout_manifest.csv"), labels_uri=None)
    assert holdout.images and not set(holdout.images) & set(result.val_manifest.images)
    assert sum(r["support"] for r in report.label_rows) == int(holdout.multi_hot().sum())
    assert "Held-out rows" in report.to_markdown() and "F1 random" in report.to_markdown()
    assert all(np.isfinite(r["f1_control"]) for r in report.label_rows)
    assert all("acc_control" in r for r in report.combination_rows + report.pair_rows)
    assert report.combination_rows and all(0.0 <= r["acc_base"] <= 1.0 for r in report.combination_rows)
    assert "hard-sample mining" in result.summary()
    # its speed line is the fine-tune's (the stage that made the model), and says so
    assert "\nfine-tune stage: wall time " in result.summary()
    assert np.isfinite([r["f1_fine_tuned"] for r in report.label_rows]).all()

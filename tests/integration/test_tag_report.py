"""What a run leaves behind, as a user runs it: jobs/train.py then jobs/tag.py with output captured
(not a terminal), the report, the MLflow run, the drift alert, the tag-time options.

One small demo model is trained (and registered) once for the module with ``jobs/train.py``; every
job runs as a subprocess with its output captured, the way ``ray job logs`` or cron see it.

Which Ray each job uses: the demo tag run (whose log is checked for plainness and progress lines)
starts its own embedded local Ray, as ``python jobs/tag.py`` on a laptop does. Every other job
(training, the drift run, the options runs) connects through ``RAY_ADDRESS`` to the session's local
Ray that this test process started (``ray_local``), the way a job under ``ray job submit`` connects
to its cluster (``mlc_ray.cli.init_ray``): one Ray start and stop less per job (~6-7 s each on 2
CPUs), and the training log's plainness is then checked for a connected driver (worker lines come
through the cluster's log monitor), the demo tag log's for an embedded one.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "report-tiny"
# 8 epochs: a model good enough that removing its best label's images moves only that label's rate
# out of the --drift-alert band (5 epochs, measured 2026-12-02: the vanishing-label test failed 1 run of 2)
EPOCHS = 8


def run_job(script: str, args: list[str], env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"jobs/{script}", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=timeout,
    )


def assert_plain(text: str) -> None:
    assert "\x1b[" not in text, [line for line in text.splitlines() if "\x1b[" in line][:3]
    assert "\r" not in text


@pytest.fixture(scope="module")
def ray_address(ray_local) -> str:
    """The GCS address of the session's local Ray, with its CPUs free (the jobs size their actor pools
    and Ray Train workers from the cluster's CPUs: an actor another module left behind would stall them)."""
    import time

    import ray

    deadline = time.monotonic() + 30
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total:  # an actor just killed frees its CPU later
        assert time.monotonic() < deadline, f"CPUs held on the session's Ray: {ray.available_resources()}"
        time.sleep(0.5)
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_address):
    """The trained model. The ``env`` it returns connects jobs to the test's Ray (RAY_ADDRESS); the
    same env without RAY_ADDRESS makes a job start its own embedded Ray (see the module docstring)."""
    from mlc_ray.data.demo import generate_demo

    root = tmp_path_factory.mktemp("report")
    manifest = generate_demo(str(root / "demo"), seed=0, num_train=400, num_val=200, image_size=48)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLC_RAY_MODEL_CACHE": str(root / "cache"),
    }
    env["RAY_ADDRESS"] = ray_address
    proc = run_job(
        "train.py",
        [
            "--data", manifest, "--epochs", str(EPOCHS), "--image-size", "48", "--batch-size", "32",
            "--model", "mobilenet_v1", "--width", "0.5",
            "--lr", "0.005", "--storage-path", str(root / "runs"), "--run-name", "tiny",
            "--register-as", MODEL, "--set", "warmup_epochs=0.5",
        ],
        env,
        timeout=540,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return root, manifest, env, out


def test_train_log_is_plain_with_one_line_per_epoch_and_the_summary(trained) -> None:
    _, _, _, out = trained
    assert_plain(out)
    epochs = [line for line in out.splitlines() if "epoch " in line and "ETA" in line]
    assert len(epochs) == EPOCHS, epochs
    assert f"epoch {EPOCHS}/{EPOCHS}: train loss" in out and "val mAP" in out and "macro-F1@0.5" in out
    assert "TrainingReport(" not in out  # Ray Train's dump per report stays out of the console
    assert "MLflow run id:" in out and "at cross-fitted thresholds (" in out  # the summary table
    assert "Connecting to existing Ray cluster" in out  # the test's Ray, as under `ray job submit`


def _bundle_rates(root: Path) -> dict:
    return json.loads((root / "runs" / "tiny" / "model" / "label_rates.json").read_text())


def _best_label(root: Path) -> str:
    """The label the model finds best (validation AP) among those with enough positives."""
    metrics = json.loads((root / "runs" / "tiny" / "model" / "metrics.json").read_text())["calibrated"]
    rates = _bundle_rates(root)
    cands = [
        (ap, label)
        for label, ap, pos in zip(metrics["labels"], metrics["per_label_ap"], rates["positives"], strict=True)
        if pos >= 20
    ]
    return max(cands)[1]


@pytest.fixture(scope="module")
def demo_run(trained):
    root, manifest, env, _ = trained
    out_dir = root / "tags"
    proc = run_job(
        "tag.py",
        [
            "--model", f"models:/{MODEL}@challenger", "--input", manifest, "--output", str(out_dir),
            "--progress-every", "0.5", "--shard-size", "100", "--drift-alert", "2",
        ],
        {k: v for k, v in env.items() if k != "RAY_ADDRESS"},  # its own embedded Ray: the laptop path
    )  # fmt: skip
    return proc, out_dir


def test_tag_log_is_plain_with_progress_lines_and_the_summary(demo_run) -> None:
    proc, _ = demo_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert_plain(out)
    progress = [line for line in out.splitlines() if "mlc_ray.progress: tagging:" in line]
    assert progress and "600/600 images (100%)" in progress[-1] and "images/s, ETA" in progress[-1]
    assert "errors" in progress[-1]
    for key in ("run ", "images ", "errors ", "images/s ", "drift ", "report ", "mlflow run "):
        assert any(line.startswith(key) for line in proc.stdout.splitlines()), key
    assert "no label moved" in proc.stdout  # same distribution as the validation set
    assert "Started a local Ray instance" in out  # its own embedded Ray (the module docstring)


def test_report_files_and_mlflow_run(demo_run, trained) -> None:
    import mlflow

    proc, out_dir = demo_run
    root, _, env, _ = trained
    runs = list((out_dir / "_runs").iterdir())
    assert len(runs) == 1
    report = runs[0] / "report"
    doc = json.loads((report / "report.json").read_text())
    labels = [row["label"] for row in doc["labels"]]
    assert labels == _bundle_rates(root)["labels"]
    table = pads.dataset(str(out_dir), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 600 == doc["summary"]["images"]
    # the counts gathered at commit equal what the table says
    scores = [{s["label"]: s["score"] for s in r} for r in table.column("scores").to_pylist() if r]
    for row in doc["labels"]:
        listed = sum(row["label"] in (labs or []) for labs in table.column("labels").to_pylist())
        assert row["listed"] == listed, row["label"]
        assert row["above"] == sum(s[row["label"]] >= row["threshold"] for s in scores), row["label"]
        assert sum(row["hist"]) == doc["summary"]["ok"] == len(scores)
        assert row["hist"][-1] == sum(s[row["label"]] >= 0.95 for s in scores), row["label"]
        assert (
            row["drift"]["status"] in ("ok", "moved", "too few") and row["drift"]["expected_rate"] is not None
        )
        assert (report / row["contact_sheet"]).stat().st_size > 1000
        # every sampled image is a row of this run, with the score the sheet shows
        assert set(row["samples"]["top"]) <= set(table.column("image_uri").to_pylist())
        assert len(row["samples"]["top"]) == 8
    html = (report / "index.html").read_text()
    assert all(f"contact-{label}.png" in html for label in labels) and "histograms.png" in html
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tagging")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlc_ray.run_id` = '{runs[0].name}'")
    assert len(found) == 1
    mrun = found[0]
    assert mrun.data.tags["model_name"] == MODEL and mrun.data.tags["model_version"] == "1"
    assert mrun.data.metrics["images"] == 600
    names = {a.path for a in client.list_artifacts(mrun.info.run_id, "report")}
    assert "report/index.html" in names and f"report/contact-{labels[0]}.png" in names


def test_a_label_that_vanishes_is_flagged_and_exits_3_after_every_row(demo_run, trained) -> None:
    root, manifest, env, _ = trained
    label = _best_label(root)
    with open(manifest) as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if label not in r["labels"].split("|")]
    assert 100 < len(kept) < len(rows)
    subset = root / "demo" / f"without-{label}.csv"
    with open(subset, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    out_dir = root / "tags-drift"
    proc = run_job(
        "tag.py",
        [
            "--model", f"models:/{MODEL}@challenger", "--input", str(subset), "--output", str(out_dir),
            "--drift-alert", "2", "--no-mlflow",
        ],
        env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: drift:")]
    # labels that co-occur with it may move too (removing every `red` image takes a share of the
    # squares with it): the contract is that the removed label is flagged
    assert len(error_lines) == 1 and f"{label} " in error_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "ALERT" in proc.stdout  # the summary table came first
    table = pads.dataset(str(out_dir), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(kept)  # every row committed before the exit
    (run,) = list((out_dir / "_runs").iterdir())
    doc = json.loads((run / "report" / "report.json").read_text())
    assert label in doc["drift_alerts"], doc["drift_alerts"]
    assert (run / "summary.json").exists()


def test_tag_time_options_in_rows_and_run_identity(trained, demo_run) -> None:
    root, manifest, env, _ = trained
    _, demo_out = demo_run
    rates = _bundle_rates(root)
    labels = rates["labels"]
    subset = ",".join(labels[:3])
    out_dir = root / "tags-options"
    args = [
        "--model", f"models:/{MODEL}@challenger", "--input", manifest, "--output", str(out_dir),
        "--min-score", "0.6", "--top-k", "1", "--labels", subset, "--no-mlflow", "--limit", "200",
    ]  # fmt: skip
    proc = run_job("tag.py", args, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = pads.dataset(str(out_dir), format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(table) == 200
    want = {"min_score": 0.6, "top_k": 1, "labels": labels[:3]}
    thresholds = dict(zip(labels, rates["thresholds"], strict=True))
    for row in table:
        assert json.loads(row["tag_options"]) == want
        scores = {s["label"]: s["score"] for s in row["scores"]}
        assert list(scores) == labels  # scores keep every label
        assert len(row["labels"]) <= 1 and set(row["labels"]) <= set(labels[:3])
        eligible = [x for x in labels[:3] if scores[x] >= max(thresholds[x], 0.6)]
        assert row["labels"] == ([max(eligible, key=scores.get)] if eligible else [])
    # other options, another run: not a resume of the demo run
    (run,) = list((out_dir / "_runs").iterdir())
    assert run.name not in {p.name for p in (demo_out / "_runs").iterdir()}
    # unknown labels: one error line naming them, exit 2, nothing written
    bad = run_job(
        "tag.py", [*args[:6], "--labels", f"{labels[0]},nosuch,dgo", "--output", str(root / "x")], env
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --labels: 'nosuch', 'dgo' not in")
    assert "Traceback" not in bad.stderr and not (root / "x").exists()

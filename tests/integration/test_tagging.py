"""Bulk tagging end to end on the S3 server and a local Ray: exact rows, errors as rows, crash safety.

One tiny model (MobileNet V1 x0.25 at 32 px, random weights) and one set of 300 objects (every
bad-image kind among them) are shared by the module.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlc_ray import storage
from mlc_ray.tagging.config import TagConfig
from mlc_ray.tagging.table import TAG_TABLE_SCHEMA
from tests.helpers import REPO_ROOT as REPO
from tests.helpers import TAG_LABELS as LABELS
from tests.helpers import color_images, load_job, make_bundle, read_table, train_color_bundle, upload_images

N_IMAGES = 300


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny-tagger")


@pytest.fixture(scope="module")
def images(s3_server, ray_local) -> tuple[str, dict[str, str | None]]:
    import boto3

    bucket = "tagging-inputs"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    storage.reset_clients()
    expected = upload_images(bucket, "in", N_IMAGES)
    return f"s3://{bucket}/in/", expected


@pytest.fixture(scope="module")
def first_run(bundle, images, tmp_path_factory):
    from mlc_ray.tagging.pipeline import run_tagging

    prefix, _ = images
    output = "s3://tagging-inputs/tags-main"
    cfg = TagConfig(
        model=bundle, input=prefix, output=output, shard_size=128, batch_size=16, max_error_rate=0.5
    )
    summary = run_tagging(cfg)
    return cfg, summary


def test_one_row_per_image_with_errors_as_rows(first_run, images, bundle) -> None:
    cfg, summary = first_run
    _, expected = images
    table = read_table(cfg.output)
    assert table.num_rows == N_IMAGES == summary.images
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert set(rows) == set(expected)  # exactly once each: 300 rows, 300 distinct URIs
    for uri, code in expected.items():
        row = rows[uri]
        if code is None:
            assert row["error"] is None, (uri, row["error"])
            assert row["width"] > 0 and len(row["scores"]) == len(LABELS)
        else:
            assert row["error"].split(":", 1)[0] == code, (uri, row["error"])
            assert row["labels"] == [] and row["scores"] == []
    assert summary.errors == sum(1 for c in expected.values() if c)
    assert summary.shards == 3 and summary.ok == N_IMAGES - summary.errors
    assert storage.exists(f"{cfg.output}/_runs/{summary.run_id}/_SUCCESS")
    # where the time went: Ray Data's per-operator stats of the run's (one) dataset
    stats = storage.read_text(f"{cfg.output}/_runs/{summary.run_id}/stats/attempt-1-dataset-0.txt")
    assert "read_chunks" in stats and "Predictor" in stats


def test_labels_equal_the_pyfunc_model(first_run, images, bundle) -> None:
    """The registered pyfunc model (mlc_ray/pyfunc_model.py, as MLflow loads it) on the same images:
    the table must hold its labels and scores, bad images included as errors."""
    import pandas as pd
    from mlflow.pyfunc import PythonModelContext

    from mlc_ray.pyfunc_model import ImageTaggerModel

    cfg, _ = first_run
    _, expected = images
    good = sorted(u for u, c in expected.items() if c is None and "/photos/" in u)[:60]
    bad = sorted(u for u, c in expected.items() if c is not None)[:3]
    files = {"onnx": "model.onnx", "labels": "labels.json", "preprocess": "preprocess.json"}
    files["thresholds"] = "thresholds.json"
    model = ImageTaggerModel()
    model.load_context(PythonModelContext({k: os.path.join(bundle, f) for k, f in files.items()}, None))
    predicted = model.predict(None, pd.DataFrame({"image": good + bad}))
    rows = {r["image_uri"]: r for r in read_table(cfg.output).to_pylist()}
    assert predicted["error"].iloc[: len(good)].isna().all()
    for _, p in predicted.iterrows():
        row = rows[p["image"]]
        assert row["labels"] == list(p["labels"])
        if pd.isna(p["error"]):  # pandas 3 string columns hold NaN for a missing value
            np.testing.assert_allclose(
                [s["score"] for s in row["scores"]], [s["score"] for s in p["scores"]], atol=1e-5
            )
            assert [s["label"] for s in row["scores"]] == LABELS
        else:
            assert row["error"].split(":", 1)[0] == p["error"].split(":", 1)[0]


def test_table_reads_in_duckdb_and_pandas_with_the_schema(first_run, tmp_path) -> None:
    import duckdb

    cfg, summary = first_run
    local = tmp_path / "copy"
    for page in storage.iter_pages(cfg.output, suffixes=(".parquet",)):
        for info in page:
            rel = info.uri[len(cfg.output) + 1 :]
            if not rel.startswith("_"):
                storage.download_file(info.uri, local / rel)
    files = list(local.rglob("*.parquet"))
    assert len(files) == 3 and all(f.parent.name == f"dt={summary.dt}" for f in files)
    assert pq.read_schema(files[0]).remove_metadata() == TAG_TABLE_SCHEMA
    con = duckdb.connect()
    n, n_err, dts = con.execute(
        f"select count(*), count(error), min(dt) from read_parquet('{local}/**/*.parquet', hive_partitioning=true)"
    ).fetchone()
    assert (n, n_err, str(dts)) == (N_IMAGES, summary.errors, summary.dt)
    types = dict(
        con.execute(f"describe select * from read_parquet('{files[0]}')").fetchall()[i][:2] for i in range(15)
    )
    assert (
        types["scores"].replace('"', "") == "STRUCT(label VARCHAR, score FLOAT)[]"
        and types["width"] == "INTEGER"
    )
    assert types["tagged_at"] == "TIMESTAMP WITH TIME ZONE"
    df = pq.read_table(files[0]).to_pandas()
    assert str(df["tagged_at"].dtype) == "datetime64[us, UTC]"
    assert isinstance(df["labels"].iloc[0], np.ndarray | list)


def test_rerun_same_identity_skips_committed_shards(first_run, bundle) -> None:
    from mlc_ray.tagging.pipeline import run_tagging

    cfg, summary = first_run
    again = run_tagging(cfg)
    assert again.run_id == summary.run_id and again.shards_skipped == again.shards == 3
    assert again.images_this_attempt == 0
    assert read_table(cfg.output).num_rows == N_IMAGES


def test_actor_crash_midway_every_image_exactly_once(bundle, images, tmp_path, monkeypatch) -> None:
    from mlc_ray.tagging.pipeline import run_tagging
    from tests.chaos.hooks import install_predictor_faults

    prefix, expected = images
    marker = tmp_path / "actor-died"
    install_predictor_faults(monkeypatch, exit_once_marker=marker)  # the first Predictor call exits
    output = "s3://tagging-inputs/tags-actor-crash"
    cfg = TagConfig(
        model=bundle, input=prefix, output=output, shard_size=100, batch_size=16, max_error_rate=0.5
    )
    summary = run_tagging(cfg)
    assert marker.exists()  # an actor really died mid-run
    uris = read_table(output).column("image_uri").to_pylist()
    assert len(uris) == N_IMAGES and set(uris) == set(expected)
    assert summary.images == N_IMAGES


def test_many_shards_one_dataset_the_model_loaded_once_per_actor(
    bundle, images, tmp_path, monkeypatch
) -> None:
    """A run of many shards (19 of 16 keys) loads the model once per inference actor for the whole
    run (not once per shard or group of shards), and holds every image exactly once."""
    from mlc_ray.tagging import dataset as tag_dataset
    from mlc_ray.tagging.pipeline import run_tagging
    from mlc_ray.tagging.predictor import Predictor

    loads = tmp_path / "model-loads.txt"

    class CountingPredictor(Predictor):  # defined here: Ray ships it to the actors by value
        def __init__(self, **kwargs) -> None:
            with open(loads, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            super().__init__(**kwargs)

    CountingPredictor.__name__ = "Predictor"
    monkeypatch.setattr(tag_dataset, "Predictor", CountingPredictor)
    prefix, expected = images
    output = "s3://tagging-inputs/tags-many-shards"
    cfg = TagConfig(
        model=bundle, input=prefix, output=output, shard_size=16, batch_size=16, actors="2",
        max_error_rate=0.5, report=False,
    )  # fmt: skip
    summary = run_tagging(cfg)
    assert summary.shards == -(-N_IMAGES // 16) == 19
    uris = read_table(output).column("image_uri").to_pylist()
    assert len(uris) == N_IMAGES and set(uris) == set(expected)
    pids = loads.read_text().split()
    assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids), pids  # one load per actor, 2 actors


def test_error_rate_above_ceiling_fails_the_job(bundle, images) -> None:
    from mlc_ray.cli import JobError
    from mlc_ray.tagging.pipeline import run_tagging

    prefix, _ = images
    cfg = TagConfig(
        model=bundle, input=prefix + "bad/", output="s3://tagging-inputs/tags-bad", max_error_rate=0.1
    )
    with pytest.raises(JobError, match="max-error-rate") as info:
        run_tagging(cfg)
    assert info.value.exit_code == 1
    assert read_table(cfg.output).num_rows == 10  # the rows are still written


def test_driver_killed_midway_then_rerun_exactly_once(bundle, images, tmp_path, capsys) -> None:
    """jobs/tag.py in its own process (its own Ray), SIGKILLed with that Ray after its first shard
    commits (it goes through ``tests.chaos.driver`` so each Predictor call sleeps: the run outlives
    the kill); then the same command again, which finishes the run with every image exactly once."""
    prefix, expected = images
    output = "s3://tagging-inputs/tags-driver-kill"
    job_args = [
        "--model", bundle, "--input", prefix, "--output", output,
        "--shard-size", "20", "--batch-size", "10", "--actors", "1", "--threads-per-actor", "1",
        "--max-error-rate", "0.5",
    ]  # fmt: skip
    # "local": a Ray of its own, never one found on the machine (another test's cluster)
    env = {**os.environ, "RAY_ADDRESS": "local"}
    slow = [sys.executable, "-m", "tests.chaos.driver", "--ray-address", "local"]
    slow += ["--predictor-delay-s", "0.3"]  # each Predictor call sleeps 0.3 s: the run outlives the kill
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*slow, "--", *job_args],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    committed: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                committed = [
                    i.uri
                    for p in storage.iter_pages(output, suffixes=(".parquet",))
                    for i in p
                    if "/dt=" in i.uri
                ]
            except FileNotFoundError:
                committed = []
            if committed:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
        log.close()
    assert committed, (tmp_path / "first.log").read_text()[-3000:]
    partial = read_table(output)
    assert 0 < partial.num_rows < N_IMAGES  # killed midway: some shards committed, not all

    # the rerun: the same command, here in-process on the module's Ray (a new driver; what it must
    # find is the killed run's state on S3, not anything of the dead driver's Ray)
    code = load_job("tag").main(job_args)
    assert code == 0, capsys.readouterr().err[-3000:]
    uris = read_table(output).column("image_uri").to_pylist()
    assert len(uris) == N_IMAGES and set(uris) == set(expected)


# ---- the other precisions and backends, end to end through jobs/tag.py ----------------------------


@pytest.fixture(scope="module")
def exported_bundle(tmp_path_factory) -> str:
    """A trained colour tagger exported as fp32 + int8 (it passed its gate) + ncnn."""
    from mlc_ray.export import export_bundle

    folder, _ = train_color_bundle(tmp_path_factory.mktemp("exported") / "bundle")
    val_images, val_targets = color_images(120, seed=7)
    report = export_bundle(
        folder,
        calibration_images=color_images(64, seed=1)[0],
        val_images=val_images,
        val_targets=val_targets,
        formats=("onnx", "int8", "ncnn"),
        threads=2,
    )
    assert report.ok("int8") and report.ok("ncnn"), report.format()
    return str(folder)


@pytest.fixture(scope="module")
def color_inputs(images) -> tuple[str, list[str]]:
    """24 colour JPEGs (labels = bright channels) next to the module's inputs."""

    pixels, _ = color_images(24, seed=21)
    client = storage.s3_client()
    uris = []
    for i, arr in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=95)
        client.put_object(Bucket="tagging-inputs", Key=f"colors/{i:03d}.jpg", Body=buf.getvalue())
        uris.append(f"s3://tagging-inputs/colors/{i:03d}.jpg")
    return "s3://tagging-inputs/colors/", uris


def _expected_scores(bundle: str, uris: list[str], onnx_file: str) -> np.ndarray:
    """The evaluation path on the same bytes: decode, preprocess, onnxruntime."""
    from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval
    from mlc_ray.export.onnx import onnx_probabilities

    pre = PreprocessConfig.from_json(Path(bundle, "preprocess.json").read_text())
    pixels = np.stack([preprocess_eval(decode_image(storage.read_bytes(u)).array, pre) for u in uris])
    return onnx_probabilities(Path(bundle, onnx_file), pixels)


@pytest.mark.parametrize(
    ("flags", "backend", "precision", "onnx_file", "atol"),
    [
        (["--precision", "int8"], "onnxruntime", "int8", "model.int8.onnx", 1e-5),
        (["--backend", "ncnn"], "ncnn", "fp32", "model.onnx", 1e-3),  # ncnn's parity limit vs fp32
    ],
    ids=["int8", "ncnn"],
)
def test_tag_job_with_int8_and_ncnn(
    exported_bundle, color_inputs, flags, backend, precision, onnx_file, atol, capsys
) -> None:
    prefix, uris = color_inputs
    output = f"s3://tagging-inputs/tags-{backend}-{precision}"
    code = load_job("tag").main(["--model", exported_bundle, "--input", prefix, "--output", output, *flags])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = {r["image_uri"]: r for r in read_table(output).to_pylist()}
    assert sorted(rows) == sorted(uris)  # one row per image
    expected = _expected_scores(exported_bundle, uris, onnx_file)
    labels = json.loads(Path(exported_bundle, "labels.json").read_text())
    thresholds = json.loads(Path(exported_bundle, "thresholds.json").read_text())["thresholds"]
    for uri, want in zip(uris, expected, strict=True):
        row = rows[uri]
        assert row["error"] is None
        assert row["backend"] == backend and row["precision"] == precision
        assert row["model_version"] is not None and row["thresholds_sha256"] and row["run_id"]
        got = np.array([s["score"] for s in row["scores"]])
        assert [s["label"] for s in row["scores"]] == labels
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
        clear = [abs(p - t) > atol for p, t in zip(want, thresholds, strict=True)]
        want_labels = [lab for lab, p, t in zip(labels, want, thresholds, strict=True) if p >= t]
        got_set = set(row["labels"])
        assert all(
            (lab in got_set) == (lab in want_labels) for lab, c in zip(labels, clear, strict=True) if c
        )

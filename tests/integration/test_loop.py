"""The loop end to end, stage by stage, with the jobs' own main(): train v1 -> tag -> select ->
"label" the queue from the demo's truth -> train v2 on train + queue -> promote with --shadow ->
tag with v2. Each stage's contract is checked (rows, manifests, aliases, audit tags), not accuracy:
the model is the smallest that trains (MobileNet V1 x0.25 at 32 px, one epoch, 64 images).

The two ``jobs/train.py`` runs train in Ray Train's local mode (``tests.helpers.ray_train_in_process``:
the training loop in this process, no worker actors; ~25 s of worker start-up saved per run on 2
CPUs): the stages' contracts are what this module tests, and v2 is a run of its own, not a resume.
Tagging, promotion and the shadow comparison run on the local Ray as in the jobs. Real-worker
training is tested in test_train.py, test_train_defaults.py (mobilenet_v1 and the resume test) and
the chaos checkpoint test.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, LocalTrainRuns, ray_train_in_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NAME = "loop-tagger"
TINY = ["--model", "mobilenet_v1", "--width", "0.25", "--image-size", "32", "--epochs", "1",
        "--batch-size", "16", "--set", "warmup_epochs=0.5"]  # fmt: skip


def job(name: str, argv: list[str], capsys) -> tuple[int, str]:
    spec = importlib.util.spec_from_file_location(f"loop_{name}", REPO_ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def table_rows(root: Path) -> list[dict]:
    import pyarrow.dataset as pads

    return pads.dataset(str(root), format="parquet", partitioning="hive").to_table().to_pylist()


@pytest.fixture
def local_train() -> Iterator[LocalTrainRuns]:
    with ray_train_in_process() as local:
        yield local


def test_train_tag_select_label_retrain_promote_tag(
    tmp_path: Path, mlflow_sqlite, ray_local, monkeypatch, capsys, local_train: LocalTrainRuns
):
    import mlflow
    from mlflow import MlflowClient

    from mlc_ray.data.demo import generate_demo
    from mlc_ray.data.manifest import load_manifest

    monkeypatch.setenv("MLC_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    data = Path(generate_demo(str(tmp_path / "demo"), seed=4, num_train=64, num_val=24, image_size=32))
    pool = Path(generate_demo(str(tmp_path / "pool"), seed=5, num_train=40, num_val=1, image_size=32))
    truth = {str((pool.parent / r["image"]).resolve()): r["labels"] for r in read_csv(pool)}
    client = MlflowClient()

    # [1] train v1, register it, promote it (first promotion)
    runs = str(tmp_path / "runs")
    code, out = job("train", ["--data", str(data), *TINY, "--storage-path", runs, "--run-name", "v1",
                              "--register-as", NAME], capsys)  # fmt: skip
    assert code == 0, out[-3000:]
    code, out = job("promote", ["--name", NAME], capsys)
    assert code == 0 and aliases(client)["champion"] == "1", out

    # [2] tag the unlabelled pool with the champion: one row per image
    tags = tmp_path / "tags"
    code, out = job("tag", ["--model", f"models:/{NAME}@champion", "--input", str(pool.parent / "images"),
                            "--output", str(tags), "--no-mlflow"], capsys)  # fmt: skip
    assert code == 0, out[-3000:]
    rows = table_rows(tags)
    assert len(rows) == 41 and {r["model_version"] for r in rows} == {"1"}

    # [3] select a queue of 10: a manifest, one row per image, labels pre-filled from the prediction
    queue = tmp_path / "queue" / "queue.csv"
    code, out = job("select_queue", ["--table", str(tags), "--budget", "10", "--out", str(queue)], capsys)
    assert code == 0, out
    picked = read_csv(queue)
    assert len(picked) == 10 == len({r["image"] for r in picked}) == len({r["source_etag"] for r in picked})
    predicted = {r["image_uri"]: "|".join(r["labels"]) for r in rows}
    assert all(r["labels"] == predicted[r["image"]] for r in picked)
    assert {r["reason"] for r in picked} <= {"uncertainty", "rare_combination"}
    assert len(load_manifest(str(queue))) == 10

    # [4] "label" the queue from the truth; train v2 on the training rows + the labelled queue
    train_rows = read_csv(data)
    combined = tmp_path / "train-plus-queue" / "manifest.csv"
    combined.parent.mkdir()
    with open(combined, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "labels", "split"])
        w.writeheader()
        w.writerows({**r, "image": str((data.parent / r["image"]).resolve())} for r in train_rows)
        w.writerows({"image": r["image"], "labels": truth[r["image"]], "split": "train"} for r in picked)
    (combined.parent / "labels.txt").write_text((data.parent / "labels.txt").read_text())
    code, out = job("train", ["--data", str(combined), *TINY, "--storage-path", runs, "--run-name", "v2",
                              "--register-as", NAME], capsys)  # fmt: skip
    assert code == 0, out[-3000:]
    assert len(local_train.starts) == 2, "v1 and v2: one TorchTrainer each"
    v2 = client.get_model_version(NAME, "2")
    assert aliases(client)["challenger"] == "2"
    train_images = Path(
        mlflow.artifacts.download_artifacts(v2.tags["train_images_uri"], dst_path=str(tmp_path / "ev"))
    )
    trained_on = {r["image"] for r in read_csv(train_images)}
    assert {r["image"] for r in picked} <= trained_on  # the queue is in v2's training set

    # [5] promote v2 with the shadow comparison on the pool (report only: the contract, not a gate)
    code, out = job("promote", ["--name", NAME, "--min-delta", "-1", "--max-label-drop", "1",
                                "--shadow", str(pool.parent / "images"), "--shadow-sample", "20"], capsys)  # fmt: skip
    assert code == 0, out[-3000:]
    assert aliases(client)["champion"] == "2"
    tags2 = client.get_model_version(NAME, "2").tags
    assert tags2["promotion.shadow.verdict"] == "report only" and tags2["promotion.shadow.images"] == "20"
    labels = (data.parent / "labels.txt").read_text().split()
    assert {row["label"] for row in json.loads(tags2["promotion.shadow.labels"])} == set(labels)

    # [6] tag with v2 (the new champion) into the same table: a second run, one row per image
    code, out = job("tag", ["--model", f"models:/{NAME}@champion", "--input", str(pool.parent / "images"),
                            "--output", str(tags), "--no-mlflow"], capsys)  # fmt: skip
    assert code == 0, out[-3000:]
    rows = table_rows(tags)
    assert sorted(r["model_version"] for r in rows) == ["1"] * 41 + ["2"] * 41
    # and the two versions' rows are what the next queue's disagreement share compares
    code, out = job("select_queue", ["--table", str(tags), "--version", "2", "--compare-version", "1",
                               "--budget", "5", "--out", str(tmp_path / "queue2.csv")], capsys)  # fmt: skip
    assert code == 0 and "41 tagged by both sources" in out, out

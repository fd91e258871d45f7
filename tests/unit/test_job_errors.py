"""Every bad value a user can give a job is one ``error: ...`` line, exit 2, no traceback, nothing written.

Each case runs the job's ``main(argv)`` in-process, in an empty working directory, and checks the
exit code, that stderr holds exactly one ``error:`` line naming the flag / key and the way out, no
``Traceback``, that the working directory and the output stay empty, and that no Ray was started.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO_ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from mlc_ray.data.demo import generate_demo
    from tests.helpers import make_bundle

    root = tmp_path_factory.mktemp("inputs")
    data = generate_demo(str(root / "demo"), seed=3, num_train=8, num_val=4, image_size=32)
    (root / "empty.csv").write_text("image,labels\n")
    (root / "neg.yaml").write_text("epochs: -1\n")
    (root / "typo.yaml").write_text("epoch: 3\n")
    (root / "tag_typo.yaml").write_text("batch_szie: 3\n")
    (root / "empty_dir").mkdir()
    (root / "a_file").write_text("not a folder\n")
    (root / "folder.parquet").mkdir()
    return {
        "D": data,
        "EMPTY": str(root / "empty.csv"),
        "NEG": str(root / "neg.yaml"),
        "TYPO": str(root / "typo.yaml"),
        "TAGTYPO": str(root / "tag_typo.yaml"),
        "EMPTYDIR": str(root / "empty_dir"),
        "FILE": str(root / "a_file"),
        "DIRPQ": str(root / "folder.parquet"),
        "B": make_bundle(root / "bundle"),
        "ROOT": str(root),
    }


# (case id, job, argv, substrings the one error line must hold); {X} are filled from `inputs`,
# {W} is the (empty) working directory, {O} an output under it.
CASES = [
    # -- train: flags
    ("train-unknown-model", "train", ["--data", "{D}", "--model", "nope"], ["model:", "unknown model 'nope'", "mobilenet_v3_large"]),
    ("train-close-model", "train", ["--data", "{D}", "--model", "resnet5"], ["did you mean 'resnet50'"]),
    ("train-width-no-multiplier", "train", ["--data", "{D}", "--model", "mobilenet_v3_small", "--width", "0.5"], ["width:", "no width multiplier", "mobilenet_v2"]),
    ("train-width-via-set", "train", ["--data", "{D}", "--model", "resnext50_32x4d", "--set", "width=0.5"], ["width:", "resnext50_32x4d"]),
    ("train-zero-epochs", "train", ["--data", "{D}", "--epochs", "0"], ["epochs must be > 0"]),
    ("train-negative-epochs", "train", ["--data", "{D}", "--epochs", "-3"], ["epochs must be > 0", "-3"]),
    ("train-zero-batch", "train", ["--data", "{D}", "--batch-size", "0"], ["batch_size must be > 0"]),
    ("train-negative-batch", "train", ["--data", "{D}", "--batch-size", "-8"], ["batch_size must be > 0"]),
    ("train-image-too-small", "train", ["--data", "{D}", "--model", "resnet50", "--image-size", "16"], ["image_size 16 is too small for resnet50", ">= 32"]),
    ("train-bad-calibration", "train", ["--data", "{D}", "--calibration", "best"], ["calibration", "'best'", "f1_max"]),
    ("train-bad-calibration-arg", "train", ["--data", "{D}", "--calibration", "precision_at:2"], ["precision_at:2", "(0, 1]"]),
    ("train-bad-tta", "train", ["--data", "{D}", "--tta", "5crop"], ["tta must be one of", "10crop"]),
    ("train-flag-not-int", "train", ["--data", "{D}", "--epochs", "abc"], ["--epochs", "invalid int value", "--help"]),
    ("train-unknown-flag", "train", ["--data", "{D}", "--epoch", "3"], ["--epoch", "--help"]),
    # -- train: --set and YAML keys
    ("set-unknown-key", "train", ["--data", "{D}", "--set", "epochz=3"], ["unknown config key 'epochz'", "did you mean 'epochs'"]),
    ("set-unknown-section-key", "train", ["--data", "{D}", "--set", "mining.topk=3"], ["mining.topk"]),
    ("set-bad-number", "train", ["--data", "{D}", "--set", "lr=abc"], ["lr: expected a number", "'abc'"]),
    ("set-bad-yaml", "train", ["--data", "{D}", "--set", "lr=["], ["--set lr=[", "not valid YAML"]),
    ("set-no-equals", "train", ["--data", "{D}", "--set", "noequals"], ["--set expects KEY=VALUE", "noequals"]),
    ("set-out-of-range", "train", ["--data", "{D}", "--set", "augment.hflip=2"], ["augment.hflip", "[0, 1]"]),
    ("set-value-as-section", "train", ["--data", "{D}", "--set", "epochs.x=1"], ["epochs"]),
    ("set-empty-key-part", "train", ["--data", "{D}", "--set", "mining.=1"], ["mining.", "SECTION.KEY"]),
    ("yaml-bad-value", "train", ["--data", "{D}", "--config", "{NEG}"], ["epochs must be > 0", "-1"]),
    ("yaml-unknown-key", "train", ["--data", "{D}", "--config", "{TYPO}"], ["unknown config key 'epoch'"]),
    ("yaml-missing", "train", ["--config", "{W}/missing.yaml"], ["--config", "missing.yaml does not exist"]),
    # -- train: URIs and data
    ("train-data-missing", "train", ["--data", "{W}/missing.csv"], ["missing.csv", "does not exist"]),
    ("train-storage-misspelt-scheme", "train", ["--data", "{D}", "--storage-path", "s3:/bucket/runs"], ["storage_path:", "'s3:/bucket/runs' is neither a local path nor an s3://bucket/key URI"]),
    ("train-data-other-scheme", "train", ["--data", "gs://bucket/manifest.csv"], ["'gs://bucket/manifest.csv' is neither a local path"]),
    ("train-val-data-missing", "train", ["--data", "{D}", "--val-data", "{W}/val.csv"], ["val.csv", "does not exist"]),
    ("train-no-images", "train", ["--data", "{EMPTY}"], ["empty.csv", "zero rows"]),
    ("train-pretrained-missing", "train", ["--data", "{D}", "--pretrained", "{W}/weights.pt"], ["pretrained:", "weights.pt does not exist"]),
    ("train-pretrained-not-weights", "train", ["--data", "{D}", "--pretrained", "{EMPTY}"], ["pretrained:", "not a loadable state dict"]),
    ("train-storage-is-a-file", "train", ["--data", "{D}", "--storage-path", "{FILE}"], ["--storage-path", "a_file: is a file"]),
    ("train-storage-under-a-file", "train", ["--data", "{D}", "--storage-path", "{FILE}/runs"], ["--storage-path", "cannot be created", "a_file is a file"]),
    ("train-output-under-a-file", "train", ["--data", "{D}", "--output", "{FILE}/model"], ["--output", "cannot be created", "a_file is a file"]),
    # -- tag
    ("tag-output-is-a-file", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{FILE}"], ["--output", "a_file: is a file"]),
    ("tag-output-under-a-file", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{FILE}/tags"], ["--output", "cannot be created", "a_file is a file"]),
    ("tag-input-is-a-file", "tag", ["--model", "{B}", "--input", "{FILE}", "--output", "{O}"], ["--input", "a_file: a file, not a folder of images or a manifest"]),
    ("tag-bundle-missing", "tag", ["--model", "{W}/no-bundle", "--input", "{D}", "--output", "{O}"], ["--model", "no-bundle does not exist"]),
    ("tag-input-missing", "tag", ["--model", "{B}", "--input", "{W}/photos/", "--output", "{O}"], ["photos", "does not exist"]),
    ("tag-output-misspelt-scheme", "tag", ["--model", "{B}", "--input", "{D}", "--output", "s3:/bucket/tags"], ["'s3:/bucket/tags' is neither a local path nor an s3://bucket/key URI"]),
    ("tag-input-upper-case-scheme", "tag", ["--model", "{B}", "--input", "S3://bucket/photos/", "--output", "{O}"], ["'S3://bucket/photos/' is neither a local path"]),
    ("tag-input-empty-dir", "tag", ["--model", "{B}", "--input", "{EMPTYDIR}", "--output", "{O}"], ["no images", "empty_dir"]),
    ("tag-manifest-no-images", "tag", ["--model", "{B}", "--input", "{EMPTY}", "--output", "{O}"], ["empty.csv", "zero rows"]),
    ("tag-zero-batch", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{O}", "--batch-size", "0"], ["batch_size", ">= 1"]),
    ("tag-negative-shard", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{O}", "--shard-size", "-1"], ["shard_size", ">= 1"]),
    ("tag-bad-actors", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{O}", "--actors", "4:2"], ["actors", "MIN <= MAX"]),
    ("tag-bad-error-rate", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{O}", "--max-error-rate", "2"], ["max_error_rate", "[0, 1]"]),
    ("tag-bad-backend", "tag", ["--model", "{B}", "--backend", "tensorrt"], ["--backend", "invalid choice", "onnxruntime"]),
    ("tag-ncnn-int8", "tag", ["--model", "{B}", "--backend", "ncnn", "--precision", "int8"], ["ncnn", "int8", "--backend onnxruntime"]),
    ("tag-no-int8-file", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{O}", "--precision", "int8"], ["int8"]),
    ("tag-yaml-unknown-key", "tag", ["--model", "{B}", "--config", "{TAGTYPO}"], ["unknown config key 'batch_szie'", "batch_size"]),
    ("tag-zero-read-deadline", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{O}", "--read-deadline-s", "0"], ["read_deadline_s", "> 0"]),
    ("tag-bad-run-id", "tag", ["--model", "{B}", "--input", "{D}", "--output", "{O}", "--run-id", "a/b"], ["run_id", "'a/b'"]),
    # -- promote
    ("promote-bad-metric", "promote", ["--name", "m", "--metric", "f1"], ["--metric", "'f1'", "macro_f1"]),
    ("promote-bad-label-drop", "promote", ["--name", "m", "--max-label-drop", "5"], ["--max-label-drop", "[0, 1]"]),
    ("promote-bad-split", "promote", ["--name", "m", "--split", "holdout"], ["--split", "invalid choice"]),
    ("promote-unknown-model", "promote", ["--name", "no-such-model"], ["no-such-model"]),
    ("promote-no-name", "promote", [], ["--name"]),
    # -- select_queue
    ("select-table-is-a-file", "select_queue", ["--table", "{FILE}", "--out", "{O}/queue.csv"], ["a_file is not a tag table", "--output folder"]),
    # -- scan
    ("scan-report-under-a-file", "scan", ["--data", "{D}", "--report", "{FILE}/report.parquet"], ["--report", "report.parquet: cannot be created", "a_file is a file"]),
    ("scan-report-is-a-folder", "scan", ["--data", "{D}", "--report", "{DIRPQ}"], ["--report", "is a folder; give a file name"]),
    ("scan-clean-under-a-file", "scan", ["--data", "{D}", "--write-clean", "{FILE}/clean.csv"], ["--write-clean", "clean.csv: cannot be created", "a_file is a file"]),
    ("scan-data-missing", "scan", ["--data", "{W}/missing.csv"], ["missing.csv", "does not exist"]),
    ("scan-no-images", "scan", ["--data", "{EMPTY}"], ["empty.csv", "zero rows"]),
    ("scan-empty-dir", "scan", ["--data", "{EMPTYDIR}"], ["no images", "empty_dir"]),
    ("scan-zero-batch", "scan", ["--data", "{D}", "--batch-size", "0"], ["batch_size", ">= 1"]),
    ("scan-bad-report", "scan", ["--data", "{D}", "--report", "{O}/report.txt"], ["report", ".parquet"]),
    ("scan-bad-error-rate", "scan", ["--data", "{D}", "--max-error-rate", "-1"], ["max_error_rate", "[0, 1]"]),
]  # fmt: skip


@pytest.mark.parametrize("case,job,argv,names", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_error_line_exit_2_nothing_written(
    case: str, job: str, argv: list[str], names: list[str], inputs: dict, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    import ray

    if ray.is_initialized():  # left by an earlier test: only a Ray this job starts counts below
        ray.shutdown()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # MLflow and the model cache live outside the working directory (promote looks a model up)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLC_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    fill = {**inputs, "W": str(work), "O": str(work / "out")}
    argv = [a.format(**fill) for a in argv]
    capsys.readouterr()
    try:
        code = _job(job).main(argv)
    except SystemExit as exc:  # argparse: a flag it cannot parse
        code = exc.code
    finally:
        started = ray.is_initialized()
        if started:  # a regression that trains: stop it here, not in every later case
            ray.shutdown()
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2, captured.err[-3000:]
    assert len(errors) == 1, captured.err[-3000:]
    for name in names:
        assert name.format(**fill) in errors[0], errors[0]
    assert "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in work.rglob("*")) == [], "the job wrote into the working directory"
    assert not started, "a bad value must fail before Ray starts"

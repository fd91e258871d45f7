"""TrainConfig: defaults, validation, YAML + CLI precedence; the pure helpers of the training loop."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from mlc_ray.config import ConfigError, load_config
from mlc_ray.models import arch_defaults, list_models
from mlc_ray.train.config import DEMO_PRESET, AugmentConfig, TrainConfig, load_train_config
from mlc_ray.train.loop import lr_factor
from mlc_ray.train.mining import MiningConfig
from mlc_ray.train.tracking import flatten_params, per_label_table, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


def _train_job():
    spec = importlib.util.spec_from_file_location("jobs_train", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(argv: list[str]) -> TrainConfig:
    job = _train_job()
    args = job.build_parser().parse_args(argv)
    return load_train_config(args.config, job.overrides_from_args(args))


def test_defaults_are_for_photos_and_come_from_the_arch() -> None:
    cfg = TrainConfig()
    assert cfg.data is None and cfg.model == "mobilenet_v3_large" and cfg.num_workers == 1
    assert cfg.image_size == 224 and cfg.width == 1.0 and cfg.normalization == "imagenet"
    assert cfg.augment == AugmentConfig() and cfg.augment.hflip == 0.5
    assert cfg.run_name.startswith("mobilenet_v3_large-")
    assert cfg.bundle_dir == f"{cfg.storage_path}/{cfg.run_name}/model"
    assert cfg.per_worker_batch_size == cfg.batch_size
    assert isinstance(cfg.mining, MiningConfig) and not cfg.mining.enabled
    for name in list_models():  # every arch is a valid config with no other setting
        arch = arch_defaults(name)
        cfg = TrainConfig(data="m.csv", model=name)
        assert (cfg.width, cfg.image_size, cfg.dropout) == (arch.width, arch.input_size, arch.dropout)
        pre = cfg.preprocess_config()
        assert (pre.image_size, pre.mean, pre.std) == (arch.input_size, arch.mean, arch.std)
    # a value the user gives wins over the arch's
    assert TrainConfig(data="m.csv", model="mobilenet_v2", width=0.75, image_size=160).width == 0.75


def test_small_inputs_default_to_shift_only_augmentation(tmp_path) -> None:
    from mlc_ray.train.config import SMALL_IMAGE_MAX, small_image_augment

    small = small_image_augment()
    assert small.crop_scale == (1.0, 1.0) and small.degrees == 0 and small.brightness == 0
    assert small.translate > 0 and small.hflip == AugmentConfig().hflip
    assert TrainConfig(data="m.csv", image_size=SMALL_IMAGE_MAX).augment == small
    assert TrainConfig(data="m.csv", image_size=SMALL_IMAGE_MAX + 1).augment == AugmentConfig()
    explicit = AugmentConfig(degrees=5.0)
    assert TrainConfig(data="m.csv", image_size=32, augment=explicit).augment == explicit
    # a partial section (flag or YAML) starts from the size's default, not from the photo recipe
    cfg = _resolve(["--data", "m.csv", "--image-size", "64", "--set", "augment.hflip=0"])
    assert cfg.augment == AugmentConfig(**{**small.__dict__, "hflip": 0.0})
    cfg = _resolve(["--data", "m.csv", "--set", "augment.hflip=0"])  # 224 px: the photo recipe
    assert cfg.augment == AugmentConfig(hflip=0.0)
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("data: m.csv\nimage_size: 48\naugment:\n  degrees: 3\n")
    assert _resolve(["--config", str(yaml_file)]).augment == AugmentConfig(
        **{**small.__dict__, "degrees": 3.0}
    )


def test_no_data_anywhere_is_the_demo_preset_which_configs_demo_yaml_writes_out() -> None:
    from mlc_ray.config import config_to_dict

    def plain(cfg: TrainConfig) -> dict:
        out = config_to_dict(cfg)
        out.pop("run_name")
        return out

    demo = _resolve([])
    assert plain(demo) == plain(load_config(TrainConfig, REPO / "configs" / "demo.yaml"))
    assert plain(demo) == plain(load_config(TrainConfig, overrides=DEMO_PRESET))
    assert (demo.model, demo.width, demo.image_size, demo.epochs) == ("mobilenet_v1", 0.5, 96, 15)
    assert _resolve(["--epochs", "3"]).epochs == 3 and _resolve(["--epochs", "3"]).width == 0.5
    # --data: the preset is not applied, the arch's defaults are
    real = _resolve(["--data", "photos.csv", "--model", "resnext50_32x4d"])
    assert (real.width, real.image_size, real.epochs) == (1.0, 224, TrainConfig().epochs)


def test_unknown_key_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*did you mean 'epochs'"):
        load_config(TrainConfig, path)
    path.write_text("mining:\n  topk: 3\n")
    with pytest.raises(ConfigError, match=r"mining\.topk"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 10, "num_workers": 4}, "divide evenly"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"loss": "focal"}, "loss must be one of"),
        ({"calibration": "best"}, "best"),
        ({"run_name": "a/b"}, "run_name"),
        ({"warmup_epochs": 6, "epochs": 5}, "warmup_epochs"),
        ({"max_error_rate": 1.5}, "max_error_rate"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_cli_overrides_yaml_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nbatch_size: 16\nmining:\n  top_k: 9\n")
    cfg = _resolve(["--config", str(path), "--epochs", "3", "--use-gpu", "--set", "mining.top_k=11"])
    assert cfg.epochs == 3  # CLI beats YAML
    assert cfg.lr == 0.01 and cfg.batch_size == 16  # YAML beats defaults
    assert cfg.use_gpu is True and cfg.mining.top_k == 11
    assert cfg.image_size == DEMO_PRESET["image_size"]  # untouched: no --data, the demo preset
    cfg = _resolve(["--mine", "--run-name", "r1", "--storage-path", "s3://b/runs"])
    assert cfg.mining.enabled and cfg.run_dir == "s3://b/runs/r1" and cfg.bundle_dir == "s3://b/runs/r1/model"


def test_cli_unknown_set_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'epocs'"):
        _resolve(["--set", "epocs=2"])


def test_job_main_turns_a_config_error_into_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _train_job().main(["--set", "optimizer=adam"]) == 2
    assert "optimizer must be one of" in capsys.readouterr().err


def test_warmup_cosine_schedule() -> None:
    total, warm = 100, 10
    f = [lr_factor(s, total_steps=total, warmup_steps=warm) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10], strict=False))  # rising warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # falling cosine
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10_000, total_steps=total, warmup_steps=warm) == pytest.approx(0.0)


def test_tracking_helpers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert flatten_params({"a": 1, "m": {"k": [1, 2]}}) == {"a": "1", "m.k": "[1, 2]"}
    m = {
        "per_label_support": np.array([3, 0]),
        "per_label_ap": np.array([0.5, np.nan]),
        "per_label_precision": np.array([1.0, 0.0]),
        "per_label_recall": np.array([0.5, 0.0]),
        "per_label_f1": np.array([2 / 3, 0.0]),
    }
    csv, md = per_label_table(m, m, [0.4, 0.5], ["cat", "a,b"])
    lines = csv.splitlines()
    assert lines[1].startswith("cat,3,0.5000,0.4000") and lines[2].startswith('"a,b",0,,0.5000')
    assert md.count("\n") == 4 and "| cat | 3 |" in md


def test_asl_settings_are_config_keys_and_validated():
    cfg = load_config(
        TrainConfig, None, {"loss": "asl", "asl_gamma_neg": 2, "asl_gamma_pos": 1, "asl_clip": 0.1}
    )
    assert (cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip) == (2, 1, 0.1)
    with pytest.raises(ValueError, match="asl_clip must be in"):
        TrainConfig(asl_clip=1.0)
    with pytest.raises(ValueError, match="asl_gamma_neg and asl_gamma_pos must be >= 0"):
        TrainConfig(asl_gamma_neg=-1)


def test_the_job_log_heads_the_label_table_as_the_training_rows(tmp_path) -> None:
    from mlc_ray.train.data import load_train_val
    from mlc_ray.train.runner import describe_train_data

    manifest = tmp_path / "manifest.csv"
    rows = ["image,labels,split"] + [
        f"images/{i}.jpg,{'cat|dog' if i % 2 else 'cat'},train" for i in range(4)
    ]
    manifest.write_text("\n".join([*rows, "images/8.jpg,dog,val", "images/9.jpg,cat,val"]) + "\n")
    lines = describe_train_data(load_train_val(str(manifest))).splitlines()
    assert lines[0] == f"training data {manifest}: 4 train / 2 val images"
    # the statistics are the training rows' and say so (a bare "manifest M: 4 images" read as if M
    # had no validation rows)
    assert lines[1].startswith(f"manifest {manifest} (training rows): 4 images, 2 labels"), lines[1]
    assert "splits: train=4" in lines


def test_the_run_summary_prints_its_starts_as_the_logs_epochs() -> None:
    from mlc_ray.train.runner import starts_text

    assert starts_text([0], 12) == "started at epoch 1"
    # epoch lines are 1-based ("epoch 4/12"): a run resumed after 3 epochs resumed at epoch 4, not 3
    assert starts_text([0, 3], 9) == "started at epoch 1, resumed at epoch 4"
    assert (
        starts_text([0, 3, 12], 0)
        == "started at epoch 1, resumed at epoch 4, resumed with every epoch already trained"
    )


def test_the_summary_warns_when_labels_scored_every_image_alike() -> None:
    from mlc_ray.train.runner import collapsed_labels_note

    reasons = {"cat": "constant scores", "dog": "constant scores: all within 6e-08", "car": "no positives"}
    (line,) = collapsed_labels_note(reasons, 5)
    assert line.startswith("WARNING: 2 of 5 labels score every validation image alike (cat, dog)")
    assert "car" not in line  # a label without positives is the data's problem, not the model's
    assert collapsed_labels_note({"car": "no positives"}, 5) == []

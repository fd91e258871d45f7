"""The training job from a user's command line: every registered architecture trains with its own
defaults, and a run started again with other settings is refused (not silently resumed).

One local Ray for the module; ``jobs/train.py``'s ``main()`` runs in-process (it finds Ray started).
The resume test's architecture (``mobilenet_v1``) trains on Ray Train's worker actors, the way every
run does; the other architectures run the same ``main()`` with Ray Train's local mode
(``tests.helpers.ray_train_in_process``: the worker loop in this process,
``ScalingConfig(num_workers=0)``): everything that depends on the architecture (config resolution,
model build, the loop's training and validation, the bundle) runs as in a real job, and the ~6 Ray
Train actor processes a run starts (~30 CPU-s on 2 CPUs) do not. The resume test's refused run fails
before training; its "more epochs" run only checks that the job accepts it, in local mode; its
``--resume-changed`` run stays on real workers and must resume the first run's checkpoint: local mode
neither writes checkpoints under ``storage_path/run_name`` nor resumes from them
(``ray.train.get_checkpoint()`` starts as None), so a resumed run there would train afresh.
Real-worker training is also tested in test_train.py and the chaos checkpoint test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mlc_ray.data.demo import generate_demo
from mlc_ray.models import arch_defaults, list_models
from tests.helpers import REPO_ROOT, ray_train_in_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


RAY_TRAIN_ARCH = "mobilenet_v1"  # the one per-model run on Ray Train's workers; the resume test reuses it


def _train_main():
    spec = importlib.util.spec_from_file_location("train_job", REPO_ROOT / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("defaults")
    data = generate_demo(str(root / "demo"), seed=7, num_train=16, num_val=8, image_size=32)
    return {"data": data, "runs": str(root / "runs"), "db": f"sqlite:///{root / 'mlflow.db'}"}


def _bundle(runs: str, run_name: str) -> tuple[dict, dict]:
    model = json.loads(Path(runs, run_name, "model", "model.json").read_text())
    pre = json.loads(Path(runs, run_name, "model", "preprocess.json").read_text())
    return model, pre


class DefaultRuns:
    """``--data M --model NAME`` trained once per name (run ``defaults-NAME``), its exit code and stderr
    kept: the per-model test reads it, and the resume test starts from the mobilenet_v1 one instead
    of training a run of its own (a Ray Train run costs ~30 s on 2 CPUs)."""

    def __init__(self, tiny: dict[str, str]) -> None:
        self.tiny = tiny
        self.done: dict[str, tuple[int, str]] = {}

    def argv(self, name: str) -> list[str]:
        return ["--data", self.tiny["data"], "--model", name, "--epochs", "1", "--image-size", "32",
                "--storage-path", self.tiny["runs"], "--run-name", f"defaults-{name}"]  # fmt: skip

    def train(self, name: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
        if name not in self.done:
            capsys.readouterr()
            if name == RAY_TRAIN_ARCH:
                code = _train_main()(self.argv(name))
            else:
                with ray_train_in_process() as local:
                    code = _train_main()(self.argv(name))
                assert local.starts, "the job did not start a TorchTrainer"
            self.done[name] = (code, capsys.readouterr().err)
        return self.done[name]


@pytest.fixture(scope="module")
def default_runs(tiny: dict[str, str]) -> DefaultRuns:
    return DefaultRuns(tiny)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_trains_with_only_data_and_model(
    name: str, tiny: dict, default_runs: DefaultRuns, ray_local: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """--data M --model NAME and nothing about the arch: width, normalisation and the rest come from
    the registry entry (--image-size 32 and --epochs 1 only keep the test cheap)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny["db"])
    code, err = default_runs.train(name, capsys)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    model, pre = _bundle(tiny["runs"], f"defaults-{name}")
    arch = arch_defaults(name)
    assert model["arch"] == name and model["width"] == arch.width and model["dropout"] == arch.dropout
    assert pre["image_size"] == 32 and pre["normalization"] == arch.normalization
    assert tuple(pre["mean"]) == arch.mean and tuple(pre["std"]) == arch.std


def test_resume_with_changed_settings_is_refused_unless_asked(
    tiny: dict, default_runs: DefaultRuns, ray_local: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny["db"])
    main = _train_main()
    code, err = default_runs.train(RAY_TRAIN_ARCH, capsys)  # the first run: 1 epoch at 32 px
    assert code == 0, err[-3000:]
    run = Path(tiny["runs"], "defaults-mobilenet_v1")
    first = Path(run, "model", "model.pt").stat().st_mtime_ns
    base = [a for a in default_runs.argv("mobilenet_v1") if a not in ("--epochs", "1", "--image-size", "32")]
    capsys.readouterr()

    # another image size and loss under the same --run-name: one error line naming both, exit 2
    code = main([*base, "--epochs", "1", "--image-size", "48", "--loss", "asl"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert "image_size 32 -> 48" in errors[0] and "loss bce -> asl" in errors[0]
    assert "--run-name" in errors[0] and "--resume-changed" in errors[0]
    assert "Traceback" not in err
    assert Path(run, "model", "model.pt").stat().st_mtime_ns == first  # nothing rewritten

    # resuming a finished run for more epochs is not a change of the run: the job accepts it (the
    # fingerprint check is the driver's, before training). It trains in Ray Train's local mode, which
    # cannot resume (it starts from no checkpoint); the --resume-changed run below is the real resume.
    with ray_train_in_process() as local:
        code = main([*base, "--image-size", "32", "--epochs", "2"])
    assert code == 0 and local.starts, capsys.readouterr().err[-3000:]
    assert "--resume-changed" not in capsys.readouterr().err

    # --resume-changed resumes it anyway and records the new settings
    assert main([*base, "--image-size", "32", "--epochs", "2", "--loss", "asl", "--resume-changed"]) == 0
    saved = json.loads(Path(run, "mlc_ray_fingerprint.json").read_text())
    assert saved["loss"] == "asl" and saved["image_size"] == 32
    # ... and it did resume: its last checkpoint records the first run's start (epoch 0) and its own
    # start at epoch 1, from the first run's checkpoint
    import torch

    from mlc_ray.train.loop import STATE_FILE

    states = sorted(Path(run).rglob(STATE_FILE), key=lambda p: p.stat().st_mtime_ns)
    assert states, sorted(str(p) for p in Path(run).iterdir())
    assert torch.load(states[-1], weights_only=True)["starts"] == [0, 1]

"""What a GPU exercises imports and runs without Ray or MLflow (a device machine has neither).

Each case runs in a fresh interpreter in which ``import ray`` / ``import mlflow`` (and their
submodules) raise ImportError, imports one module, runs a tiny piece of real work with it and checks
that neither package was loaded: the model registry (forward), the training step (a bf16 step), the
image path (decode + resize), the ONNX export (export + onnxruntime parity) and ``benchmarks/gpu.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

BLOCKER = textwrap.dedent(
    """
    import sys

    class _NoRayNoMlflow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "mlflow"):
                raise ImportError(f"{name} is not installed on a device machine (blocked by the test)")
            return None

    sys.meta_path.insert(0, _NoRayNoMlflow())
    """
)

CHECK = textwrap.dedent(
    """
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))
    assert not loaded, f"loaded anyway: {loaded}"
    print("RAY_FREE_OK")
    """
)

CASES = {
    "models": """
        import torch
        from mlc_ray.data.images import PreprocessConfig
        from mlc_ray.models import build_tagger, create_model, list_models, model_spec

        for name in list_models():
            create_model(name, 3)
        tagger = build_tagger(model_spec("mobilenet_v2", 3), PreprocessConfig(image_size=32)).eval()
        with torch.inference_mode():
            logits = tagger(torch.zeros((2, 32, 32, 3), dtype=torch.uint8))
        assert logits.shape == (2, 3) and bool(torch.isfinite(logits).all())
    """,
    "train_step": """
        import math
        import torch
        from mlc_ray.data.images import PreprocessConfig
        from mlc_ray.models import build_tagger, model_spec
        from mlc_ray.train.losses import build_loss
        from mlc_ray.train.step import build_optimizer, make_grad_scaler, to_device, train_step

        model = to_device(
            build_tagger(model_spec("mobilenet_v2", 3), PreprocessConfig(image_size=32)), "cpu", channels_last=True
        ).train()
        before = [p.detach().clone() for p in model.parameters()]
        loss = train_step(
            model,
            torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8),
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
            criterion=build_loss("bce", num_labels=3),
            optimizer=build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0),
            scaler=make_grad_scaler("cpu", torch.bfloat16),
            amp_dtype=torch.bfloat16,
        )
        assert math.isfinite(float(loss))
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    """,
    "images": """
        import io
        import numpy as np
        from PIL import Image
        from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval

        buf = io.BytesIO()
        Image.fromarray(np.full((375, 500, 3), 120, np.uint8)).save(buf, "JPEG", quality=90)
        decoded = decode_image(buf.getvalue(), target_size=64)
        assert decoded.ok, decoded
        assert (decoded.width, decoded.height) == (500, 375)
        pixels = preprocess_eval(decoded.array, PreprocessConfig(image_size=64))
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    """,
    "export_onnx": """
        import sys
        import tempfile
        from pathlib import Path
        import numpy as np
        import torch
        from mlc_ray.data.images import PreprocessConfig
        from mlc_ray.export.onnx import export_onnx, onnx_probabilities
        from mlc_ray.models import build_tagger, model_spec

        tagger = build_tagger(model_spec("mobilenet_v1", 3, width=0.25), PreprocessConfig(image_size=32)).eval()
        images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(tagger, Path(tmp) / "model.onnx", image_size=32)
            got = onnx_probabilities(path, images)
        with torch.inference_mode():
            want = torch.sigmoid(tagger(torch.from_numpy(images))).numpy()
        assert np.abs(got - want).max() < 1e-4
    """,
    "benchmarks_gpu": """
        import importlib.util
        spec = importlib.util.spec_from_file_location("bench_gpu", "benchmarks/gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert callable(module.main)
        module.build_parser().parse_args(["--device", "cpu", "--quick"])
    """,
}


def _run(body: str) -> subprocess.CompletedProcess[str]:
    script = BLOCKER + textwrap.dedent(body) + CHECK
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )


def test_the_blocker_blocks() -> None:
    """The harness itself: with the blocker in place, ``import ray`` fails (so the cases can fail)."""
    proc = _run("import ray\n")
    assert proc.returncode != 0
    assert "not installed on a device machine" in proc.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_runs_without_ray_or_mlflow(case: str) -> None:
    proc = _run(CASES[case])
    assert proc.returncode == 0 and "RAY_FREE_OK" in proc.stdout, (
        f"{case} needs Ray or MLflow, or failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )

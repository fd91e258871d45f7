"""Every CPU session of a bundle's graph runs one image per intra-op thread per call (``onnx_run``):
tagging's ``OnnxBackend``, evaluation's ``BundleScorer`` and export's ``onnx_probabilities``, with
the rows in order and the scores of a whole-batch call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mlc_ray.onnx_run import run_graph
from tests.helpers import COLOR_SIZE, build_color_bundle


class Recording:
    """A real onnxruntime session that records the batch size of every ``run``."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.sizes: list[int] = []

    def run(self, outputs, feeds):  # noqa: ANN001, ANN201 - onnxruntime's signature
        self.sizes.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.session, name)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a graph whose scores follow each image's colour (a real onnxruntime session)
    return build_color_bundle(
        tmp_path_factory.mktemp("onnx-run") / "bundle", [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    )


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    # five colours: a row out of place changes the scores
    colours = np.random.default_rng(0).integers(0, 256, (5, 1, 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours, (5, COLOR_SIZE, COLOR_SIZE, 3)))


def whole_batch(bundle: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    scores = session.run(["probabilities"], {"images": images})[0]
    assert np.ptp(scores, axis=0).min() > 0.05  # the rows differ: order is checked
    return scores


def test_run_graph_calls_in_steps_and_keeps_the_rows_in_order(bundle: Path, images: np.ndarray) -> None:
    expected = whole_batch(bundle, images)
    for step, sizes in ((None, [5]), (1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (8, [5])):
        session = Recording(
            ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        )
        got = run_graph(
            session, images, input_name="images", output_name="probabilities", images_per_call=step
        )
        assert session.sizes == sizes, step
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_tagging_backend_runs_one_image_per_call_on_one_thread(bundle: Path, images: np.ndarray) -> None:
    from mlc_ray.tagging.backends import OnnxBackend

    backend = OnnxBackend((bundle / "model.onnx").read_bytes(), threads=1)
    backend.session = Recording(backend.session)
    got = backend.run(images)
    assert backend.session.sizes == [1] * len(images)
    np.testing.assert_allclose(got, whole_batch(bundle, images), rtol=1e-5, atol=1e-6)
    two = OnnxBackend((bundle / "model.onnx").read_bytes(), threads=2)
    two.session = Recording(two.session)
    two.run(images)
    assert two.session.sizes == [2, 2, 1]


def test_evaluation_scorer_runs_as_the_tagging_backend(
    bundle: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlc_ray.evaluation import BundleScorer

    monkeypatch.setenv("MLC_RAY_ORT_THREADS", "1")
    scorer = BundleScorer(bundle)
    scorer.session = Recording(scorer.session)
    got = scorer.run(images)
    assert scorer.session.sizes == [1] * len(images)
    np.testing.assert_allclose(got, whole_batch(bundle, images), rtol=1e-5, atol=1e-6)


def test_export_probabilities_run_as_the_tagging_backend(
    bundle: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlc_ray.export import onnx as export_onnx

    made: list[Recording] = []
    real = export_onnx.onnx_session

    def recording_session(path, *, threads=1):  # noqa: ANN001, ANN202
        made.append(Recording(real(path, threads=threads)))
        return made[-1]

    monkeypatch.setattr(export_onnx, "onnx_session", recording_session)
    got = export_onnx.onnx_probabilities(bundle / "model.onnx", images, threads=1)
    assert made[0].sizes == [1] * len(images)
    np.testing.assert_allclose(got, whole_batch(bundle, images), rtol=1e-5, atol=1e-6)


def test_every_scorer_opens_its_session_with_the_same_options(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tagging's backend, evaluation's scorer and export's session all come from ``open_session``:
    the same intra/inter-op threads, execution mode and graph optimisation for the same threads."""
    from mlc_ray import evaluation, onnx_run
    from mlc_ray.evaluation import BundleScorer
    from mlc_ray.export import onnx as export_onnx
    from mlc_ray.tagging import backends

    real = onnx_run.open_session
    opened: list[str] = []

    def recording(model, *, threads=1, use_gpu=False):  # noqa: ANN001, ANN202
        opened.append(type(model).__name__)
        return real(model, threads=threads, use_gpu=use_gpu)

    for module in (backends, evaluation, onnx_run):  # export imports it from onnx_run when called
        monkeypatch.setattr(module, "open_session", recording)
    monkeypatch.setenv("MLC_RAY_ORT_THREADS", "2")
    sessions = [
        backends.OnnxBackend((bundle / "model.onnx").read_bytes(), threads=2).session,
        BundleScorer(bundle).session,
        export_onnx.onnx_session(bundle / "model.onnx", threads=2),
    ]
    assert opened == ["bytes", "PosixPath", "PosixPath"]
    for session in sessions:
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert session.get_providers() == ["CPUExecutionProvider"]

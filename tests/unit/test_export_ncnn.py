"""ncnn export via pnnx, and parity of the exported fp32 formats on every registered architecture.

One module-scoped export per architecture (ONNX fp32 + ncnn through ``export_bundle``: the MobileNets
and one large architecture; the others ONNX only, see ``NCNN_ARCHS``) at 64 px with 4 labels; the models get randomised BatchNorm statistics and a scaled head so their probabilities spread
over (0, 1) (a fresh torchvision head is zero-initialised: every probability would be 0.5 and parity
would prove nothing).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlc_ray.export import ExportError, export_bundle
from mlc_ray.export.ncnn import NcnnRunner, convert_to_ncnn, run_pnnx
from mlc_ray.export.onnx import onnx_probabilities
from mlc_ray.export.parity import TOLERANCE, synthetic_images, torch_probabilities
from mlc_ray.models import list_models
from tests.helpers import EXPORT_LABELS as LABELS
from tests.helpers import EXPORT_SIZE as SIZE
from tests.helpers import write_bundle

pytestmark = pytest.mark.timeout(300)


# A pnnx conversion costs 10-50 s on 2 CPUs. The ncnn path runs over the MobileNets (the
# architectures made for devices) and one large architecture, marked ``large_arch`` (``make test``
# runs it; ``-m "not large_arch"`` leaves it out of a quick local run). Every other registered
# architecture is exported to ONNX with parity (``test_other_architectures_export_onnx_with_parity``).
LARGE_ARCH = "resnet50"
NCNN_ARCHS = [a for a in list_models() if a.startswith("mobilenet")] + [LARGE_ARCH]
ONNX_ONLY_ARCHS = [a for a in list_models() if a not in NCNN_ARCHS]


def _export(arch: str, tmp_path_factory, formats: tuple[str, ...]):
    # per_image normalisation (seed 000) on one arch: its reductions must survive ONNX and ncnn too.
    normalization = "per_image" if arch == "mobilenet_v1" else "imagenet"
    folder, model = write_bundle(tmp_path_factory.mktemp(arch), arch, normalization)
    images = synthetic_images(12, SIZE, seed=3)
    report = export_bundle(folder, val_images=images, formats=formats, threads=2)
    return arch, folder, model, images, report


@pytest.fixture(
    scope="module",
    params=[pytest.param(a, marks=pytest.mark.large_arch) if a == LARGE_ARCH else a for a in NCNN_ARCHS],
)
def exported(request, tmp_path_factory):
    return _export(request.param, tmp_path_factory, ("onnx", "ncnn"))


def test_the_ncnn_architectures_are_the_mobilenets_and_one_large_one() -> None:
    assert LARGE_ARCH in list_models() and len(NCNN_ARCHS) >= 5
    assert set(NCNN_ARCHS) | set(ONNX_ONLY_ARCHS) == set(list_models())


@pytest.mark.parametrize("arch", ONNX_ONLY_ARCHS)
def test_other_architectures_export_onnx_with_parity(arch, tmp_path_factory) -> None:
    _, folder, model, images, report = _export(arch, tmp_path_factory, ("onnx",))
    assert report.ok("onnx"), report.format()
    reference = torch_probabilities(model, images)
    assert reference.std(axis=0).min() > 0.1, "the test model's probabilities should vary across images"
    onnx_p = onnx_probabilities(folder / "model.onnx", images)
    assert onnx_p.shape == (len(images), len(LABELS))
    assert np.abs(onnx_p - reference).max() <= TOLERANCE
    assert report.results["onnx"].parity.max_abs_diff <= TOLERANCE


def test_every_architecture_exports_with_parity(exported):
    arch, folder, model, images, report = exported
    assert report.ok("onnx"), report.format()
    assert report.ok("ncnn"), report.format()
    # The in-memory model is the reference; export_bundle compared against the reloaded model.pt.
    reference = torch_probabilities(model, images)
    assert reference.std(axis=0).min() > 0.1, "the test model's probabilities should vary across images"
    onnx_p = onnx_probabilities(folder / "model.onnx", images)
    ncnn_p = NcnnRunner(folder / "model.ncnn.param", folder / "model.ncnn.bin").run(images)
    assert ncnn_p.shape == onnx_p.shape == (len(images), len(LABELS))
    assert np.abs(onnx_p - reference).max() <= TOLERANCE
    assert np.abs(ncnn_p - reference).max() <= TOLERANCE
    for fmt in ("onnx", "ncnn"):
        assert report.results[fmt].parity.max_abs_diff <= TOLERANCE
        assert report.results[fmt].parity.n_images == len(images)
    assert sorted(report.files) == ["model.ncnn.bin", "model.ncnn.param", "model.onnx"]
    # The runner (the tagging backend) is reusable, threaded, and per-image equals per-batch.
    runner = NcnnRunner(folder / "model.ncnn.param", folder / "model.ncnn.bin", num_threads=2)
    np.testing.assert_allclose(runner.predict(images[:3]), ncnn_p[:3], atol=1e-6)
    np.testing.assert_allclose(runner.run_one(images[1]), ncnn_p[1], atol=1e-6)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        runner.run(images.astype(np.float32))


def test_corrupt_onnx_gives_a_clear_export_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not an onnx protobuf")
    with pytest.raises(ExportError, match="model.onnx"):
        convert_to_ncnn(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "model.ncnn.param").exists()


def test_pnnx_failure_carries_the_converter_output(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(
        ExportError,
        match=r"pnnx failed on .*broken\.onnx \((exit|crashed with signal) \d+\); converter output:",
    ):
        run_pnnx(bad, tmp_path)


def test_missing_ncnn_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.ncnn.param"):
        NcnnRunner(tmp_path / "model.ncnn.param", tmp_path / "model.ncnn.bin")

"""Tagging run identity: a rerun that changes a row (here the precision) is a new run with its own rows,
and a finished run started again says it is complete and what under the input it does not hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlc_ray.tagging.config import TagConfig
from tests.helpers import TAG_IMAGE_SIZE as IMAGE_SIZE
from tests.helpers import make_bundle, photo_jpeg, read_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

N_IMAGES = 24


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny bundle plus a real int8 graph (onnxruntime static QDQ, calibrated on photos)."""
    from mlc_ray.export.quantize import quantize_int8

    root = Path(make_bundle(tmp_path_factory.mktemp("bundle-id") / "tiny-tagger"))
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (16, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    quantize_int8(root / "model.onnx", root / "model.int8.onnx", calibration)
    return str(root)


def _photos(folder: Path, start: int, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"{i:05d}.jpg").write_bytes(photo_jpeg(i))


def test_int8_after_fp32_is_a_new_run_with_its_own_complete_rows(bundle, ray_local, tmp_path) -> None:
    from mlc_ray.tagging.pipeline import run_tagging

    _photos(tmp_path / "in", 0, N_IMAGES)
    base = {"model": bundle, "input": str(tmp_path / "in"), "output": str(tmp_path / "tags"), "shard_size": 8}
    fp32 = run_tagging(TagConfig(**base, precision="fp32"))
    int8 = run_tagging(TagConfig(**base, precision="int8"))
    assert int8.run_id != fp32.run_id
    assert int8.shards_skipped == 0 and int8.images_this_attempt == N_IMAGES  # not a resume of fp32
    table = read_table(base["output"]).to_pylist()
    assert len(table) == 2 * N_IMAGES
    images = {str(p) for p in (tmp_path / "in").iterdir()}
    for summary in (fp32, int8):
        rows = [r for r in table if r["run_id"] == summary.run_id]
        assert {r["image_uri"] for r in rows} == images and len(rows) == N_IMAGES
        assert {r["precision"] for r in rows} == {summary.precision}
        assert all(r["error"] is None for r in rows)
    # the same precision again is the same run: resumed, nothing written twice
    again = run_tagging(TagConfig(**base, precision="int8"))
    assert again.run_id == int8.run_id and again.images_this_attempt == 0
    assert len(read_table(base["output"])) == 2 * N_IMAGES


def test_finished_run_started_again_says_complete_and_counts_new_keys(
    bundle, ray_local, tmp_path, capsys
) -> None:
    import importlib.util

    from tests.helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("tag_job", REPO_ROOT / "jobs" / "tag.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    _photos(tmp_path / "in", 0, 12)
    argv = ["--model", bundle, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "tags"),
            "--shard-size", "8"]  # fmt: skip
    assert job.main(argv) == 0
    first = capsys.readouterr().out
    assert "already complete" not in first

    assert job.main(argv) == 0  # finished, nothing new under the input
    out = capsys.readouterr().out
    assert "is already complete (12 images)" in out and "every key under" in out

    _photos(tmp_path / "in", 100, 5)  # the prefix grew
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    assert "is already complete (12 images)" in out
    assert "5 keys under" in out and "--incremental" in out and "--run-id" in out
    assert len(read_table(str(tmp_path / "tags"))) == 12  # the finished run tagged nothing again

    assert job.main([*argv, "--incremental"]) == 0  # the flag it names tags exactly those
    assert len(read_table(str(tmp_path / "tags"))) == 17

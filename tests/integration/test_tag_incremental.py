"""``--incremental``: a scheduled rerun tags only the objects this model version has not tagged."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from mlc_ray import storage
from mlc_ray.tagging.config import TagConfig
from tests.helpers import make_bundle, read_table, upload_images


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return make_bundle(tmp_path_factory.mktemp("bundle-incr") / "tiny-tagger")


def test_incremental_tags_exactly_the_new_and_changed_images(s3_server, ray_local, s3_bucket, bundle) -> None:
    from mlc_ray.tagging.pipeline import run_tagging

    storage.reset_clients()
    prefix = f"s3://{s3_bucket}/in/"
    output = f"s3://{s3_bucket}/tags"
    first = upload_images(s3_bucket, "in", 120, with_bad=False)
    base = TagConfig(
        model=bundle, input=prefix, output=output, shard_size=64, batch_size=16, incremental=True
    )
    s1 = run_tagging(base)
    assert s1.images == 120
    # a read that failed transiently in run 1 (an `unreadable` row) is retried by the next run, by
    # contract; on a loaded machine the local S3 server can drop one, so the test counts them
    retried = unreadable_uris(output, s1.run_id)
    assert retried <= set(first)

    added = upload_images(s3_bucket, "in", 50, start=10_000, with_bad=False)
    assert not set(added) & set(first)
    s2 = run_tagging(base)
    assert s2.run_id != s1.run_id
    assert s2.images == 50 + len(retried), f"run 1 errors {s1.errors_by_code}, retried {sorted(retried)}"
    table = read_table(output)
    new_rows = table.filter(pc.equal(table.column("run_id"), s2.run_id))
    assert sorted(new_rows.column("image_uri").to_pylist()) == sorted(set(added) | retried)
    assert len(set(table.column("image_uri").to_pylist())) == 170
    assert table.num_rows == 170 + len(retried)

    # a changed object (new ETag) is tagged again; nothing new -> an empty run, exit clean
    changed = sorted(first)[0]
    storage.write_bytes(changed, storage.read_bytes(sorted(added)[0]))
    s3 = run_tagging(base)
    retried = unreadable_uris(output, s2.run_id)
    assert s3.images == 1 + len(retried - {changed})
    s4 = run_tagging(base)
    again = unreadable_uris(output, s3.run_id)
    assert s4.images == len(again) and (again or s4.shards == 0)


def unreadable_uris(output: str, run_id: str) -> set[str]:
    """The images a run recorded as `unreadable` (what ``--incremental`` retries)."""
    table = read_table(output)
    rows = table.filter(pc.equal(table.column("run_id"), run_id)).to_pylist()
    return {r["image_uri"] for r in rows if (r["error"] or "").startswith("unreadable")}


def test_incremental_run_with_nothing_new_ends_quickly_without_an_actor_pool(
    s3_server, ray_local, tmp_path, bundle
) -> None:
    """An hourly incremental run that finds nothing new: no Ray, no actor pool, no report, no MLflow
    run. (How long it takes is measured by benchmarks/tagging.py, not asserted here.)"""
    import numpy as np
    from PIL import Image

    from mlc_ray.tagging.pipeline import run_tagging

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        arr = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.jpg", quality=85)
    cfg = TagConfig(model=bundle, input=str(folder), output=str(tmp_path / "tags"), incremental=True)
    first = run_tagging(cfg)
    assert first.images == 12 and first.errors == 0
    assert (
        "Ray start" in first.timings_s
        and "actor pool start + model load (to the first rows)" in first.timings_s
    )

    again = run_tagging(cfg)
    assert (again.images, again.shards, again.images_this_attempt) == (0, 0, 0)
    assert not any("Ray" in k or "actor" in k or "tagging" in k for k in again.timings_s), again.timings_s
    assert not again.report and again.mlflow_run_id is None

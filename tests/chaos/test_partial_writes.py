"""Partial writes: a failure injected in the middle of a tag-table commit.

Faults (in the driver, where shards are committed):

* local output — the Parquet writer writes half of the shard's bytes, then raises ``OSError``
  ("disk full"), on the 2nd shard;
* S3 output (``TagTableWriter`` alone) — the copy from the uploaded temp object to the shard's
  final key raises (the temp object is already on the server).

Local, a whole ``run_tagging``: the run fails, and afterwards the shard has no file under its
committed name, no counts file, the run has no ``_SUCCESS``, and no temp file is left behind; the
rerun of the same command skips the shard committed before the fault (same file, same mtime) and
writes the failed one exactly once. S3: no object under the committed name, the temp object is
deleted, and the retried commit writes the shard once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlc_ray import storage
from tests.chaos import support
from tests.helpers import read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

N_IMAGES = 30
SHARD = 10
BUCKET = "chaos-partial"


class InjectedFault(OSError):
    pass


@pytest.fixture(scope="module")
def photos(s3_server) -> tuple[str, list[str]]:
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    return f"s3://{BUCKET}/in/", sorted(upload_images(BUCKET, "in", N_IMAGES, with_bad=False))


def _config(bundle: str, prefix: str, output: str):
    from mlc_ray.tagging.config import TagConfig

    return TagConfig(
        model=bundle,
        input=prefix,
        output=output,
        shard_size=SHARD,
        batch_size=10,
        actors="1",
        threads_per_actor=1,
    )


def _shard_files(output: str) -> dict[str, str]:
    """Committed shard files of the table -> ETag (S3) or mtime_ns (local)."""
    out = {}
    for page in storage.iter_pages(output, suffixes=(".parquet",)):
        for info in page:
            if "/dt=" in info.uri:
                out[info.uri] = info.etag or str(os.stat(info.uri).st_mtime_ns)
    return out


def _check_rerun(cfg, uris: list[str], before: dict[str, str], test: str, fault: str) -> None:
    from mlc_ray.tagging.pipeline import run_tagging

    summary = run_tagging(cfg)
    after = _shard_files(cfg.output)
    counts = support.table_counts(read_table(cfg.output).column("image_uri").to_pylist(), uris)
    support.record(test, fault, 1, len(uris), counts.rows, counts.duplicates, counts.missing)
    assert (counts.rows, counts.duplicates, counts.missing, counts.extra) == (N_IMAGES, 0, 0, 0)
    assert summary.shards == N_IMAGES // SHARD and summary.shards_skipped == len(before) == 1
    assert summary.images_this_attempt == N_IMAGES - SHARD  # the committed shard was not redone
    assert {u: after[u] for u in before} == before  # same file, not rewritten
    assert len(after) == summary.shards
    assert storage.exists(storage.join(cfg.output, "_runs", summary.run_id, "_SUCCESS"))


def test_local_write_fails_midway_no_partial_file_rerun_writes_once(
    photos, tiny_bundle, chaos_ray, tmp_path: Path, monkeypatch
) -> None:
    from mlc_ray.tagging import table as table_module
    from mlc_ray.tagging.pipeline import run_tagging

    prefix, uris = photos
    output = str(tmp_path / "tags")
    cfg = _config(tiny_bundle, prefix, output)
    real_write = pq.write_table
    calls = {"n": 0}

    def half_then_disk_full(tbl, where, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] != 2:
            return real_write(tbl, where, **kwargs)
        real_write(tbl, where, **kwargs)
        with open(where, "r+b") as fh:  # leave half of the bytes, as a crash mid-write would
            fh.truncate(os.path.getsize(where) // 2)
        raise InjectedFault(28, "No space left on device (injected)")

    monkeypatch.setattr(table_module.pq, "write_table", half_then_disk_full)
    with pytest.raises(InjectedFault):
        run_tagging(cfg)
    monkeypatch.setattr(table_module.pq, "write_table", real_write)

    before = _shard_files(output)
    partition = next(Path(output).glob("dt=*"))
    leftovers = sorted(p.name for p in partition.iterdir() if p.name not in {Path(u).name for u in before})
    run_id = next(iter(before)).rsplit("/part-", 1)[1].split("-", 1)[0]
    assert calls["n"] == 2 and len(before) == 1  # shard A committed, shard B failed mid-write
    assert leftovers == []  # no partial file under a committed name, no temp file either
    for name in before:
        pq.read_table(name)  # what is committed is whole
    assert not (Path(output) / "_runs" / run_id / "_SUCCESS").exists()
    assert len(list((Path(output) / "_runs" / run_id / "counts").iterdir())) == 1

    _check_rerun(
        cfg,
        uris,
        before,
        "test_local_write_fails_midway",
        "Parquet write of a shard truncated + OSError (local)",
    )


def test_s3_commit_copy_fails_no_committed_object_retry_writes_once(s3_server, monkeypatch) -> None:
    """TagTableWriter alone (no Ray): the commit's copy temp -> final key fails after the upload."""
    import boto3

    from mlc_ray.tagging.table import Provenance, TagTableWriter, tag_rows

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=f"{BUCKET}-writer")
    storage.reset_clients()
    uris = [f"s3://x/{i}.jpg" for i in range(SHARD)]
    prov = Provenance(
        model_name="m", model_version="1", model_alias=None, thresholds_sha256="t", backend="onnxruntime",
        precision="fp32", run_id="rchaos",
    )  # fmt: skip
    rows = tag_rows(
        image_uris=uris, source_etags=["e"] * SHARD, label_names=["a"], scores=np.zeros((SHARD, 1)),
        predicted=np.zeros((SHARD, 1), bool), ok_rows=range(SHARD), widths=[1] * SHARD, heights=[1] * SHARD,
        errors=[None] * SHARD, provenance=prov,
    )  # fmt: skip
    output = f"s3://{BUCKET}-writer/tags"
    writer = TagTableWriter(output, "2026-01-02", "rchaos")
    client = storage.s3_client()
    real_copy = client.copy
    seen = {}

    def copy_fails(source, bucket, key, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["temp_on_server"] = bool(client.head_object(Bucket=bucket, Key=source["Key"]))
        raise InjectedFault(5, f"copy {source['Key']} -> {key} failed (injected)")

    monkeypatch.setattr(client, "copy", copy_fails)
    with pytest.raises(InjectedFault):
        writer.commit(rows, 0, "d" * 64)
    monkeypatch.setattr(client, "copy", real_copy)

    def raw_keys() -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket=f"{BUCKET}-writer").get("Contents", [])]

    assert seen == {"temp_on_server": True}  # the failure hit after the upload, during the commit
    assert raw_keys() == []  # no object under the committed name, and the temp object was removed
    assert writer.committed_names() == set()  # a rerun redoes this shard

    uri = writer.commit(rows, 0, "d" * 64)
    table = read_table(output)
    counts = support.table_counts(table.column("image_uri").to_pylist(), uris)
    support.record(
        "test_s3_commit_copy_fails", "S3 copy temp -> final key raises during a commit (writer)", 1,
        SHARD, counts.rows, counts.duplicates, counts.missing,
    )  # fmt: skip
    assert raw_keys() == [uri.removeprefix(f"s3://{BUCKET}-writer/")]
    assert (counts.rows, counts.duplicates, counts.missing) == (SHARD, 0, 0)

"""The tag table's exact schema, row building, deterministic shard names and the atomic commit."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlc_ray.tagging.table import (
    TAG_TABLE_SCHEMA,
    Provenance,
    TagTableWriter,
    partition_dir,
    shard_file_name,
    tag_rows,
)

PROV = Provenance(
    model_name="m",
    model_version="3",
    model_alias="champion",
    thresholds_sha256="abc",
    backend="onnxruntime",
    precision="fp32",
    run_id="r1",
)


def test_schema_is_exactly_the_documented_one() -> None:
    expected = [
        ("image_uri", pa.string()),
        ("source_etag", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("scores", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("model_alias", pa.string()),
        ("thresholds_sha256", pa.string()),
        ("backend", pa.string()),
        ("precision", pa.string()),
        ("tag_options", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
        ("tagged_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
    ]
    assert [(f.name, f.type) for f in TAG_TABLE_SCHEMA] == expected


def _rows() -> pa.Table:
    scores = np.array([[0.9, 0.1, 0.6], [0.2, 0.8, 0.4]], dtype=np.float32)
    return tag_rows(
        image_uris=["s3://b/a.jpg", "s3://b/bad.jpg", "s3://b/c.jpg"],
        source_etags=["e1", "e2", "e3"],
        label_names=["cat", "dog", "red"],
        scores=scores,
        predicted=scores >= np.array([0.5, 0.5, 0.5]),
        ok_rows=[0, 2],
        widths=[500, None, 40],
        heights=[375, None, 30],
        errors=[None, "truncated: image file is truncated", None],
        provenance=PROV,
        tagged_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )


def test_tag_rows_values_and_error_rows() -> None:
    table = _rows()
    assert table.schema == TAG_TABLE_SCHEMA
    rows = table.to_pylist()
    assert rows[0]["labels"] == ["cat", "red"]
    assert [s["label"] for s in rows[0]["scores"]] == ["cat", "dog", "red"]
    assert rows[0]["scores"][0]["score"] == pytest.approx(0.9)
    assert rows[1]["labels"] == [] and rows[1]["scores"] == []
    assert rows[1]["error"].startswith("truncated: ") and rows[1]["width"] is None
    assert rows[2]["labels"] == ["dog"] and rows[2]["width"] == 40
    assert {r["model_alias"] for r in rows} == {"champion"} and rows[2]["run_id"] == "r1"


def test_tag_rows_all_failed() -> None:
    table = tag_rows(
        image_uris=["x"],
        source_etags=[None],
        label_names=["a"],
        scores=None,
        predicted=None,
        ok_rows=[],
        widths=[None],
        heights=[None],
        errors=["empty: zero bytes"],
        provenance=PROV,
    )
    assert table.schema == TAG_TABLE_SCHEMA and table.to_pylist()[0]["labels"] == []


def test_shard_names_are_deterministic() -> None:
    assert shard_file_name("r1", 7, "f" * 64) == shard_file_name("r1", 7, "f" * 64)
    assert shard_file_name("r1", 7, "f" * 64) == "part-r1-000007-ffffffffffff.parquet"
    assert shard_file_name("r1", 7, "a" * 64) != shard_file_name("r1", 7, "f" * 64)
    assert partition_dir("2024-05-01") == "dt=2024-05-01"
    with pytest.raises(ValueError):
        partition_dir("yesterday")


def test_writer_commits_atomically(tmp_path, monkeypatch) -> None:
    writer = TagTableWriter(str(tmp_path / "tags"), "2024-05-01", "r1")
    uri = writer.commit(_rows(), 0, "d" * 64)
    assert os.path.basename(uri) == "part-r1-000000-dddddddddddd.parquet"
    assert pq.read_table(uri).schema.remove_metadata() == TAG_TABLE_SCHEMA
    assert pq.read_table(uri).num_rows == 3
    assert writer.committed_names() == {"part-r1-000000-dddddddddddd.parquet"}

    # a writer killed mid-write leaves no committed file and no visible temp file
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(RuntimeError):
        writer.commit(_rows(), 1, "e" * 64)
    names = sorted(os.listdir(tmp_path / "tags" / "dt=2024-05-01"))
    assert names == ["part-r1-000000-dddddddddddd.parquet"]
    assert writer.committed_names() == {"part-r1-000000-dddddddddddd.parquet"}

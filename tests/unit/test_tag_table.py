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


def _readme_query() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("**Reading the table.**") :]
    return section[
        section.index("```sql\n") + len("```sql\n") : section.index("```", section.index("```sql") + 6)
    ]


def test_the_readme_query_gives_the_newest_tags_of_one_version(tmp_path) -> None:
    import duckdb

    def write(version: str, run: str, dt: str, when: int, rows: list[tuple[str, list[float] | None]]) -> None:
        ok = [i for i, (_, s) in enumerate(rows) if s is not None]
        scores = np.array([rows[i][1] for i in ok], dtype=np.float32).reshape(len(ok), 2)
        table = tag_rows(
            image_uris=[f"s3://b/{name}" for name, _ in rows],
            source_etags=[f"e-{name}-{when}" for name, _ in rows],
            label_names=["cat", "dog"],
            scores=scores,
            predicted=scores >= 0.5,
            ok_rows=ok,
            widths=[10 if s is not None else None for _, s in rows],
            heights=[10 if s is not None else None for _, s in rows],
            errors=[None if s is not None else "truncated: cut" for _, s in rows],
            provenance=Provenance(
                model_name="photos-tagger",
                model_version=version,
                model_alias="champion",
                thresholds_sha256="t",
                backend="onnxruntime",
                precision="fp32",
                run_id=run,
            ),
            tagged_at=datetime(2026, 12, 1, when, tzinfo=UTC),
        )
        folder = tmp_path / "tags" / "photos" / f"dt={dt}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / f"part-{run}.parquet")

    write("7", "r1", "2026-12-01", 1, [("a.jpg", [0.9, 0.1]), ("b.jpg", None), ("c.jpg", [0.2, 0.8])])
    write("7", "r2", "2026-12-02", 2, [("a.jpg", [0.1, 0.9])])  # an incremental run: a.jpg changed
    write("6", "r0", "2026-12-02", 3, [("a.jpg", [0.9, 0.9])])  # another version, newer
    state = tmp_path / "tags" / "photos" / "_runs" / "r1" / "counts"  # the runs' state beside the rows
    state.mkdir(parents=True)
    pq.write_table(pa.table({"image_uri": ["s3://b/z.jpg"]}), state / "part.parquet")

    sql = _readme_query().replace("tags/photos", str(tmp_path / "tags" / "photos"))
    got = {uri: list(labels) for uri, labels, _ in duckdb.connect().execute(sql).fetchall()}
    assert got == {"s3://b/a.jpg": ["dog"], "s3://b/c.jpg": ["dog"]}

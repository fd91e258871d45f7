"""The tag table: its exact Arrow schema, row building, and the atomic per-shard Parquet writer.

This is the contract downstream readers (DuckDB, Athena, pandas, Spark) rely on, so the schema is
spelled out here once and every writer goes through ``TAG_TABLE_SCHEMA``:

=====================  ==============================================  =====================================
column                 type                                            meaning
=====================  ==============================================  =====================================
image_uri              string                                          the input object (s3://... or path)
source_etag            string                                          S3 ETag, or content hash (local)
labels                 list<string>                                    labels at or above their threshold
scores                 list<struct<label: string, score: float>>       every label, model output order
model_name             string                                          registered name (bundle dir: its name)
model_version          string                                          concrete version the run resolved
model_alias            string                                          alias the run resolved, if any
thresholds_sha256      string                                          thresholds.json content hash
backend                string                                          onnxruntime | ncnn
precision              string                                          fp32 | int8
tag_options            string                                          tag-time options, canonical JSON
                                                                       (``{}`` = none; ``options.py``)
width, height          int32                                           original size; null on error
error                  string                                          "code: message"; null when tagged
tagged_at              timestamp[us, tz=UTC]                           when the row was produced
run_id                 string                                          the run that wrote the row
=====================  ==============================================  =====================================

Partitioned by ``dt=YYYY-MM-DD`` (the run's start date, a directory, not a column in the files).
A failed image is a row with ``error`` set (labels and scores empty lists), never a missing row.

``TagTableWriter`` writes one shard's rows under a temporary name and commits them under a
deterministic name (``dt=<dt>/part-<run_id>-<shard:06d>-<digest>.parquet``) with
``mlc_ray.storage.upload_file`` (``os.replace`` locally, copy-then-delete on S3), so a file with a
committed name is always complete and a rerun can skip it.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "TAG_TABLE_SCHEMA",
    "SCORE_TYPE",
    "ERROR_UNREADABLE",
    "ERROR_CRASHED",
    "ERROR_TIMEOUT",
    "Provenance",
    "tag_rows",
    "empty_tag_table",
    "shard_file_name",
    "partition_dir",
    "TagTableWriter",
]

SCORE_TYPE = pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float32())])
TAG_TABLE_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string()),
        pa.field("source_etag", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("scores", pa.list_(SCORE_TYPE)),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("model_alias", pa.string()),
        pa.field("thresholds_sha256", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("precision", pa.string()),
        pa.field("tag_options", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("tagged_at", pa.timestamp("us", tz="UTC")),
        pa.field("run_id", pa.string()),
    ]
)
# Error code for an object whose bytes could not be read (missing, denied, retries exhausted);
# the decode codes come from mlc_ray.data.images.ERROR_CODES.
ERROR_UNREADABLE = "unreadable"
# Error codes for an image whose process died (``crashed``: a decoder or model crash) or hung
# (``timeout``) every time it was tagged, alone, after its batch was isolated (pipeline docstring).
ERROR_CRASHED = "crashed"
ERROR_TIMEOUT = "timeout"


class Provenance:
    """The per-run constant columns: which model, thresholds, backend, options and run produced a row."""

    __slots__ = (
        "model_name",
        "model_version",
        "model_alias",
        "thresholds_sha256",
        "backend",
        "precision",
        "run_id",
        "tag_options",
    )

    def __init__(
        self,
        *,
        model_name: str,
        model_version: str,
        model_alias: str | None,
        thresholds_sha256: str,
        backend: str,
        precision: str,
        run_id: str,
        tag_options: str = "{}",
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.model_alias = model_alias
        self.thresholds_sha256 = thresholds_sha256
        self.backend = backend
        self.precision = precision
        self.run_id = run_id
        self.tag_options = tag_options  # TagOptions.to_json(): "{}" when no tag-time option was given

    def to_dict(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, data: dict[str, str | None]) -> Provenance:
        return cls(**data)  # type: ignore[arg-type]


def tag_rows(
    *,
    image_uris: Sequence[str],
    source_etags: Sequence[str | None],
    label_names: Sequence[str],
    scores: np.ndarray | None,
    predicted: np.ndarray | None,
    ok_rows: Sequence[int],
    widths: Sequence[int | None],
    heights: Sequence[int | None],
    errors: Sequence[str | None],
    provenance: Provenance,
    tagged_at: datetime | None = None,
) -> pa.Table:
    """Build a tag-table batch with the exact schema.

    ``scores``/``predicted`` are (len(ok_rows), L) arrays for the rows listed in ``ok_rows`` (the
    images that decoded); every other row gets empty ``labels``/``scores`` and keeps its ``error``.
    Built column-wise with Arrow offsets (no per-label Python objects): this runs for every batch.
    """
    n = len(image_uris)
    n_labels = len(label_names)
    ok_rows = np.asarray(ok_rows, dtype=np.int64)
    counts_scores = np.zeros(n, dtype=np.int32)
    counts_scores[ok_rows] = n_labels
    score_offsets = np.concatenate([[0], np.cumsum(counts_scores)]).astype(np.int32)
    names = pa.array(list(label_names), pa.string())
    if len(ok_rows):
        flat_scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        label_idx = np.tile(np.arange(n_labels), len(ok_rows))
        pred = np.asarray(predicted, dtype=bool)
        sel = np.nonzero(pred.reshape(-1))[0] % n_labels
        counts_labels = np.zeros(n, dtype=np.int32)
        counts_labels[ok_rows] = pred.sum(axis=1)
    else:
        flat_scores = np.zeros(0, dtype=np.float32)
        label_idx = np.zeros(0, dtype=np.int64)
        sel = np.zeros(0, dtype=np.int64)
        counts_labels = np.zeros(n, dtype=np.int32)
    label_offsets = np.concatenate([[0], np.cumsum(counts_labels)]).astype(np.int32)
    struct_values = pa.StructArray.from_arrays(
        [names.take(pa.array(label_idx, pa.int64())), pa.array(flat_scores, pa.float32())],
        fields=list(SCORE_TYPE),
    )
    scores_col = pa.ListArray.from_arrays(
        pa.array(score_offsets, pa.int32()), struct_values, type=pa.list_(SCORE_TYPE)
    )
    labels_col = pa.ListArray.from_arrays(
        pa.array(label_offsets, pa.int32()), names.take(pa.array(sel, pa.int64())), type=pa.list_(pa.string())
    )
    when = tagged_at or datetime.now(UTC)
    prov = provenance

    def const(value: str | None) -> pa.Array:
        return pa.array([value] * n, pa.string())

    columns = {
        "image_uri": pa.array(list(image_uris), pa.string()),
        "source_etag": pa.array(list(source_etags), pa.string()),
        "labels": labels_col,
        "scores": scores_col,
        "model_name": const(prov.model_name),
        "model_version": const(prov.model_version),
        "model_alias": const(prov.model_alias),
        "thresholds_sha256": const(prov.thresholds_sha256),
        "backend": const(prov.backend),
        "precision": const(prov.precision),
        "tag_options": const(prov.tag_options),
        "width": pa.array([None if w is None else int(w) for w in widths], pa.int32()),
        "height": pa.array([None if h is None else int(h) for h in heights], pa.int32()),
        "error": pa.array(list(errors), pa.string()),
        "tagged_at": pa.array([when] * n, pa.timestamp("us", tz="UTC")),
        "run_id": const(prov.run_id),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=TAG_TABLE_SCHEMA)


def empty_tag_table() -> pa.Table:
    return TAG_TABLE_SCHEMA.empty_table()


def partition_dir(dt: str) -> str:
    """``dt=YYYY-MM-DD``: the Hive-style partition a run's files go under."""
    datetime.strptime(dt, "%Y-%m-%d")  # ValueError for anything but a date
    return f"dt={dt}"


def shard_file_name(run_id: str, shard_index: int, digest: str) -> str:
    """Deterministic file name of one shard's rows: same run, shard and keys -> same name."""
    return f"part-{run_id}-{shard_index:06d}-{digest[:12]}.parquet"


class TagTableWriter:
    """Write and atomically commit one Parquet file per shard under ``<root>/dt=<dt>/``."""

    def __init__(self, root: str, dt: str, run_id: str) -> None:
        from mlc_ray import storage

        self.root = root.rstrip("/")
        self.dt = dt
        self.run_id = run_id
        self.dir_uri = storage.join(self.root, partition_dir(dt))

    def uri_for(self, shard_index: int, digest: str) -> str:
        from mlc_ray import storage

        return storage.join(self.dir_uri, shard_file_name(self.run_id, shard_index, digest))

    def committed_names(self) -> set[str]:
        """Names of this run's files already committed in its partition (one listing, small)."""
        from mlc_ray import storage

        prefix = f"part-{self.run_id}-"
        names: set[str] = set()
        try:
            for page in storage.iter_pages(self.dir_uri, suffixes=(".parquet",)):
                for info in page:
                    name = info.uri.rsplit("/", 1)[-1]
                    if name.startswith(prefix):
                        names.add(name)
        except FileNotFoundError:
            pass
        return names

    def commit(self, table: pa.Table, shard_index: int, digest: str) -> str:
        """Write ``table`` (tag schema) as the shard's file; atomic: temp file, then rename/copy."""
        from mlc_ray import storage

        if table.schema != TAG_TABLE_SCHEMA:
            table = table.select(TAG_TABLE_SCHEMA.names).cast(TAG_TABLE_SCHEMA)
        uri = self.uri_for(shard_index, digest)
        if storage.is_s3(uri):
            tmp_dir = None  # upload_file puts a temp key, copies to the final key, deletes the temp key
        else:
            # Same directory as the final file, so the commit is one os.replace on one filesystem.
            # The leading '.' keeps readers of the partition (pyarrow, DuckDB globs of *.parquet) away.
            tmp_dir = os.path.dirname(os.path.abspath(uri.removeprefix("file://")))
            os.makedirs(tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{uuid.uuid4().hex[:8]}-", suffix=".parquet", dir=tmp_dir)
        os.close(fd)
        try:
            pq.write_table(table, tmp, compression="zstd")
            if tmp_dir is None:
                storage.upload_file(tmp, uri)
            else:
                os.replace(tmp, uri.removeprefix("file://"))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return uri

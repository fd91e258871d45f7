"""Reading a tag table for the queue: batch scans of a few columns (one source: a table, optionally
one run or model version), the latest row per image, and each batch's scores and listed labels."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.errors import UserError
from mlc_ray.select.keys import key_hash

__all__ = [
    "SCAN_COLUMNS",
    "Latest",
    "Source",
    "batch_keys",
    "batch_scores",
    "batch_times",
    "compare_index",
    "latest_rows",
    "listed_labels",
]


@dataclass
class Source:
    uri: str
    run: str | None
    version: str | None

    def dataset(self) -> Any:
        import pyarrow as pa
        import pyarrow.dataset as pads

        from mlc_ray import storage

        fs, path = storage.arrow_filesystem(self.uri)
        try:
            ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        except (FileNotFoundError, OSError) as exc:
            raise UserError(
                f"tag table {self.uri} does not exist or holds no Parquet files ({exc})"
            ) from None
        except pa.ArrowInvalid as exc:  # e.g. a file that is not Parquet
            raise UserError(f"{self.uri} is not a tag table (jobs/tag.py's --output folder): {exc}") from None
        if not ds.files:
            raise UserError(f"tag table {self.uri} holds no Parquet files (is it jobs/tag.py's --output?)")
        missing = {"image_uri", "source_etag", "labels", "scores", "error", "tagged_at"} - set(
            ds.schema.names
        )
        if missing:
            raise UserError(f"{self.uri} is not a tag table: no column(s) {', '.join(sorted(missing))}")
        return ds

    def filter(self) -> Any:
        import pyarrow.compute as pc

        f = pc.field("error").is_null()
        if self.run:
            f = f & (pc.field("run_id") == self.run)
        if self.version:
            f = f & (pc.field("model_version") == str(self.version))
        return f

    def describe(self) -> str:
        what = [f"run {self.run}"] if self.run else []
        what += [f"version {self.version}"] if self.version else []
        return f"{self.uri}" + (f" ({', '.join(what)})" if what else "")

    def batches(self, columns: Sequence[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        # little read-ahead: memory stays at a few batches (pyarrow's default buffers 16 per file)
        scan = self.dataset().to_batches(
            columns=list(columns),
            filter=self.filter(),
            batch_size=batch_size,
            batch_readahead=2,
            fragment_readahead=1,
        )
        for batch in scan:
            if batch.num_rows:
                yield batch


class Latest:
    """Which row of each image is the latest: sorted unique key hashes and their largest tagged_at."""

    REDUCE_ROWS = 2_000_000  # rows buffered between merges: bounds the merge's temporary arrays

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.times = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self.rows = 0

    def add(self, keys: np.ndarray, times: np.ndarray) -> None:
        self._pending.append((keys, times))
        self._pending_rows += len(keys)
        self.rows += len(keys)
        if self._pending_rows >= self.REDUCE_ROWS:
            self._reduce()

    def _reduce(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys, *[k for k, _ in self._pending]])
        times = np.concatenate([self.times, *[t for _, t in self._pending]])
        self._pending, self._pending_rows = [], 0
        order = np.lexsort((times, keys))  # by key, then time: the last of each key is its latest
        keys, times = keys[order], times[order]
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = keys[1:] != keys[:-1]
        self.keys, self.times = keys[last], times[last]

    def finish(self) -> Latest:
        self._reduce()
        return self

    def is_latest(self, keys: np.ndarray, times: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        order = np.argsort(keys)  # sorted queries: numpy's binary search starts from the last hit
        pos = np.empty(len(keys), dtype=np.int64)
        pos[order] = np.searchsorted(self.keys, keys[order])
        pos = np.minimum(pos, len(self.keys) - 1)
        return (self.keys[pos] == keys) & (self.times[pos] == times)


def batch_times(batch: pa.RecordBatch) -> np.ndarray:
    return np.asarray(batch.column("tagged_at").cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False))


def batch_keys(batch: pa.RecordBatch) -> np.ndarray:
    return key_hash(batch.column("source_etag"), batch.column("image_uri"))


def latest_rows(source: Source, batch_size: int) -> tuple[Latest, set[tuple[str, str, str, str]]]:
    """[1] one scan of 3 columns: the latest row per image, and every (run, thresholds, model, version)."""
    latest = Latest()
    provenance: set[tuple[str, str, str, str]] = set()
    cols = [
        "image_uri",
        "source_etag",
        "tagged_at",
        "run_id",
        "thresholds_sha256",
        "model_name",
        "model_version",
    ]
    for batch in source.batches(cols, batch_size):
        latest.add(batch_keys(batch), batch_times(batch))
        prov = (
            pa.table(
                {c: batch.column(c) for c in ("run_id", "thresholds_sha256", "model_name", "model_version")}
            )
            .group_by(["run_id", "thresholds_sha256", "model_name", "model_version"])
            .aggregate([])
        )
        provenance.update(tuple(str(v or "") for v in row.values()) for row in prov.to_pylist())
    return latest.finish(), provenance


def batch_scores(batch: pa.RecordBatch, labels: list[str] | None) -> tuple[list[str], np.ndarray]:
    """(label names, (n, L) float32 scores); every row must carry the same labels in the same order."""
    import pyarrow.compute as pc

    col = batch.column("scores")
    lengths = np.asarray(pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False))
    flat = pc.list_flatten(col)
    if labels is None:
        labels = [str(x) for x in flat.field("label")[: int(lengths[0])].to_pylist()]
    n_labels = len(labels)
    names = pc.index_in(flat.field("label"), value_set=pa.array(labels)).fill_null(-1).to_numpy()
    if (lengths != n_labels).any() or not np.array_equal(
        names.reshape(len(lengths), n_labels), np.broadcast_to(np.arange(n_labels), (len(lengths), n_labels))
    ):
        raise UserError(
            "the selected rows come from models with different labels; pick one model's rows with "
            "--run RUN_ID or --version V"
        )
    scores = np.asarray(flat.field("score").to_numpy(zero_copy_only=False), dtype=np.float32)
    return labels, scores.reshape(len(lengths), n_labels)


def listed_labels(batch: pa.RecordBatch, labels: list[str]) -> np.ndarray:
    """(n, L) bool: which labels each row lists (its ``labels`` column)."""
    import pyarrow.compute as pc

    col = batch.column("labels")
    out = np.zeros((batch.num_rows, len(labels)), dtype=bool)
    flat = pc.list_flatten(col)
    if len(flat):
        idx = np.asarray(
            pc.index_in(flat, value_set=pa.array(labels)).fill_null(-1).to_numpy(), dtype=np.int64
        )
        rows = np.asarray(pc.list_parent_indices(col).to_numpy(), dtype=np.int64)
        ok = idx >= 0  # a listed label the scores do not carry cannot happen in one model's rows
        out[rows[ok], idx[ok]] = True
    return out


SCAN_COLUMNS = [
    "image_uri",
    "source_etag",
    "labels",
    "scores",
    "tagged_at",
    "thresholds_sha256",
    "model_version",
    "run_id",
]


def compare_index(
    source: Source, labels: list[str], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The second source's latest row per image: sorted keys, float16 scores (n, L), listed flags."""
    latest, _ = latest_rows(source, batch_size)
    keys, scores, listed = [], [], []
    for batch in source.batches(SCAN_COLUMNS, batch_size):
        k = batch_keys(batch)
        win = latest.is_latest(k, batch_times(batch))
        if not win.any():
            continue
        batch = batch.filter(pa.array(win))
        _, s = batch_scores(batch, labels)
        keys.append(k[win])
        scores.append(s.astype(np.float16))
        listed.append(listed_labels(batch, labels))
    if not keys:
        raise UserError(f"second source {source.describe()}: no tagged rows")
    k = np.concatenate(keys)
    order = np.argsort(k, kind="stable")
    return k[order], np.concatenate(scores)[order], np.concatenate(listed)[order]

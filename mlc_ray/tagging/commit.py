"""Stage [4]: each shard's rows gathered in the driver and committed whole, once.

``ShardBuffer`` keeps a shard's rows as they arrive from the actors, by position (a retried task's
rows replace, never add); when every position is in (no more, no less, in the shard's order)
``ShardCommitter.commit`` writes the shard's Parquet file under a temporary name and commits it
under its deterministic name (``TagTableWriter``), then writes the shard's counts file (rows, errors
by code, the report's label stats) under ``<output>/_runs/<run_id>/counts/``. Committed shards are
skipped on a rerun, so a killed driver or actor never loses or duplicates a row. ``gather_totals``
sums the counts files of every shard of the run (earlier attempts included) for the summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.tagging.inputs import Shard
from mlc_ray.tagging.report import RunReport, empty_totals, merge_totals, shard_label_stats
from mlc_ray.tagging.summary import TagSummary, error_code
from mlc_ray.tagging.table import TAG_TABLE_SCHEMA, TagTableWriter

__all__ = ["ShardBuffer", "ShardCommitter", "gather_totals"]

log = logging.getLogger(__name__)


class ShardBuffer:
    """One shard's rows as they arrive from the actors, keyed by position (a retried task's rows
    replace, never add)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.parts: list[pa.Table] = []
        self.seen = np.zeros(len(shard), dtype=bool)

    def add(self, part: pa.Table) -> tuple[int, int]:
        """Keep the rows of positions not seen yet; returns (rows kept, of which errors)."""
        pos = np.asarray(part.column("_pos").to_numpy(zero_copy_only=False), dtype=np.int64)
        fresh = ~self.seen[pos]
        # positions repeated inside `part` itself keep their first row
        _, first = np.unique(pos, return_index=True)
        keep = np.zeros(len(pos), dtype=bool)
        keep[first] = True
        keep &= fresh
        if not keep.any():
            return 0, 0
        kept = part.filter(pa.array(keep))
        self.parts.append(kept)
        self.seen[pos[keep]] = True
        errors = kept.num_rows - kept.column("error").null_count if "error" in kept.column_names else 0
        return kept.num_rows, errors

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())

    def table(self, *, keep_thumbs: bool = False) -> pa.Table:
        combined = pa.concat_tables(self.parts)
        combined = combined.take(pa.array(np.argsort(combined.column("_pos").to_numpy(), kind="stable")))
        uris = combined.column("image_uri").to_pylist()
        if uris != list(self.shard.uris):
            raise RuntimeError(
                f"shard {self.shard.index}: rows do not match the shard's keys; not committing"
            )
        names = [*TAG_TABLE_SCHEMA.names, *(["_thumb"] if keep_thumbs else [])]
        return combined.select(names)


class ShardCommitter:
    """Commits whole shards of one attempt: the Parquet file, then the shard's counts file."""

    def __init__(
        self, writer: TagTableWriter, counts_dir: str, report: RunReport, summary: TagSummary
    ) -> None:
        self.writer, self.counts_dir = writer, counts_dir
        self.report, self.summary = report, summary
        self.seconds = 0.0  # time spent in commit(): Parquet write + rename, counts, report stats

    def commit(self, buf: ShardBuffer) -> str:
        from mlc_ray import storage

        started = time.monotonic()
        table = buf.table(keep_thumbs=True)
        uri = self.writer.commit(table, buf.shard.index, buf.shard.digest)
        codes = Counter(error_code(e) for e in table.column("error").to_pylist() if e)
        label_stats = self.report.on_commit(table, buf.shard.index)
        storage.write_text(
            storage.join(self.counts_dir, f"shard-{buf.shard.index:06d}.json"),
            json.dumps({"rows": table.num_rows, "errors": dict(codes), "file": uri, "labels": label_stats}),
        )
        self.summary.images_this_attempt += table.num_rows
        log.info("committed shard %d (%d rows) -> %s", buf.shard.index, table.num_rows, uri)
        self.seconds += time.monotonic() - started
        return uri


def gather_totals(
    counts_dir: str, digests: list[str], writer: TagTableWriter, labels: list[str], thresholds: Any
) -> tuple[int, Counter, dict]:
    """(rows, errors by code, label totals) over every shard of the run, from the counts files."""
    from mlc_ray import storage

    images = 0
    errors: Counter = Counter()
    totals = empty_totals(len(labels))
    for i, d in enumerate(digests):
        counts_uri = storage.join(counts_dir, f"shard-{i:06d}.json")
        try:
            data = json.loads(storage.read_text(counts_uri))
            rows, codes = int(data["rows"]), Counter(data["errors"])
            label_stats = data.get("labels")
        except FileNotFoundError:  # committed, then killed before its counts were written
            rows, codes, label_stats = 0, Counter(), None
        if label_stats is None:  # that, or counts written before they held label stats
            rows, codes, label_stats = _shard_counts_from_file(writer.uri_for(i, d), labels, thresholds)
        images += rows
        errors.update(codes)
        totals = merge_totals(totals, label_stats)
    return images, errors, totals


def _shard_counts_from_file(uri: str, labels: list[str], thresholds: Any) -> tuple[int, Counter, dict]:
    """Counts of a shard whose counts file is missing (killed between commit and counts): the only
    case that reads a committed file back."""
    import pyarrow.parquet as pq

    from mlc_ray import storage

    fs, path = storage.arrow_filesystem(uri)
    table = pq.read_table(path, columns=["error", "labels", "scores"], filesystem=fs)
    errors = table.column("error").to_pylist()
    stats = shard_label_stats(table, labels, list(thresholds))
    return len(errors), Counter(error_code(e) for e in errors if e), stats

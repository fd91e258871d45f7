"""The report's contact-sheet samples: four bounded selections per label, merged across actors.

Per label, ``SAMPLE_KINDS``: ``top`` (highest scores), ``above`` / ``below`` (the images nearest to
the threshold on each side: where a wrong threshold shows) and ``random`` (a uniform sample of the
label's positives: each URI hashed to [0, 1), the smallest hashes kept, which merges across actors
and resumes). Each selection keeps the ``SAMPLES_PER_KIND`` smallest *keys* (``sample_keys``). A
Predictor actor runs the same selection over the images *it* saw (``ThumbnailSampler``) and makes a
small JPEG thumbnail (``_thumb`` column) only for an image that enters one of its own selections, a
superset of the global one; the driver merges those rows at commit (``SampleSet``, saved as Arrow
IPC beside the run's state so a resumed run keeps its samples).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mlc_ray.tagging.report_stats import scores_matrix

__all__ = [
    "SAMPLE_KINDS",
    "SAMPLES_PER_KIND",
    "THUMB_SIDE",
    "THUMB_COLUMN",
    "uri_hash01",
    "sample_keys",
    "make_thumbnail",
    "ThumbnailSampler",
    "SampleSet",
]

SAMPLE_KINDS = ("top", "above", "below", "random")
SAMPLES_PER_KIND = 8  # thumbnails per kind per label: a contact sheet is 4 rows x 8
THUMB_SIDE = 64  # pixels; JPEG quality 80 makes one ~2 KB
# _thumb: a small JPEG for the rows that enter the run's contact-sheet selections, else null
THUMB_COLUMN = pa.field("_thumb", pa.binary())


def uri_hash01(uris: Sequence[str]) -> np.ndarray:
    """Each URI's 64-bit blake2b hash scaled to [0, 1): a fixed random key per image."""
    out = np.empty(len(uris), dtype=np.float64)
    for i, uri in enumerate(uris):
        out[i] = int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "little") / 2.0**64
    return out


def sample_keys(scores: np.ndarray, thresholds: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """(N, L, 4) keys, one per ``SAMPLE_KINDS``; each selection keeps the smallest, ``inf`` = not a
    candidate. ``top``: -score; ``above``: score - threshold (positives); ``below``: threshold -
    score (negatives); ``random``: the URI's hash (positives)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)[None, :]
    pos = s >= t
    keys = np.empty((*s.shape, len(SAMPLE_KINDS)), dtype=np.float64)
    keys[..., 0] = -s
    keys[..., 1] = np.where(pos, s - t, np.inf)
    keys[..., 2] = np.where(pos, np.inf, t - s)
    keys[..., 3] = np.where(pos, np.asarray(hashes, dtype=np.float64)[:, None], np.inf)
    return keys


def _kth_smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """(..., M) -> (...,): the k-th smallest along the last axis (inf when there are fewer than k)."""
    if keys.shape[-1] < k:
        return np.full(keys.shape[:-1], np.inf)
    return np.partition(keys, k - 1, axis=-1)[..., k - 1]


def make_thumbnail(pixels: np.ndarray, side: int = THUMB_SIDE) -> bytes:
    """(H, W, 3) uint8 -> a small JPEG."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if img.size != (side, side):
        img = img.resize((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


class ThumbnailSampler:
    """Actor-side selection: which rows of a batch get a thumbnail (``_thumb`` column).

    Keeps, per label and kind, the ``k`` smallest keys this actor has seen; a row gets a thumbnail
    when one of its keys beats the current k-th. Cost per batch: one (N, L, 4) key array and a
    partition; a thumbnail only for the few rows that enter (all of them in the first batch).
    """

    def __init__(self, thresholds: Sequence[float], k: int = SAMPLES_PER_KIND) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.k = int(k)
        self.best = np.full((len(self.thresholds), len(SAMPLE_KINDS), 0), np.inf)

    def select(self, scores: np.ndarray, uris: Sequence[str]) -> np.ndarray:
        """(N,) bool: the rows (of the scored images) that enter this actor's selections."""
        if len(uris) == 0:
            return np.zeros(0, dtype=bool)
        keys = sample_keys(scores, self.thresholds, uri_hash01(uris))  # (N, L, 4)
        kth = _kth_smallest(self.best, self.k)  # (L, 4)
        enter = (keys < kth[None]) & np.isfinite(keys)
        merged = np.concatenate([self.best, np.moveaxis(keys, 0, -1)], axis=-1)
        if merged.shape[-1] > self.k:
            merged = np.partition(merged, self.k - 1, axis=-1)[..., : self.k]
        self.best = merged
        return enter.any(axis=(1, 2))

    def thumbnails(self, pixels: np.ndarray, scores: np.ndarray, uris: Sequence[str]) -> list[bytes | None]:
        """A thumbnail for each scored image that enters a selection, else None."""
        chosen = self.select(scores, uris)
        return [make_thumbnail(pixels[i]) if c else None for i, c in enumerate(chosen)]


@dataclass
class _Sample:
    key: float
    uri: str
    score: float
    thumb: bytes


class SampleSet:
    """The driver's merged selections: for each (label, kind) the ``k`` rows with the smallest keys."""

    def __init__(self, labels: Sequence[str], thresholds: Sequence[float], k: int = SAMPLES_PER_KIND) -> None:
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.k = int(k)
        self.items: dict[tuple[int, int], list[_Sample]] = {}
        self.shards: set[int] = set()  # shards whose rows were offered

    def offer(self, table: pa.Table, shard_index: int | None = None) -> None:
        """Merge the rows of ``table`` that carry a ``_thumb`` (scored rows only)."""
        if shard_index is not None:
            self.shards.add(int(shard_index))
        if "_thumb" not in table.column_names:
            return
        thumbs = table.column("_thumb").to_pylist()
        rows, scores = scores_matrix(table, len(self.labels))
        has = np.array([thumbs[r] is not None for r in rows], dtype=bool)
        if not has.any():
            return
        rows, scores = rows[has], scores[has]
        all_uris = table.column("image_uri").to_pylist()
        uris = [all_uris[r] for r in rows]
        keys = sample_keys(scores, self.thresholds, uri_hash01(uris))
        for j in range(len(self.labels)):
            for kind in range(len(SAMPLE_KINDS)):
                col = keys[:, j, kind]
                cand = [
                    _Sample(float(col[i]), uris[i], float(scores[i, j]), thumbs[rows[i]])
                    for i in np.flatnonzero(np.isfinite(col))
                ]
                if not cand:
                    continue
                # a resumed run may offer an image twice: keep it once
                merged = {s.uri: s for s in self.items.get((j, kind), [])}
                for c in cand:
                    if c.uri not in merged or c.key < merged[c.uri].key:
                        merged[c.uri] = c
                self.items[(j, kind)] = sorted(merged.values(), key=lambda s: (s.key, s.uri))[: self.k]

    def get(self, label_index: int, kind: str) -> list[_Sample]:
        return list(self.items.get((label_index, SAMPLE_KINDS.index(kind)), []))

    # Arrow IPC bytes: the merged set is saved after every commit, so a resumed run keeps its samples
    def to_bytes(self) -> bytes:
        rows = [(j, kind, s) for (j, kind), items in self.items.items() for s in items]
        table = pa.table(
            {
                "label": pa.array([j for j, _, _ in rows], pa.int32()),
                "kind": pa.array([kind for _, kind, _ in rows], pa.int8()),
                "key": pa.array([s.key for _, _, s in rows], pa.float64()),
                "uri": pa.array([s.uri for _, _, s in rows], pa.string()),
                "score": pa.array([s.score for _, _, s in rows], pa.float64()),
                "thumb": pa.array([s.thumb for _, _, s in rows], pa.binary()),
            }
        ).replace_schema_metadata(
            {"shards": json.dumps(sorted(self.shards)), "labels": json.dumps(self.labels)}
        )
        sink = io.BytesIO()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()

    def load_bytes(self, data: bytes) -> None:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        meta = table.schema.metadata or {}
        if json.loads(meta.get(b"labels", b"[]")) != self.labels:
            return  # another model's samples: start afresh
        self.shards = set(json.loads(meta.get(b"shards", b"[]")))
        for row in table.to_pylist():
            key = (int(row["label"]), int(row["kind"]))
            self.items.setdefault(key, []).append(_Sample(row["key"], row["uri"], row["score"], row["thumb"]))

"""Which image a tag-table row is: a 64-bit hash of its ``source_etag`` (else its URI), vectorised over
Arrow's buffers, and a seeded order of images that depends only on (image, seed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["key_hash", "seeded_order"]


def key_hash(etags: pa.Array, uris: pa.Array) -> np.ndarray:
    """uint64 identity of each row's image: its ``source_etag``, or its URI when it has none."""
    import pyarrow.compute as pc

    etags = pc.if_else(
        pc.equal(pc.fill_null(etags, ""), ""), pc.binary_join_element_wise("uri:", uris, ""), etags
    )
    return _hash_strings(etags)


_MASK64 = (1 << 64) - 1
_POW_BASE = np.uint64(0x100000001B3)  # FNV's 64-bit prime: an odd multiplier mod 2**64
_POWERS = np.ones(1, dtype=np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the 64 output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_strings(arr: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string, vectorised over Arrow's buffers (no Python string per row):
    a polynomial hash of the bytes mod 2**64 plus the length, through splitmix64's finaliser."""
    global _POWERS
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    if arr.null_count:
        arr = arr.fill_null("")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = (
        np.frombuffer(arr.buffers()[2], dtype=np.uint8)
        if arr.buffers()[2] is not None
        else np.zeros(0, np.uint8)
    )
    start = int(offsets[0])
    rel = offsets - start
    lengths = np.diff(rel)
    nbytes = int(rel[-1])
    longest = int(lengths.max()) if len(lengths) else 0
    if len(_POWERS) < longest:
        with np.errstate(over="ignore"):  # P**0, P**1, ... wrapping mod 2**64
            _POWERS = np.cumprod(np.concatenate([np.ones(1, np.uint64), np.full(longest - 1, _POW_BASE)]))
    h = np.zeros(len(lengths), dtype=np.uint64)
    if nbytes:
        pos = np.arange(nbytes, dtype=np.int64) - np.repeat(rel[:-1], lengths)
        with np.errstate(over="ignore"):
            contrib = (data[start : start + nbytes].astype(np.uint64) + np.uint64(1)) * _POWERS[pos]
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(contrib, rel[:-1][nonempty])
    with np.errstate(over="ignore"):
        return _mix64(h ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


def seeded_order(keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform random order of images that depends only on (image, seed)."""
    with np.errstate(over="ignore"):
        return _mix64(keys ^ np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64))

"""The shadow sample: the N keys under the input with the smallest seeded hashes (a bounded heap while
the listing streams by): uniform, and a function of the seed and the set of keys only."""

from __future__ import annotations

import hashlib
import heapq

__all__ = ["sample_input"]


def _sample_key(seed: int, uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uri}".encode(), digest_size=8).digest(), "big")


def sample_input(uri: str, n: int, seed: int = 0) -> tuple[list[str], int]:
    """(the N sampled URIs in sample order, how many keys were listed): a bottom-k hash sample."""
    from mlc_ray.tagging.inputs import iter_input_keys

    heap: list[tuple[int, str]] = []  # max-heap of the N smallest keys (negated)
    listed = 0
    for page in iter_input_keys(uri):
        for key in page:
            listed += 1
            k = _sample_key(seed, key.uri)
            if len(heap) < n:
                heapq.heappush(heap, (-k, key.uri))
            elif k < -heap[0][0]:
                heapq.heapreplace(heap, (-k, key.uri))
    return [u for _, u in sorted((-k, u) for k, u in heap)], listed

"""The read stage: object bytes for a batch of keys, with the one retry policy of a tagging read.

``read_objects`` is the Ray Data task UDF (threads per task, ``read_threads``); ``read_with_retry``
is one object's attempts: botocore's own retries off, transient errors (throttling, 5xx, resets,
timeouts) retried after a jittered backoff, nothing started after ``--read-deadline-s``; a missing
or forbidden object is not retried. A failed read becomes an ``unreadable`` row, never a failed job.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import pyarrow as pa

from mlc_ray.tagging.config import DEFAULT_READ_DEADLINE_S
from mlc_ray.tagging.table import ERROR_UNREADABLE

__all__ = ["read_objects", "read_with_retry"]

_TRANSIENT_CODES = {
    "SlowDown",
    "503",
    "500",
    "502",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
}


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | ValueError):
        return False
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = str((response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", ""))
        if code in ("NoSuchKey", "404", "403", "AccessDenied", "NoSuchBucket"):
            return False
        return code in _TRANSIENT_CODES or status in _TRANSIENT_CODES
    # connection resets, timeouts, botocore's EndpointConnectionError / ReadTimeoutError, ...
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or "botocore" in type(exc).__module__


def read_with_retry(
    uri: str, retries: int = 5, base_delay: float = 0.2, deadline_s: float = DEFAULT_READ_DEADLINE_S
) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, "unreadable: why"). The one retry policy of a tagging read: at most
    ``retries`` attempts, each a single S3 request (botocore's own retries off) with socket timeouts
    of ``deadline_s``, transient errors retried after a jittered backoff, and no attempt started
    after ``deadline_s`` from the first; a missing/forbidden object is not retried.
    ``read_objects`` also abandons an attempt still hanging at the deadline."""
    from mlc_ray import storage

    start = time.monotonic()
    for attempt in range(1, retries + 1):
        try:
            return storage.read_bytes(uri, single_attempt_timeout_s=deadline_s), None
        except Exception as exc:  # every failure becomes a row, never a failed job
            kind = "not found" if isinstance(exc, FileNotFoundError) else type(exc).__name__
            why = f"{ERROR_UNREADABLE}: {kind}: {exc} (after {attempt} attempt(s))"
            if not _is_transient(exc) or attempt == retries:
                return None, why
            delay = min(10.0, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if time.monotonic() - start + delay >= deadline_s:
                return None, f"{why}; read deadline {deadline_s:g} s (--read-deadline-s) reached"
            time.sleep(delay)
    return None, f"{ERROR_UNREADABLE}: no attempt made"  # retries < 1


def read_objects(
    batch: pa.Table,
    *,
    read_threads: int = 16,
    read_retries: int = 5,
    read_deadline_s: float = DEFAULT_READ_DEADLINE_S,
) -> pa.Table:
    """Ray Data task UDF: add ``data`` (bytes or null) and ``read_error``; fill unknown etags (local
    files, manifest entries) with ``storage.content_hash`` of the bytes. An object still not read
    ``read_deadline_s`` after its first request (a GET held open) is an ``unreadable`` row at that
    moment; its thread is left to its socket timeout (the same deadline) and the task moves on."""
    from mlc_ray import storage

    uris = batch.column("image_uri").to_pylist()
    etags = batch.column("source_etag").to_pylist()
    workers = max(1, min(read_threads, len(uris)))
    started: dict[int, float] = {}

    def read(i: int) -> tuple[bytes | None, str | None]:
        started[i] = time.monotonic()
        return read_with_retry(uris[i], read_retries, deadline_s=read_deadline_s)

    results: list[tuple[bytes | None, str | None]] = [(None, None)] * len(uris)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(read, i): i for i in range(len(uris))}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=min(1.0, read_deadline_s / 4), return_when=FIRST_COMPLETED)
            for fut in done:
                results[futures[fut]] = fut.result()
            now = time.monotonic()
            for fut in [f for f in pending if now - started.get(futures[f], now) > read_deadline_s]:
                pending.discard(fut)
                results[futures[fut]] = (
                    None,
                    f"{ERROR_UNREADABLE}: no answer within the read deadline of {read_deadline_s:g} s "
                    "(--read-deadline-s)",
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    filled = [
        etag if etag or data is None else storage.content_hash(data)
        for etag, (data, _) in zip(etags, results, strict=True)
    ]
    out = batch.set_column(
        batch.schema.get_field_index("source_etag"), "source_etag", pa.array(filled, pa.string())
    )
    out = out.append_column("data", pa.array([d for d, _ in results], pa.binary()))
    return out.append_column("read_error", pa.array([e for _, e in results], pa.string()))

"""One URI layer for local paths and ``s3://``: read, write atomically, list in pages, map keys safely.

Every module that touches data goes through here, so that a job runs unchanged on a laptop
(``./data/demo``) and on a cluster (``s3://bucket/prefix``). URIs are local paths (``/abs``,
``rel/path``, ``file:///abs``) or ``s3://bucket/key``.

S3 honours ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto, on-prem gateways) and the
standard credential chain. boto3 retries in ``standard`` mode with ``MLC_RAY_S3_MAX_ATTEMPTS``
attempts (default 10): a bulk job makes millions of requests and a throttled one must not fail a
shard. Clients are cached per process *id*, because Ray workers fork and a boto3 client or an Arrow
S3 filesystem must not cross a fork.

Choices worth knowing:

* **Atomic writes.** Locally: write ``.<name>.tmp-<uuid>`` in the same folder, then ``os.replace``.
  On S3 ``write_bytes`` is one ``PutObject``: S3 never shows a partially written object under a key,
  so one PUT is already atomic. ``upload_file`` (large files, multipart) uploads to
  ``<folder>/.<name>.tmp-<uuid>``, copies to the final key, then deletes the temp key, so a crash
  never leaves a partial object under the final name (a stray temp key at worst; listings skip
  them, and the leading ``.`` hides them from table readers: pyarrow datasets, Athena, Spark and
  Hive skip names that start with ``.`` or ``_``, so a killed commit cannot duplicate rows).
* **Listings are streams.** ``iter_pages`` yields one page (<= ``page_size`` objects) per S3
  request and walks local folders lazily, one folder at a time, sorted per folder so the order
  is deterministic. A prefix names a *folder*: ``s3://b/images`` lists ``images/...``, not
  ``images2/...``.
* **ETags.** S3 listings carry the object's ETag (quotes stripped). Local listings carry
  ``etag=""``: hashing every file while listing would read the whole data set on the driver.
  Where a change detector for a local file is needed (the tag table's ``source_etag``), call
  ``content_etag(uri)`` or ``content_hash(data)`` on bytes already read, in the worker.
* **Errors a user can act on.** A missing object is ``FileNotFoundError`` naming the URI; a
  missing bucket is ``BucketNotFoundError`` naming the bucket and the endpoint; an endpoint that
  does not answer is ``StorageUnreachableError``; missing credentials ``StorageCredentialsError``.

Why one module of ~650 lines: it is one contract (a URI -> bytes, an atomic write, a stream of
listing pages) and nearly every function has a local half and an S3 half that share the URI
parsing, the per-process client cache and the S3 error translation above them. Split by backend,
each operation would live in two files that must change together; split by operation, every piece
would import the clients and the error translation anyway. The sections below (URIs, clients, S3
errors, read/write, listing, keys -> local paths) are the seams if it ever grows further.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mlc_ray.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = [
    "ObjectInfo",
    "BucketNotFoundError",
    "StorageUnreachableError",
    "StorageCredentialsError",
    "InvalidURIError",
    "LocalPathError",
    "check_local_dir",
    "is_s3",
    "join",
    "parent",
    "absolute",
    "resolve",
    "exists",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "upload_file",
    "download_file",
    "delete",
    "iter_pages",
    "iter_objects",
    "content_hash",
    "content_etag",
    "arrow_filesystem",
    "safe_local_path",
    "s3_client",
    "s3_endpoint",
    "reset_clients",
    "is_temp_name",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 10
# Set on purpose, not left to botocore: an endpoint that accepts a connection and never answers
# costs an attempt at most this long (then the retry layers above treat it as transient).
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
_TEMP_MARK = ".tmp-"
_TEMP_RE = re.compile(r"\.tmp-[0-9a-f]{32}$")


class BucketNotFoundError(FileNotFoundError):
    """The bucket does not exist (or this endpoint/credential cannot see it)."""


class StorageUnreachableError(UserError, ConnectionError):
    """The S3 endpoint did not answer (wrong AWS_ENDPOINT_URL, server down, no network)."""


class StorageCredentialsError(UserError, PermissionError):
    """No AWS credentials were found for an s3:// URI."""


class LocalPathError(UserError, NotADirectoryError):
    """A local write whose folder cannot be made: a file is where a folder of the path should be."""


class InvalidURIError(UserError, ValueError):
    """Not a usable URI (e.g. ``s3:///key``: no bucket); a user error, shown as one line by the jobs."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its full URI, size in bytes, and ETag (S3; ``""`` for local files)."""

    uri: str
    size: int
    etag: str


# ----------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidURIError(f"bad S3 URI {uri!r}: expected s3://bucket/key")
    key = uri[len("s3://") + len(parsed.netloc) :].lstrip("/")
    return parsed.netloc, key


_SCHEME_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3:/b, S3://b, gs://b, file:/x, https://h


def _local(uri: str) -> str:
    uri = str(uri)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if _SCHEME_LIKE.match(uri):  # taken as a local path, it would be a folder named "s3:" in the cwd
        raise InvalidURIError(
            f"{uri!r} is neither a local path nor an s3://bucket/key URI (mlc_ray reads and writes "
            "local paths, file:// and s3:// only; check the scheme's spelling)"
        )
    return uri


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI of either kind; parts are relative (leading '/' is ignored)."""
    uri = str(uri)
    parts_clean = [str(p).strip("/") if is_s3(uri) else str(p).lstrip("/") for p in parts if str(p)]
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p for p in parts_clean if p]])
    return os.path.join(uri, *parts_clean)


def parent(uri: str) -> str:
    """The folder holding ``uri``: the s3:// prefix before its last key part, or an absolute local folder."""
    uri = str(uri)
    if is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(_local(uri)))


def absolute(uri: str) -> str:
    """``uri`` with ``file://`` dropped and a local path made absolute; an s3:// URI unchanged."""
    uri = str(uri)
    return uri if is_s3(uri) else os.path.abspath(_local(uri))


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve(path: str, base: str) -> str:
    """A path or URI found in a file -> an absolute, normalised URI; relative paths are relative to
    ``base`` (a local folder or an s3:// prefix). ``ValueError`` for another URI scheme, or for a
    relative path that climbs above the bucket root of an s3:// ``base``."""
    if path.startswith("file://"):
        return os.path.normpath(path[len("file://") :])
    if is_s3(path):
        bucket, _, key = path[len("s3://") :].partition("/")
        return f"s3://{bucket}/{posixpath.normpath(key)}" if key else path
    if _SCHEME.match(path):
        raise ValueError(f"unsupported URI scheme in '{path}' (use a local path or s3://)")
    if os.path.isabs(path):
        return os.path.normpath(path)
    if is_s3(base):
        bucket, _, prefix = base[len("s3://") :].partition("/")
        key = posixpath.normpath(posixpath.join(prefix, path))
        if key.startswith("../") or key == "..":
            raise ValueError(f"'{path}' points above the bucket root of {base}")
        return f"s3://{bucket}/{key}"
    return os.path.normpath(os.path.join(base, path))


def is_temp_name(name: str) -> bool:
    """True for the in-flight temp names this module writes (``.<name>.tmp-<32 hex>``)."""
    return bool(_TEMP_RE.search(name))


def _temp_name(name: str) -> str:
    # hidden (leading '.') beside the target: readers of a folder/partition never pick it up
    folder, sep, base = name.rpartition("/")
    return f"{folder}{sep}.{base}{_TEMP_MARK}{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------------------------
# clients (cached per process id: Ray workers fork, and clients must not cross a fork)

_lock = threading.Lock()
_clients: dict[Any, Any] = {}  # pid, or (pid, single-attempt timeout) -> client
_arrow_fs: dict[int, Any] = {}
_known_buckets: set[tuple[int, str]] = set()


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS's own endpoints."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _max_attempts() -> int:
    raw = os.environ.get("MLC_RAY_S3_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"MLC_RAY_S3_MAX_ATTEMPTS must be an integer, got {raw!r}") from None
    return max(1, value)


def _where() -> str:
    return s3_endpoint() or "the default AWS endpoint"


def s3_client(single_attempt_timeout_s: float | None = None) -> Any:
    """A boto3 S3 client for this process (retry mode 'standard', raised attempts, 32 connections).

    ``single_attempt_timeout_s``: a client that makes exactly one attempt per call (botocore's retries
    off) with connect/read timeouts of at most that many seconds, for a caller that runs its own
    retry policy under a deadline (tagging's ``read_with_retry``): retries are never stacked.
    """
    pid = os.getpid()
    key: Any = pid if single_attempt_timeout_s is None else (pid, float(single_attempt_timeout_s))
    client = _clients.get(key)
    if client is not None:
        return client
    with _lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            endpoint = s3_endpoint()
            if single_attempt_timeout_s is None:
                retries = {"mode": "standard", "max_attempts": _max_attempts()}
                connect, read = CONNECT_TIMEOUT_S, READ_TIMEOUT_S
            else:
                retries = {"mode": "standard", "total_max_attempts": 1}
                connect = min(CONNECT_TIMEOUT_S, single_attempt_timeout_s)
                read = min(READ_TIMEOUT_S, single_attempt_timeout_s)
            config = Config(
                retries=retries,
                connect_timeout=connect,
                read_timeout=read,
                max_pool_connections=32,
                # custom endpoints (moto, MinIO, gateways) address buckets by path, not by DNS name
                s3={"addressing_style": "path"} if endpoint else None,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=config)
            for stale in [k for k in _clients if (k[0] if isinstance(k, tuple) else k) != pid]:
                del _clients[stale]  # entries for other pids are a parent's, inherited through fork
            _clients[key] = client
    return client


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Parquet/Arrow reads and writes of ``uri``.

    Writes through it are *not* atomic: write to a local temp file and ``upload_file`` it, or
    write a temp path and commit it, when readers may see the result while it is being written.
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(_local(uri))
    bucket, key = _split_s3(uri)
    pid = os.getpid()
    fs = _arrow_fs.get(pid)
    if fs is None:
        with _lock:
            fs = _arrow_fs.get(pid)
            if fs is None:
                kwargs: dict[str, Any] = {
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_max_attempts()),
                    "connect_timeout": CONNECT_TIMEOUT_S,
                    "request_timeout": READ_TIMEOUT_S,
                }
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if region:
                    kwargs["region"] = region
                endpoint = s3_endpoint()
                if endpoint:
                    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
                    kwargs["scheme"] = parsed.scheme
                    kwargs["endpoint_override"] = parsed.netloc
                fs = pafs.S3FileSystem(**kwargs)
                _arrow_fs.clear()
                _arrow_fs[pid] = fs
    return fs, f"{bucket}/{key}" if key else bucket


def reset_clients() -> None:
    """Forget cached clients (call after changing AWS_* environment variables, e.g. in tests)."""
    with _lock:
        _clients.clear()
        _arrow_fs.clear()
        _known_buckets.clear()


# ----------------------------------------------------------------------------------------------
# S3 error translation


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _missing_bucket(bucket: str) -> BucketNotFoundError:
    return BucketNotFoundError(
        f"bucket '{bucket}' does not exist or is not reachable at {_where()}; "
        "check the s3:// URI, AWS_ENDPOINT_URL and the credentials"
    )


@contextlib.contextmanager
def _s3_errors(uri: str, bucket: str) -> Iterator[None]:
    """Turn botocore errors into the errors this module promises, each naming the URI."""
    from botocore import exceptions as bex

    try:
        yield
    except bex.ClientError as exc:
        code = _error_code(exc)
        if code == "NoSuchBucket":
            raise _missing_bucket(bucket) from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(errno.ENOENT, "no such object", uri) from None
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(
                f"access denied to {uri} at {_where()} ({code}); check the credentials and bucket policy"
            ) from None
        raise
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError) as exc:
        raise StorageUnreachableError(
            f"S3 endpoint {_where()} is not reachable for {uri} ({type(exc).__name__}); "
            "check AWS_ENDPOINT_URL and that the server is running"
        ) from None
    except bex.NoCredentialsError:
        raise StorageCredentialsError(
            f"no AWS credentials for {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            "or an instance role"
        ) from None


def _check_bucket(bucket: str, uri: str) -> None:
    """Raise BucketNotFoundError when ``bucket`` is missing (one HEAD per bucket and process)."""
    marker = (os.getpid(), bucket)
    if marker in _known_buckets:
        return
    from botocore import exceptions as bex

    with _s3_errors(uri, bucket):
        try:
            s3_client().head_bucket(Bucket=bucket)
        except bex.ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise _missing_bucket(bucket) from None
            raise
    _known_buckets.add(marker)


# ----------------------------------------------------------------------------------------------
# read / write


def exists(uri: str) -> bool:
    """True when the object (S3) or file/folder (local) exists; a missing bucket is an error."""
    if not is_s3(uri):
        return os.path.exists(_local(uri))
    bucket, key = _split_s3(uri)
    try:
        with _s3_errors(uri, bucket):
            s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        # HEAD cannot tell a missing key from a missing bucket; a missing bucket is a user error
        _check_bucket(bucket, uri)
        return False


def check_local_dir(uri: str, what: str, *, for_file: bool = False) -> None:
    """A local folder a job will write under (``what``: its flag, e.g. ``--output``) must be a folder
    or creatable as one (``for_file``: ``uri`` is a file to write, its folder is checked): a UserError
    saying which part of the path is in the way, before anything is written. S3 URIs pass (a missing
    bucket is reported by the first read or write)."""
    if is_s3(uri):
        return
    path = os.path.abspath(_local(uri))
    if for_file and os.path.isdir(path):
        raise UserError(f"{what} {uri}: is a folder; give a file name")
    probe = _nearest_existing(os.path.dirname(path) if for_file else path)
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise UserError(f"{what} {uri}: {where}; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {uri}: {probe} is not writable by this job; give a folder it can write")


def read_bytes(uri: str, *, single_attempt_timeout_s: float | None = None) -> bytes:
    """The whole object; ``FileNotFoundError`` when it is missing. ``single_attempt_timeout_s``: one
    S3 attempt, no botocore retries, socket timeouts of at most that (see ``s3_client``)."""
    if not is_s3(uri):
        with open(_local(uri), "rb") as fh:
            return fh.read()
    bucket, key = _split_s3(uri)
    with _s3_errors(uri, bucket):
        client = s3_client(single_attempt_timeout_s)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def _local_atomic_target(path: str) -> str:
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
        in_the_way = _nearest_existing(folder)
        raise LocalPathError(f"cannot write {path}: {in_the_way} is a file, not a folder") from None
    return path


def _nearest_existing(path: str) -> str:
    """``path`` or the nearest of its parents that exists (a file there blocks every folder below it)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old object or the whole new one, never a part.

    Locally: a temp file in the same folder, then ``os.replace``. On S3: one PutObject (atomic per key).
    """
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri, bucket):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = _local_atomic_target(_local(uri))
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def upload_file(local_path: str | os.PathLike[str], uri: str) -> None:
    """Copy a local file to ``uri`` atomically (S3: temp key, copy to the final key, delete temp)."""
    src = os.fspath(local_path)
    if not os.path.isfile(src):
        raise FileNotFoundError(errno.ENOENT, "no such file to upload", src)
    if not is_s3(uri):
        path = _local_atomic_target(_local(uri))
        tmp = _temp_name(path)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    bucket, key = _split_s3(uri)
    tmp_key = _temp_name(key)
    client = s3_client()
    from boto3.exceptions import S3UploadFailedError

    with _s3_errors(uri, bucket):
        try:
            try:
                client.upload_file(src, bucket, tmp_key)
            except S3UploadFailedError:
                _check_bucket(bucket, uri)  # the transfer manager hides NoSuchBucket in its message
                raise
            # managed copy: multipart UploadPartCopy above 5 GB, where one CopyObject would fail
            client.copy({"Bucket": bucket, "Key": tmp_key}, bucket, key)
        finally:
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=bucket, Key=tmp_key)


def download_file(uri: str, local_path: str | os.PathLike[str]) -> None:
    """Copy ``uri`` to a local file atomically (temp file in the target folder, then os.replace)."""
    path = _local_atomic_target(os.fspath(local_path))
    tmp = _temp_name(path)
    try:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            try:
                with _s3_errors(uri, bucket):
                    s3_client().download_file(bucket, key, tmp)
            except FileNotFoundError:
                _check_bucket(bucket, uri)  # the transfer manager HEADs first: 404 for either
                raise
        else:
            shutil.copyfile(_local(uri), tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def delete(uri: str) -> None:
    """Delete one object/file; a missing one is fine (delete is idempotent)."""
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(uri))
        return
    bucket, key = _split_s3(uri)
    with _s3_errors(uri, bucket):
        s3_client().delete_object(Bucket=bucket, Key=key)


def content_hash(data: bytes) -> str:
    """Content ETag of bytes already in memory: sha256, first 32 hex digits."""
    return hashlib.sha256(data).hexdigest()[:32]


def content_etag(uri: str) -> str:
    """Content hash of an object (``content_hash`` of its bytes): the change detector for local files."""
    return content_hash(read_bytes(uri))


# ----------------------------------------------------------------------------------------------
# listing: a stream of pages


def _normalize_suffixes(suffixes: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if suffixes is None:
        return None
    if isinstance(suffixes, str):
        suffixes = [suffixes]
    out = tuple(s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes)
    return out or None


def _wanted(name: str, suffixes: tuple[str, ...] | None) -> bool:
    if is_temp_name(name):
        return False
    return suffixes is None or name.lower().endswith(suffixes)


def _walk_local(folder: str) -> Iterator[os.DirEntry[str]]:
    """Files under ``folder``, depth first, sorted by name within each folder; lazy per folder."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except (NotADirectoryError, FileNotFoundError):  # removed while we listed
        return
    except PermissionError:
        log.warning("cannot list %s (permission denied); skipping it", folder)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_local(entry.path)
        elif entry.is_file():
            yield entry


def _iter_local_pages(
    prefix: str, page_size: int, suffixes: tuple[str, ...] | None
) -> Iterator[list[ObjectInfo]]:
    folder = _local(prefix)
    scheme = "file://" if str(prefix).startswith("file://") else ""
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "no such folder to list", str(prefix))
    page: list[ObjectInfo] = []
    for entry in _walk_local(folder):
        if not _wanted(entry.name, suffixes):
            continue
        try:
            size = entry.stat().st_size
        except FileNotFoundError:  # deleted while we listed
            continue
        page.append(ObjectInfo(uri=scheme + entry.path, size=size, etag=""))
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


def _iter_s3_pages(
    prefix: str, page_size: int, suffixes: tuple[str, ...] | None
) -> Iterator[list[ObjectInfo]]:
    bucket, key = _split_s3(prefix)
    if key and not key.endswith("/"):
        key += "/"
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=key, PaginationConfig={"PageSize": page_size})
    iterator = iter(pages)
    while True:
        with _s3_errors(prefix, bucket):
            response = next(iterator, None)
        if response is None:
            return
        page = [
            ObjectInfo(uri=f"s3://{bucket}/{obj['Key']}", size=int(obj["Size"]), etag=obj["ETag"].strip('"'))
            for obj in response.get("Contents", ())
            if not obj["Key"].endswith("/") and _wanted(obj["Key"].rsplit("/", 1)[-1], suffixes)
        ]
        if page:
            yield page


def iter_pages(
    prefix: str, page_size: int = 1000, suffixes: Iterable[str] | str | None = None
) -> Iterator[list[ObjectInfo]]:
    """List everything under the folder ``prefix`` as a stream of pages of at most ``page_size``.

    S3: one ListObjectsV2 request per page, in key order; pages emptied by the ``suffixes`` filter
    are skipped. Local: a lazy, depth-first walk sorted per folder; a missing folder raises
    ``FileNotFoundError`` (S3 has no folders: an empty prefix yields no pages). ``suffixes``
    (e.g. ``(".jpg", ".png")``) match the lowercased name. This module's temp files are never listed.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size} (S3 returns at most 1000 per page)")
    wanted = _normalize_suffixes(suffixes)
    if is_s3(prefix):
        return _iter_s3_pages(prefix, page_size, wanted)
    return _iter_local_pages(prefix, page_size, wanted)


def iter_objects(
    prefix: str, page_size: int = 1000, suffixes: Iterable[str] | str | None = None
) -> Iterator[ObjectInfo]:
    """``iter_pages`` flattened: one ObjectInfo at a time, still streamed."""
    for page in iter_pages(prefix, page_size=page_size, suffixes=suffixes):
        yield from page


# ----------------------------------------------------------------------------------------------
# keys -> local paths


def safe_local_path(root: str | os.PathLike[str], key: str) -> Path:
    """``root/key`` as a local path, or ValueError when ``key`` could escape ``root``.

    Rejects empty keys, absolute keys, ``..`` segments, NUL bytes, and keys that resolve outside
    ``root`` through a symlink. Use it whenever an object key or manifest entry becomes a file name.
    """
    key_str = str(key)
    if not key_str or key_str.strip("/\\") == "":
        raise ValueError(f"key {key!r} is empty; expected a relative path like 'images/a.jpg'")
    if "\x00" in key_str:
        raise ValueError(f"key {key!r} contains a NUL byte")
    if key_str.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", key_str):
        raise ValueError(f"key {key!r} is absolute; only relative keys may be mapped under {root}")
    if any(part == ".." for part in re.split(r"[/\\]", key_str)):
        raise ValueError(f"key {key!r} contains '..' and could escape {root}")
    base = Path(os.fspath(root)).resolve()
    candidate = base / key_str
    resolved = candidate.resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise ValueError(f"key {key!r} resolves to {resolved}, outside {base}")
    return candidate

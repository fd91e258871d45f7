"""mlc_ray.storage against a real S3 server (moto in its own process): same API as local paths."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlc_ray import storage

pytestmark = pytest.mark.integration


def _keys(bucket: str, prefix: str = "") -> list[str]:
    client = storage.s3_client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", ())]
    return out


def test_roundtrip_exists_delete(s3_bucket: str) -> None:
    uri = storage.join(f"s3://{s3_bucket}", "a/b.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "h\u00e9llo")
    assert storage.exists(uri)
    assert storage.read_text(uri) == "h\u00e9llo"
    storage.delete(uri)
    storage.delete(uri)  # idempotent
    assert not storage.exists(uri)


def test_read_missing_key_is_file_not_found(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/nope.jpg"
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(uri)
    assert info.value.filename == uri


def test_missing_bucket_names_bucket_and_endpoint(s3_server, tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"x")
    for call in (
        lambda: storage.read_bytes("s3://no-such-bucket-xyz/k"),
        lambda: storage.exists("s3://no-such-bucket-xyz/k"),
        lambda: storage.write_bytes("s3://no-such-bucket-xyz/k", b"x"),
        lambda: list(storage.iter_pages("s3://no-such-bucket-xyz/p")),
        lambda: storage.upload_file(tmp_path / "f.bin", "s3://no-such-bucket-xyz/k"),
        lambda: storage.download_file("s3://no-such-bucket-xyz/k", tmp_path / "g.bin"),
    ):
        with pytest.raises(storage.BucketNotFoundError) as info:
            call()
        message = str(info.value)
        assert "bucket 'no-such-bucket-xyz' does not exist" in message
        assert s3_server.endpoint in message


@pytest.fixture
def dead_endpoint(s3_server) -> Iterator[str]:
    """Point storage at a port where nothing listens (one attempt, so the test is quick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "MLC_RAY_S3_MAX_ATTEMPTS")}
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    os.environ["MLC_RAY_S3_MAX_ATTEMPTS"] = "1"
    storage.reset_clients()
    yield os.environ["AWS_ENDPOINT_URL"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage.reset_clients()


def test_unreachable_endpoint_is_a_clear_error(dead_endpoint: str) -> None:
    with pytest.raises(storage.StorageUnreachableError) as info:
        storage.read_bytes("s3://bucket/key")
    assert dead_endpoint in str(info.value)
    assert "AWS_ENDPOINT_URL" in str(info.value)


def test_upload_is_atomic_and_leaves_no_temp_key(s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(256 * 1024))
    uri = f"s3://{s3_bucket}/models/big.bin"
    storage.upload_file(src, uri)
    assert _keys(s3_bucket) == ["models/big.bin"]
    storage.download_file(uri, tmp_path / "back" / "big.bin")
    assert (tmp_path / "back" / "big.bin").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["big.bin"]


def test_listing_skips_temp_keys_and_filters_suffixes(s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/data"
    for name in ("a.JPG", "b.png", "c.txt", "sub/d.jpeg", "x.jpg.tmp-" + "0" * 32):
        storage.write_bytes(storage.join(root, name), b"1234")
    storage.write_bytes(f"s3://{s3_bucket}/data2/e.jpg", b"not under data/")
    objs = list(storage.iter_objects(root, suffixes=(".jpg", ".png", ".jpeg")))
    assert [o.uri for o in objs] == [f"{root}/a.JPG", f"{root}/b.png", f"{root}/sub/d.jpeg"]
    assert all(o.size == 4 and len(o.etag) == 32 and '"' not in o.etag for o in objs)


def test_arrow_filesystem_writes_and_reads_parquet(s3_bucket: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": ["a", "b"], "width": pa.array([1, 2], pa.int32())})
    fs, path = storage.arrow_filesystem(f"s3://{s3_bucket}/t/part-0.parquet")
    assert path == f"{s3_bucket}/t/part-0.parquet"
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.exists(f"s3://{s3_bucket}/t/part-0.parquet")


def _put_empty(bucket: str, keys: list[str]) -> None:
    client = storage.s3_client()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b""), keys))


def test_listing_2500_keys_streams_in_pages(s3_bucket: str) -> None:
    # 2,500 keys (not 100,000: moto takes ~250 PUT/s here); benchmarks/listing.py measures 100,000
    keys = [f"many/{i:06d}.jpg" for i in range(2500)]
    _put_empty(s3_bucket, keys)

    requests: list[str] = []
    client = storage.s3_client()

    def count(**kwargs) -> None:
        requests.append(kwargs.get("event_name", ""))

    client.meta.events.register("before-send.s3.ListObjectsV2", count)
    try:
        pages = storage.iter_pages(f"s3://{s3_bucket}/many", page_size=500)
        assert requests == []  # nothing is listed before the first page is asked for
        first = next(pages)
        assert len(first) == 500 and len(requests) == 1  # one page costs one request, no read-ahead
        rest = list(pages)
    finally:
        client.meta.events.unregister("before-send.s3.ListObjectsV2", count)
    assert len(requests) == 5
    all_pages = [first, *rest]
    assert [len(p) for p in all_pages] == [500] * 5
    assert [o.uri for p in all_pages for o in p] == [f"s3://{s3_bucket}/{k}" for k in keys]

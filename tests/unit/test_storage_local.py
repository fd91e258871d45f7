"""mlc_ray.storage on local paths: atomic writes, safe key mapping, paged listing, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlc_ray import storage


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_write_read_roundtrip_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b" / "c.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")  # replace
    storage.write_text(str(tmp_path / "t.txt"), "h\u00e9llo")
    assert storage.read_bytes(uri) == b"two"
    assert storage.read_text(str(tmp_path / "t.txt")) == "h\u00e9llo"
    assert _files(tmp_path) == ["a/b/c.bin", "t.txt"]


def test_file_scheme_is_accepted(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/x.txt"
    storage.write_text(uri, "x")
    assert storage.exists(uri)
    assert (tmp_path / "x.txt").read_text() == "x"


def test_failed_write_keeps_old_content_and_no_temp(tmp_path: Path) -> None:
    uri = str(tmp_path / "f.txt")
    storage.write_text(uri, "old")

    with pytest.raises(TypeError):
        storage.write_bytes(uri, object())  # type: ignore[arg-type]  # fails mid-write
    assert storage.read_text(uri) == "old"
    assert _files(tmp_path) == ["f.txt"]


def test_upload_and_download_are_atomic_copies(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    storage.upload_file(src, str(tmp_path / "up" / "dst.bin"))
    storage.download_file(str(tmp_path / "up" / "dst.bin"), tmp_path / "down" / "got.bin")
    assert (tmp_path / "down" / "got.bin").read_bytes() == b"payload"
    assert _files(tmp_path) == ["down/got.bin", "src.bin", "up/dst.bin"]
    with pytest.raises(FileNotFoundError):
        storage.upload_file(tmp_path / "nope.bin", str(tmp_path / "x.bin"))


def test_read_missing_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(str(tmp_path / "missing.jpg"))
    assert info.value.filename == str(tmp_path / "missing.jpg")
    assert not storage.exists(str(tmp_path / "missing.jpg"))


def test_delete_is_idempotent(tmp_path: Path) -> None:
    uri = str(tmp_path / "d.txt")
    storage.write_text(uri, "x")
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)


def test_join() -> None:
    assert storage.join("s3://b", "x", "y.jpg") == "s3://b/x/y.jpg"
    assert storage.join("s3://b/p/", "/x/") == "s3://b/p/x"
    assert storage.join("/data/root", "images/a.jpg") == "/data/root/images/a.jpg"
    assert storage.join("/data/root", "/abs") == "/data/root/abs"  # parts are relative
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3://")


@pytest.mark.parametrize(
    "key",
    [
        "../escape.txt",
        "a/../../escape",
        "/etc/passwd",
        "\\\\server\\share",
        "a\x00b",
        "",
        "C:/x",
        "a\\..\\..\\b",
    ],
)
def test_safe_local_path_rejects_traversal(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError) as info:
        storage.safe_local_path(tmp_path, key)
    assert repr(key) in str(info.value)


def test_safe_local_path_rejects_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        storage.safe_local_path(root, "link/secret.txt")


def test_safe_local_path_accepts_nested_keys(tmp_path: Path) -> None:
    path = storage.safe_local_path(tmp_path, "a/b/c.jpg")
    assert path == tmp_path.resolve() / "a" / "b" / "c.jpg"
    assert storage.safe_local_path(tmp_path, "a/./b.jpg").resolve() == tmp_path.resolve() / "a" / "b.jpg"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """23 files in nested folders, mixed-case extensions, plus a stray temp file."""
    for i in range(10):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / f"{i:02d}.jpg").write_bytes(b"x" * i)
    for i in range(10):
        (tmp_path / "a" / "deep").mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / "deep" / f"{i:02d}.PNG").write_bytes(b"y")
    (tmp_path / "notes.txt").write_text("n")
    (tmp_path / "c.JPEG").write_bytes(b"z")
    (tmp_path / "top.jpg").write_bytes(b"t")
    (tmp_path / ("half.jpg.tmp-" + "0" * 32)).write_bytes(b"partial")  # an interrupted write
    return tmp_path


def test_iter_pages_pages_sorted_and_complete(tree: Path) -> None:
    pages = list(storage.iter_pages(str(tree), page_size=4))
    assert [len(p) for p in pages] == [4, 4, 4, 4, 4, 3]
    uris = [o.uri for p in pages for o in p]
    expected = (
        [str(tree / "a" / "deep" / f"{i:02d}.PNG") for i in range(10)]
        + [str(tree / "b" / f"{i:02d}.jpg") for i in range(10)]
        + [str(tree / "c.JPEG"), str(tree / "notes.txt"), str(tree / "top.jpg")]
    )
    assert uris == expected  # temp file skipped, deterministic order
    sizes = {o.uri: o.size for p in pages for o in p}
    assert sizes[str(tree / "b" / "07.jpg")] == 7
    assert all(o.etag == "" for p in pages for o in p)


def test_iter_pages_suffix_filter_is_case_insensitive(tree: Path) -> None:
    images = list(storage.iter_objects(str(tree), suffixes=(".jpg", "png", ".jpeg")))
    assert len(images) == 22
    assert not any(o.uri.endswith(".txt") for o in images)


def test_iter_pages_is_lazy(tree: Path) -> None:
    pages = storage.iter_pages(str(tree), page_size=2)
    first = next(pages)
    assert len(first) == 2
    # written after the listing started, into a folder the walk has not opened yet
    (tree / "b" / "zz_late.jpg").write_bytes(b"late")
    rest = [o.uri for p in pages for o in p]
    assert str(tree / "b" / "zz_late.jpg") in rest
    assert len(rest) == 23 + 1 - 2


def test_iter_pages_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        next(storage.iter_pages(str(tmp_path / "nope")))
    with pytest.raises(ValueError):
        storage.iter_pages(str(tmp_path), page_size=0)


def test_content_etag_is_a_content_hash(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    storage.write_bytes(a, b"same")
    storage.write_bytes(b, b"same")
    assert storage.content_etag(a) == storage.content_etag(b) == storage.content_hash(b"same")
    assert len(storage.content_etag(a)) == 32
    storage.write_bytes(b, b"other")
    assert storage.content_etag(a) != storage.content_etag(b)


def test_arrow_filesystem_local(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"x": [1, 2]}), path, filesystem=fs)
    assert os.path.isabs(path)
    assert pq.read_table(path, filesystem=fs)["x"].to_pylist() == [1, 2]

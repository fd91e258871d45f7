"""storage.parent / absolute / resolve: the URI arithmetic manifests (and anything reading paths from a
file) use, for local paths and s3:// alike. Pure string work: no file system, no S3."""

from __future__ import annotations

import os

import pytest

from mlc_ray import storage


def test_parent_and_absolute() -> None:
    assert storage.parent("s3://b/data/m.csv") == "s3://b/data"
    assert storage.parent("s3://b/data/") == "s3://b"
    assert storage.parent("/d/m.csv") == "/d"
    assert storage.parent("file:///d/m.csv") == "/d"
    assert storage.parent("m.csv") == os.getcwd()
    assert storage.absolute("file:///d/x/../m.csv") == "/d/m.csv"
    assert storage.absolute("rel/m.csv") == os.path.join(os.getcwd(), "rel/m.csv")
    assert storage.absolute("s3://b/k") == "s3://b/k"


@pytest.mark.parametrize(
    ("path", "base", "expected"),
    [
        ("img/a.jpg", "/data", "/data/img/a.jpg"),
        ("../a.jpg", "/data/sub", "/data/a.jpg"),
        ("/abs/./a.jpg", "/data", "/abs/a.jpg"),
        ("file:///abs/a.jpg", "/data", "/abs/a.jpg"),
        ("img/a.jpg", "s3://b/data", "s3://b/data/img/a.jpg"),
        ("../a.jpg", "s3://b/data/sub", "s3://b/data/a.jpg"),
        ("s3://other/x/../a.jpg", "/data", "s3://other/a.jpg"),
        ("s3://bucket", "/data", "s3://bucket"),
    ],
)
def test_resolve(path: str, base: str, expected: str) -> None:
    assert storage.resolve(path, base) == expected


def test_resolve_refuses_other_schemes_and_climbing_out_of_the_bucket() -> None:
    with pytest.raises(ValueError, match="unsupported URI scheme in 'http://x/a.jpg'"):
        storage.resolve("http://x/a.jpg", "/data")
    with pytest.raises(ValueError, match="points above the bucket root of s3://b/data"):
        storage.resolve("../../a.jpg", "s3://b/data")


def test_a_misspelt_scheme_is_an_error_not_a_local_folder(tmp_path, monkeypatch) -> None:
    from mlc_ray.storage import InvalidURIError

    monkeypatch.chdir(tmp_path)
    for uri in ("s3:/bucket/key", "S3://bucket/key", "gs://bucket/key", "s3a://bucket/key", "https://h/x"):
        with pytest.raises(InvalidURIError, match="is neither a local path nor an s3://bucket/key URI"):
            storage.write_text(uri, "x")
        with pytest.raises(InvalidURIError):
            storage.exists(uri)
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" (or "gs:") was made
    storage.write_text("file://" + str(tmp_path / "ok.txt"), "x")  # file:// and plain paths still work
    storage.write_text(str(tmp_path / "a:b.txt"), "x")  # a colon inside a name is not a scheme
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a:b.txt", "ok.txt"]

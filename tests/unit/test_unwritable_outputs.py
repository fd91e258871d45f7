"""A folder a job cannot write is one clear error naming its flag, whether found before the first
write (``storage.check_local_dir``) or by the write itself (a full disk, a path the OS refuses).

The jobs' command-line cases (a file given as ``--output`` / ``--storage-path`` / ``--input``) are in
test_job_errors.py; these are the functions under them.
"""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlc_ray import storage
from mlc_ray.config import ConfigError
from mlc_ray.errors import UserError

pytestmark = pytest.mark.unit


def test_check_local_dir_says_which_part_of_the_path_is_in_the_way(tmp_path: Path) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("x")
    storage.check_local_dir(str(tmp_path), "--output")  # an existing folder
    storage.check_local_dir(str(tmp_path / "new" / "deeper"), "--output")  # creatable
    storage.check_local_dir("s3://bucket/prefix", "--output")  # S3: left to the first write
    with pytest.raises(UserError, match=r"^--output .*a_file: is a file; give a folder$"):
        storage.check_local_dir(str(afile), "--output")
    with pytest.raises(
        UserError, match=r"^--storage-path .*a_file/x/y: cannot be created: .*a_file is a file"
    ):
        storage.check_local_dir(str(afile / "x" / "y"), "--storage-path")
    with pytest.raises(UserError, match="is a file"):
        storage.check_local_dir(f"file://{afile}", "--output")
    # a file to write: its folder is checked, and the message names the file given
    storage.check_local_dir(str(tmp_path / "new" / "report.parquet"), "--report", for_file=True)
    with pytest.raises(
        UserError, match=r"^--report .*a_file/report.parquet: cannot be created: .*a_file is a file"
    ):
        storage.check_local_dir(str(afile / "report.parquet"), "--report", for_file=True)
    with pytest.raises(UserError, match=r"^--report .*: is a folder; give a file name$"):
        storage.check_local_dir(str(tmp_path), "--report", for_file=True)
    assert list(tmp_path.iterdir()) == [afile]  # nothing created by the checks


def _disk_full(uri: str, text: str, encoding: str = "utf-8") -> None:
    raise OSError(errno.ENOSPC, "No space left on device", uri)


def test_run_state_that_cannot_be_written_names_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlc_ray.tagging.state import RunState

    state = RunState.new(
        run_id="r1", model="models:/m/1", input="in", output=str(tmp_path / "tags"), config={}
    )
    monkeypatch.setattr(storage, "write_text", _disk_full)
    with pytest.raises(UserError, match=r"^--output .*tags: cannot write the run's state \(.*No space left"):
        state.save()
    state.output = "s3://bucket/tags"  # storage's own S3 errors already name the URI: passed on as they are
    with pytest.raises(OSError) as raised:
        state.save()
    assert not isinstance(raised.value, UserError)


def test_training_run_folder_that_cannot_be_written_names_storage_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlc_ray.train.fingerprint import check_run_fingerprint

    cfg = SimpleNamespace(
        storage_path=str(tmp_path / "runs"),
        run_dir=str(tmp_path / "runs" / "a"),
        run_name="a",
        resume_changed=False,
    )
    monkeypatch.setattr(storage, "write_text", _disk_full)
    with pytest.raises(
        ConfigError, match=r"^--storage-path .*runs: cannot write this run's files there \(.*No space"
    ):
        check_run_fingerprint(cfg, {"model": "mobilenet_v2"})
    (tmp_path / "runs").write_text("a file where the folder goes")
    with pytest.raises(UserError, match=r"^--storage-path .*runs: is a file"):
        check_run_fingerprint(cfg, {"model": "mobilenet_v2"})


def test_a_write_under_a_file_names_the_file_in_the_way(tmp_path: Path) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for target in (afile / "q.csv", afile / "deeper" / "q.csv"):
        with pytest.raises(storage.LocalPathError) as raised:
            storage.write_text(str(target), "image,labels\n")
        assert str(raised.value) == f"cannot write {target}: {afile} is a file, not a folder"
        assert isinstance(raised.value, UserError) and isinstance(raised.value, OSError)
    assert afile.read_text() == "x" and list(tmp_path.iterdir()) == [afile]

"""jobs/scan.py over the bad-image corpus, locally and on the S3 server: exactly the broken ones reported."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mlc_ray import storage
from mlc_ray.data.demo import bad_image_samples, good_image_samples
from mlc_ray.data.manifest import load_manifest
from mlc_ray.scan import ScanConfig, run_scan

pytestmark = pytest.mark.integration

GOOD = good_image_samples()
BAD = bad_image_samples()
MISSING = "gone.jpg"  # in the manifest, not in storage


def _expected_errors() -> dict[str, str]:
    expected = {f"bad/{s.name}": s.expected_error for s in BAD}
    expected[f"bad/{MISSING}"] = "missing"
    return expected


def _write_corpus(root: str) -> str:
    """Good and bad images under ``root`` plus a labelled manifest.csv (one row per file + a missing one)."""
    rows = ["image,labels,split"]
    for i, sample in enumerate(GOOD):
        storage.write_bytes(storage.join(root, "good", sample.name), sample.data)
        rows.append(f"good/{sample.name},{'a' if i % 2 else 'b'},train")
    for sample in BAD:
        storage.write_bytes(storage.join(root, "bad", sample.name), sample.data)
        rows.append(f"bad/{sample.name},a|b,val")
    rows.append(f"bad/{MISSING},a,val")
    storage.write_text(storage.join(root, "labels.txt"), "a\nb\n")
    manifest = storage.join(root, "manifest.csv")
    storage.write_text(manifest, "\n".join(rows) + "\n")
    return manifest


def _relative(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1 :]


def _check_report(report_uri: str, root: str, expected: dict[str, str], n_rows: int) -> None:
    fs, path = storage.arrow_filesystem(report_uri)
    table = pq.read_table(path, filesystem=fs)
    assert table.column_names == ["image", "error_code", "message", "width", "height"]
    assert table.num_rows == n_rows
    rows = table.to_pylist()
    got = {_relative(r["image"], root): r["error_code"] for r in rows if r["error_code"] is not None}
    assert got == expected  # every broken file exactly once, with its own code; no good file flagged
    for r in rows:
        if r["error_code"] is None:
            assert r["message"] is None and r["width"] > 0 and r["height"] > 0
        else:
            assert r["message"]


def _check_clean(clean_uri: str, root: str, source_manifest: str) -> None:
    clean = load_manifest(clean_uri)
    source = load_manifest(source_manifest)
    assert sorted(_relative(u, root) for u in clean.images) == sorted(f"good/{s.name}" for s in GOOD)
    by_image = dict(zip(source.images, source.labels, strict=True))
    assert all(by_image[img] == labels for img, labels in zip(clean.images, clean.labels, strict=True))
    assert clean.vocabulary == ["a", "b"]


def test_scan_job_local_manifest(ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.scan import main

    root = str(tmp_path / "corpus")
    manifest = _write_corpus(root)
    report, clean = str(tmp_path / "out" / "report.parquet"), str(tmp_path / "out" / "clean.csv")
    from ray.data import DataContext

    ctx = DataContext.get_current()  # as a fresh driver has it (another test's job may have changed it)
    ctx.print_on_execution_start = ctx.enable_operator_progress_bars = True
    code = main(["--data", manifest, "--report", report, "--write-clean", clean, "--batch-size", "4"])
    out = capsys.readouterr().out
    assert code == 0
    # the job's log is its own summary: Ray Data's execution plan and per-operator progress lines off
    # (seen: 13 lines of them in a 322-image scan's log)
    assert not ctx.print_on_execution_start and not ctx.enable_operator_progress_bars
    expected = _expected_errors()
    _check_report(report, root, expected, len(GOOD) + len(BAD) + 1)
    _check_clean(clean, root, manifest)
    assert f"{len(GOOD)} ok, {len(expected)} broken" in out
    assert "truncated: 2" in out and "missing: 1" in out
    assert all(name.split("/")[1] in out for name in expected)  # each broken file is listed
    # sources untouched: the scan reports, it never deletes
    assert all(storage.exists(storage.join(root, "bad", s.name)) for s in BAD)
    assert not any(p.name.count(".tmp-") for p in (tmp_path / "out").iterdir())


def test_scan_prefix_lists_images_and_caps_summary(ray_local, tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    _write_corpus(root)
    result = run_scan(ScanConfig(data=root, write_clean=str(tmp_path / "clean.jsonl")))
    expected = {k: v for k, v in _expected_errors().items() if k != f"bad/{MISSING}"}
    assert {_relative(i, root): c for i, c, _ in result.broken()} == expected
    assert result.total == len(GOOD) + len(BAD)  # manifest.csv and labels.txt are not images
    clean = load_manifest(str(tmp_path / "clean.jsonl"))
    assert sorted(_relative(u, root) for u in clean.images) == sorted(f"good/{s.name}" for s in GOOD)
    assert all(labels == [] for labels in clean.labels)
    summary = result.summary(max_lines=3)
    assert summary.count("\n  ") == 4 and f"and {len(expected) - 3} more" in summary


def test_scan_job_on_s3(ray_local, s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.scan import main

    root = f"s3://{s3_bucket}/corpus"
    manifest = _write_corpus(root)
    report, clean = f"s3://{s3_bucket}/out/report.parquet", f"s3://{s3_bucket}/out/clean.parquet"
    assert main(["--data", manifest, "--report", report, "--write-clean", clean]) == 0
    _check_report(report, root, _expected_errors(), len(GOOD) + len(BAD) + 1)
    _check_clean(clean, root, manifest)
    out_keys = sorted(o.uri for o in storage.iter_objects(f"s3://{s3_bucket}/out"))
    assert out_keys == [clean, f"s3://{s3_bucket}/out/labels.txt", report]  # no temp keys left
    # too many broken images: the summary is still printed, then exit code 3
    capsys.readouterr()
    assert main(["--data", manifest, "--max-error-rate", "0.1"]) == 3
    captured = capsys.readouterr()
    assert "broken" in captured.out and "max_error_rate" in captured.err


def test_scan_job_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.scan import main

    assert main(["--data", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty")]) == 2
    assert "no images under" in capsys.readouterr().err
    manifest = _write_corpus(str(tmp_path / "c"))
    assert main(["--data", manifest, "--write-clean", manifest]) == 2
    assert "is the input manifest" in capsys.readouterr().err
    (tmp_path / "cfg.yaml").write_text("batch_sise: 8\n")
    assert main(["--config", str(tmp_path / "cfg.yaml")]) == 2
    assert "batch_size" in capsys.readouterr().err  # unknown key, with the suggestion


def test_scan_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ScanConfig(batch_size=0)
    with pytest.raises(ValueError, match="report must be a .parquet"):
        ScanConfig(report="out.csv")
    with pytest.raises(ValueError, match="max_error_rate"):
        ScanConfig(max_error_rate=1.5)
    assert ScanConfig(suffixes=("JPG",)).suffixes == (".jpg",)

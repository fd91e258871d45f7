"""Bad input everywhere: a fuzzed decoder, and every job given a wrong input.

Faults:

* **decoder fuzz** — 400 seeded mutations of real images (JPEG, PNG, GIF, WebP, BMP, TIFF and
  the demo's odd files): truncations, flipped bytes, zeroed runs, swapped/garbled magic numbers,
  spliced headers. ``decode_image`` must return an RGB uint8 image or a structured ``ImageError``
  with a known code for every one, and never raise;
* **jobs** (``jobs/tag.py``, ``scan.py``, ``train.py``, ``promote.py`` through ``main(argv)``) given a
  URI that is not one, a missing bucket, an empty prefix, an unknown model / alias, a model version
  whose stored artifact was altered after registration, and manifests with bad rows.

Each job must exit non-zero with exactly one ``error: ...`` line on stderr that names what is wrong
and where, and write nothing under its output (no table file, no run state, no report).
"""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlc_ray import storage
from tests.chaos.support import MODEL_NAME
from tests.helpers import REPO_ROOT, photo_jpeg, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

BUCKET = "chaos-bad-inputs"
MUTATIONS = 400


# ---------------------------------------------------------------------------------------------- fuzz


def _seed_corpus() -> list[bytes]:
    from mlc_ray.data.demo import bad_image_samples, good_image_samples

    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    corpus = [photo_jpeg(3, (40, 30))]
    for fmt, kwargs in (("PNG", {}), ("GIF", {}), ("WEBP", {"quality": 80}), ("BMP", {}), ("TIFF", {})):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt, **kwargs)
        corpus.append(buf.getvalue())
    corpus += [s.data for s in good_image_samples()] + [s.data for s in bad_image_samples() if s.data]
    return corpus


_MAGICS = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
    b"\x00\x00\x01\x00",
)


def _mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "zero_run", "magic", "splice", "insert", "duplicate"])
    b = bytearray(data)
    if kind == "truncate":
        b = b[: rng.randrange(0, len(b))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "zero_run":
        start = rng.randrange(len(b))
        b[start : start + rng.randint(1, 64)] = bytes(min(64, len(b) - start))
    elif kind == "magic":  # the wrong header for the body
        magic = rng.choice(_MAGICS)
        b = bytearray(magic) + b[len(magic) :] if rng.random() < 0.7 else bytearray(magic) + b
    elif kind == "splice":  # one file's header on another's body
        other = rng.choice(corpus)
        cut = rng.randrange(1, min(len(b), len(other), 200) + 1)
        b = bytearray(other[:cut]) + b[cut:]
    elif kind == "insert":
        at = rng.randrange(len(b) + 1)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    else:  # a header chunk repeated
        at = rng.randrange(min(len(b), 64) + 1)
        b = b[:at] + b[:at] + b[at:]
    return kind, bytes(b)


def test_decoder_fuzz_returns_an_image_or_a_structured_error() -> None:
    from mlc_ray.data.images import ERROR_CODES, decode_image

    corpus = _seed_corpus()
    rng = random.Random(20261201)
    outcomes: dict[str, int] = {}
    for _ in range(MUTATIONS):
        kind, data = _mutate(rng.choice(corpus), rng, corpus)
        try:
            # a small pixel limit keeps a mutated size field from decoding 50 MP here; target_size as tagging
            decoded = decode_image(data, max_pixels=2_000_000, target_size=rng.choice([None, 32]))
        except Exception as exc:  # the one thing it must never do
            pytest.fail(
                f"decode_image raised {type(exc).__name__}: {exc} on a '{kind}' mutation {data[:16]!r}"
            )
        if decoded.error is None:
            arr = decoded.array
            assert arr is not None and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, kind
            assert decoded.width > 0 and decoded.height > 0
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        else:
            assert decoded.array is None and decoded.error.code in ERROR_CODES, decoded.error
            assert decoded.error.message
            outcomes[decoded.error.code] = outcomes.get(decoded.error.code, 0) + 1
    print("[chaos] decoder fuzz outcomes:", dict(sorted(outcomes.items())))
    assert sum(outcomes.values()) == MUTATIONS
    assert outcomes.get("ok", 0) > 0 and len(outcomes) >= 4  # the corpus exercised both paths, many codes


# ---------------------------------------------------------------------------------------------- jobs


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO_ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(name: str, argv: list[str], capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = _job(name).main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    return code, errors, captured.out + captured.err


def _objects(prefix: str) -> list[str]:
    """Every key under an S3 prefix, temp objects included (a plain listing)."""
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    resp = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=key)
    return [o["Key"] for o in resp.get("Contents", [])]


@pytest.fixture(scope="module")
def inputs(s3_server, tmp_path_factory) -> dict[str, str]:
    """A bucket with 6 photos, an empty 'folder', and manifests with bad rows (local and S3)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    upload_images(BUCKET, "photos", 6, with_bad=False)
    storage.s3_client().put_object(Bucket=BUCKET, Key="empty/readme.txt", Body=b"no images here")
    root = tmp_path_factory.mktemp("manifests")
    (root / "labels.txt").write_text("cat\ndog\n")
    img, img2 = (f"s3://{BUCKET}/photos/photos/{i:05d}.jpg" for i in range(2))
    (root / "bad_label.csv").write_text(f"image,labels\n{img},cat\n{img2},dgo\n")
    (root / "empty_image.csv").write_text(f"image,labels,split\n{img},cat,train\n,dog,val\n")
    (root / "no_image_column.csv").write_text(f"picture,labels\n{img},cat\n")
    (root / "good").mkdir()
    (root / "good" / "labels.txt").write_text("a\nb\nc\nd\ne\nf\ng\n")
    (root / "good" / "eval.csv").write_text(f"image,labels\n{img},a\n{img2},b|c\n")
    return {"prefix": f"s3://{BUCKET}/photos/", "empty": f"s3://{BUCKET}/empty/", "manifests": str(root)}


TAG_CASES = [
    # (case id, --input (None: the good prefix), --model (None: the bundle), what the error line must name)
    ("wrong-uri", "s3:/{bucket}/photos/", None, "s3:/{bucket}/photos/"),
    ("no-bucket-in-uri", "s3:///photos/", None, "s3:///photos/"),
    ("missing-bucket", "s3://no-such-bucket-chaos/photos/", None, "no-such-bucket-chaos"),
    ("empty-prefix", "{empty}", None, "no images under s3://{bucket}/empty/"),
    ("bad-manifest-row", "{manifests}/empty_image.csv", None, "row 2"),
    ("manifest-no-image-column", "{manifests}/no_image_column.csv", None, "image"),
    ("unknown-model", None, "models:/no-such-model@champion", "no-such-model"),
    ("unknown-alias", None, f"models:/{MODEL_NAME}@no-such-alias", "@no-such-alias"),
    ("missing-bundle-dir", None, "{tmp}/no-bundle-here", "no-bundle-here"),
]


@pytest.mark.parametrize("case,input_uri,model,names", TAG_CASES, ids=[c[0] for c in TAG_CASES])
def test_tag_job_bad_input_one_clear_line_nothing_written(
    case, input_uri, model, names, inputs, tiny_bundle, tracking, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("MLC_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    fill = {
        "bucket": BUCKET,
        "empty": inputs["empty"],
        "manifests": inputs["manifests"],
        "tmp": str(tmp_path),
    }
    output = f"s3://{BUCKET}/out-{case}"
    argv = [
        "--model", (model or tiny_bundle).format(**fill),
        "--input", (input_uri or inputs["prefix"]).format(**fill),
        "--output", output,
    ]  # fmt: skip
    code, errors, text = run_job("tag", argv, capsys)
    assert code != 0, text[-3000:]
    assert len(errors) == 1, text[-3000:]
    assert names.format(**fill) in errors[0], errors[0]
    assert "Traceback" not in text
    assert _objects(output) == []  # nothing partial: no table file, no run state


def test_tag_job_tampered_model_version_is_refused(inputs, tracking, tmp_path, capsys, monkeypatch) -> None:
    registry = tracking
    monkeypatch.setenv("MLC_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    output = f"s3://{BUCKET}/out-tampered"
    code, errors, text = run_job(
        "tag", ["--model", f"models:/{MODEL_NAME}/{registry['bad']}", "--input", inputs["prefix"], "--output", output],
        capsys,
    )  # fmt: skip
    assert code == 4 and len(errors) == 1, text[-3000:]
    assert "model.onnx" in errors[0] and "sha256" in errors[0] and f"version {registry['bad']}" in errors[0]
    assert _objects(output) == []
    # the untampered version of the same bytes resolves: the check is per file, not a blanket refusal
    from mlc_ray.registry import resolve_model

    resolved = resolve_model(f"models:/{MODEL_NAME}/{registry['good']}", tmp_path / "cache2")
    assert Path(resolved.local_dir, "model.onnx").is_file()


def test_scan_job_bad_inputs(inputs, chaos_ray, tmp_path, capsys) -> None:
    """(the tier's Ray is up: jobs/scan.py connects before it reads the manifest)"""
    manifests = inputs["manifests"]
    report = tmp_path / "report.parquet"
    for data, names in (
        (f"{manifests}/bad_label.csv", "dgo"),
        (f"{manifests}/empty_image.csv", "row 2"),
        ("s3://no-such-bucket-chaos/data.csv", "no-such-bucket-chaos"),
        (str(tmp_path / "missing.csv"), "missing.csv"),
    ):
        code, errors, text = run_job("scan", ["--data", data, "--report", str(report)], capsys)
        assert code == 2 and len(errors) == 1, (data, text[-3000:])
        assert names in errors[0], errors[0]
        assert not report.exists()


def test_train_job_bad_inputs(inputs, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    manifests = inputs["manifests"]
    runs = tmp_path / "runs"
    for argv, names in (
        (["--data", f"{manifests}/bad_label.csv"], "dgo"),
        (["--data", f"{manifests}/no_image_column.csv"], "image"),
        (["--data", "s3://no-such-bucket-chaos/m.csv"], "no-such-bucket-chaos"),
        (["--data", f"{manifests}/empty_image.csv"], "row 2"),
        (["--data", f"{manifests}/empty_image.csv", "--model", "no_such_arch"], "no_such_arch"),
        (["--set", "epochz=3"], "epochz"),
    ):
        code, errors, text = run_job(
            "train", [*argv, "--storage-path", str(runs), "--run-name", "bad"], capsys
        )
        assert code == 2 and len(errors) == 1, (argv, text[-3000:])
        assert names in errors[0], errors[0]
        assert not runs.exists()


def test_promote_job_unknown_model_and_tampered_version(tracking, inputs, tmp_path, capsys) -> None:
    registry = tracking
    cache = str(tmp_path / "cache")
    code, errors, text = run_job("promote", ["--name", "no-such-model", "--cache-dir", cache], capsys)
    assert code == 2 and len(errors) == 1 and "no-such-model" in errors[0], text[-3000:]
    code, errors, text = run_job(
        "promote",
        ["--name", MODEL_NAME, "--candidate", str(registry["bad"]), "--eval-data",
         f"{inputs['manifests']}/good/eval.csv", "--cache-dir", cache],
        capsys,
    )  # fmt: skip
    assert code == 4 and len(errors) == 1, text[-3000:]
    assert "model.onnx" in errors[0] and "sha256" in errors[0], errors[0]

"""Poison inputs: images that would blow up, hang or crash the decoder, in bulk tagging.

Faults (inputs, mixed with good photos):

* a real decompression bomb — a valid 9000x9000 PNG of zeros (81 MP, ~80 kB on disk, 243 MB of
  pixels decoded), below PIL's own bomb limit (89 MP) but above ``max_pixels`` (50 MP);
* a JPEG whose frame header claims 60000x60000 (3.6 G pixels) over a tiny body;
* an image that *crashes the decoder's process* (SIGSEGV, as a C-library bug would) and one that
  *hangs the decoder* forever (the tier's worker hook ``hooks.install_poison_decoder`` does both,
  for bytes with the poison / hang markers).

Expected: the bomb and the huge header fail their own row (``too_large``, from the header, before
a pixel is decoded) and every other row is tagged; the crashing and the hanging image fail their
own row too (``crashed`` / ``timeout``) and the job succeeds, in bounded time and tries: a batch
that outlives ``--batch-timeout-s`` makes its actor exit, a batch whose actor died
``PREDICTOR_MAX_TASK_RETRIES + 1`` times stops the window, and its images are isolated (one image
per task, ``ISOLATION_ATTEMPTS`` tries each, a hung task cancelled at the timeout). The bounds are
deliberate: ``DEFAULT_MAX_PIXELS`` (``mlc_ray.data.images``), ``PREDICTOR_MAX_TASK_RETRIES``,
``ISOLATION_ATTEMPTS`` and ``TagConfig.batch_timeout_s`` (``mlc_ray.tagging``).
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mlc_ray import storage
from tests.chaos import support
from tests.chaos.hooks import HANG_MARKER, POISON_MARKER
from tests.helpers import photo_jpeg, read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

BUCKET = "chaos-poison"


def png_bomb(width: int = 9000, height: int = 9000) -> bytes:
    """A *valid* greyscale PNG of zeros: tiny on disk, width*height bytes once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(comp.compress(row * 500) for _ in range(height // 500)) + comp.compress(
        row * (height % 500)
    )
    body += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def huge_header_jpeg(width: int = 60000, height: int = 60000) -> bytes:
    data = bytearray(photo_jpeg(1, (16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def poison_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "JPEG", comment=POISON_MARKER)
    return buf.getvalue()


def test_bombs_are_refused_from_the_header() -> None:
    from mlc_ray.data.images import DEFAULT_MAX_PIXELS, decode_image

    bomb, huge = png_bomb(), huge_header_jpeg()
    assert len(bomb) < 200_000 and DEFAULT_MAX_PIXELS < 9000 * 9000
    decoded = decode_image(bomb)  # max_pixels, from the header: PIL's own guard would let 81 MP through
    assert decoded.array is None and decoded.error is not None and decoded.error.code == "too_large"
    assert (decoded.width, decoded.height) == (9000, 9000) and "max_pixels" in decoded.error.message
    decoded = decode_image(huge)  # 3.6 G pixels: PIL's decompression-bomb guard, at open
    assert decoded.array is None and decoded.error is not None and decoded.error.code == "too_large"


def test_bomb_and_huge_header_fail_one_row_each(s3_server, chaos_ray, tiny_bundle) -> None:
    import boto3

    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.pipeline import run_tagging

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    good = upload_images(BUCKET, "bombs", 20, with_bad=False)
    client = storage.s3_client()
    client.put_object(Bucket=BUCKET, Key="bombs/photos/00003-bomb.png", Body=png_bomb())
    client.put_object(Bucket=BUCKET, Key="bombs/photos/00011-huge.jpg", Body=huge_header_jpeg())
    poison = {f"s3://{BUCKET}/bombs/photos/00003-bomb.png", f"s3://{BUCKET}/bombs/photos/00011-huge.jpg"}
    output = f"s3://{BUCKET}/tags-bombs"
    cfg = TagConfig(
        model=tiny_bundle, input=f"s3://{BUCKET}/bombs/", output=output, shard_size=8, batch_size=4,
        actors="1", threads_per_actor=1, max_error_rate=0.2,
    )  # fmt: skip
    summary = run_tagging(cfg)
    rows = read_table(output).to_pylist()
    counts = support.table_counts([r["image_uri"] for r in rows], set(good) | poison)
    support.record(
        "test_bomb_and_huge_header_fail_one_row_each",
        "81 MP PNG decompression bomb + 60000x60000 JPEG header among 20 photos",
        2,
        len(good) + 2,
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    assert (counts.rows, counts.duplicates, counts.missing) == (22, 0, 0)
    failed = {r["image_uri"]: r["error"] for r in rows if r["error"]}
    assert set(failed) == poison and all(e.startswith("too_large") for e in failed.values()), failed
    assert summary.errors_by_code == {"too_large": 2}


def hang_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (7, 7, 7)).save(buf, "JPEG", comment=HANG_MARKER)
    return buf.getvalue()


def test_decoder_crash_and_hang_fail_their_own_row_in_bounded_tries(
    s3_server, chaos_ray, tiny_bundle, crash_log: Path, capsys
) -> None:
    import importlib.util

    import boto3

    from mlc_ray.tagging.pipeline import ISOLATION_ATTEMPTS, PREDICTOR_MAX_TASK_RETRIES
    from tests.helpers import REPO_ROOT

    bucket = f"{BUCKET}-crash"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    storage.reset_clients()
    good = upload_images(bucket, "in", 12, with_bad=False)
    crasher, hanger = f"s3://{bucket}/in/photos/00004-crash.jpg", f"s3://{bucket}/in/photos/00009-hang.jpg"
    storage.write_bytes(crasher, poison_jpeg())
    storage.write_bytes(hanger, hang_jpeg())
    crash_log.unlink(missing_ok=True)
    output = f"s3://{bucket}/tags"
    spec = importlib.util.spec_from_file_location("tag_job", REPO_ROOT / "jobs" / "tag.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    code = job.main(
        ["--model", tiny_bundle, "--input", f"s3://{bucket}/in/", "--output", output,
         "--shard-size", "7", "--batch-size", "2", "--actors", "1", "--threads-per-actor", "1",
         "--batch-timeout-s", "3", "--max-error-rate", "0.2"]
    )  # fmt: skip
    err = capsys.readouterr().err
    log = crash_log.read_text().split() if crash_log.exists() else []
    crashes, hangs = log[0::2].count("crash"), log[0::2].count("hang")
    rows = read_table(output).to_pylist()
    counts = support.table_counts([r["image_uri"] for r in rows], set(good) | {crasher, hanger})
    support.record(
        "test_decoder_crash_and_hang_fail_their_own_row",
        f"decoder SIGSEGV on 1 and a hung decoder on 1 of {len(good) + 2} images, every attempt",
        crashes + hangs,
        len(good) + 2,
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    print(f"[chaos] decoder crashes {crashes}, hangs {hangs}")
    assert code == 0, err[-3000:]
    assert (counts.rows, counts.duplicates, counts.missing, counts.extra) == (14, 0, 0, 0)
    failed = {r["image_uri"]: r["error"] for r in rows if r["error"]}
    assert set(failed) == {crasher, hanger}, failed
    assert failed[crasher].startswith("crashed:") and failed[hanger].startswith("timeout:"), failed
    # bounded: the dataset's tries of its batch, one try per halving of that batch (2 images: one),
    # then ISOLATION_ATTEMPTS tries of the image alone
    bound = PREDICTOR_MAX_TASK_RETRIES + 1 + math.ceil(math.log2(2)) + ISOLATION_ATTEMPTS
    assert ISOLATION_ATTEMPTS <= crashes <= bound and ISOLATION_ATTEMPTS <= hangs <= bound, log

"""Throttling and transient S3 errors: a proxy answers a seeded share of object GETs with
``503 SlowDown``, ``500 InternalError`` or a TCP reset.

Fault: ``s3_fault_proxy.py`` between the code and the S3 server; a *faulty* key (30 % of the keys,
chosen by a seeded hash) gets a fault on each of its first 2 GETs, so a reader with at least 3
attempts reads everything and a reader with 1 attempt loses exactly the faulty keys.

What it proves, each retry layer on its own and then the jobs:

* boto3's standard-mode retries (``MLC_RAY_S3_MAX_ATTEMPTS``) absorb the faults; with 1 attempt
  every faulty key fails;
* ``read_with_retry`` (tagging's own jittered retries, ``read_retries``) absorbs them with boto3's
  retries off; with ``read_retries=1`` too, every faulty key becomes an ``unreadable`` row;
* bulk tagging through the proxy (workers with boto3 retries off, see ``conftest.py``) writes
  every image exactly once with no error row; with ``read_retries=1`` as well, ``jobs/tag.py``
  exits 1 with one ``error:`` line naming the error-rate ceiling and the ``unreadable`` rows
  (rows still written, no ``_SUCCESS``);
* training data loading (``decode_batch``) reads every image through the proxy with boto3's
  retries; without them the faulty images are dropped and recorded in the bad-image log (Ray
  Data dataset, in the workers), never raised (a throttled GET is a ``ClientError``, not an
  ``OSError``: ``decode_batch`` used to crash the task on it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mlc_ray import storage
from tests.chaos import support
from tests.helpers import REPO_ROOT, read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

N_IMAGES = 40
FRACTION = 0.3
FAIL_FIRST = 2
SEED = 7


@pytest.fixture(scope="module")
def photos(s3_server) -> tuple[str, list[str]]:
    """40 good photos on the S3 server (uploaded directly, not through the proxy)."""
    import boto3

    bucket = "chaos-throttle"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    storage.reset_clients()
    expected = upload_images(bucket, "in", N_IMAGES, with_bad=False)
    return f"s3://{bucket}/in/", sorted(expected)


def _faulty(proxy: support.FaultProxy, uris: list[str]) -> set[str]:
    keys = set(proxy.stats()["faulty_keys"])
    return {u for u in uris if u.removeprefix("s3://") in keys}


def _parallel(fn, items: list) -> list:
    """Reads in parallel, as the jobs do: boto3's backoff (up to seconds per retry) must not add up."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(fn, items))


def _read_or_none(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except Exception:  # ClientError (503/500 after the retries) or StorageUnreachableError (reset)
        return None


def _via_proxy(monkeypatch: pytest.MonkeyPatch, proxy: support.FaultProxy, max_attempts: int | None) -> None:
    """Point this process's S3 clients at the proxy, with the given boto3 attempts (None = default)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    if max_attempts is None:
        monkeypatch.delenv("MLC_RAY_S3_MAX_ATTEMPTS", raising=False)
    else:
        monkeypatch.setenv("MLC_RAY_S3_MAX_ATTEMPTS", str(max_attempts))
    storage.reset_clients()


def test_boto3_retries_absorb_throttling_and_one_attempt_does_not(photos, proxy_faults, monkeypatch) -> None:
    _, uris = photos
    truth = {u: storage.read_bytes(u) for u in uris}  # direct to the server, before any fault

    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    _via_proxy(monkeypatch, proxy_faults, None)
    got = dict(zip(uris, _parallel(storage.read_bytes, uris), strict=True))
    stats = proxy_faults.stats()
    faulty = _faulty(proxy_faults, uris)
    assert got == truth
    assert len(faulty) >= 5 and stats["injected_total"] == FAIL_FIRST * len(faulty)
    assert all(stats["injected"][k] > 0 for k in ("slowdown", "internal", "reset"))

    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    _via_proxy(monkeypatch, proxy_faults, 1)
    got = dict(zip(uris, _parallel(_read_or_none, uris), strict=True))
    assert {u for u, data in got.items() if data is None} == faulty  # no retries: the faulty keys are lost
    assert all(data == truth[u] for u, data in got.items() if data is not None)


def test_read_with_retry_absorbs_what_boto3_does_not_retry(photos, proxy_faults, monkeypatch) -> None:
    from mlc_ray.tagging.pipeline import read_with_retry

    _, uris = photos
    _via_proxy(monkeypatch, proxy_faults, 1)  # boto3 retries off: only tagging's own layer is left
    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    results = dict(
        zip(uris, _parallel(lambda u: read_with_retry(u, retries=FAIL_FIRST + 1), uris), strict=True)
    )
    assert all(data is not None and err is None for data, err in results.values()), results
    faulty = _faulty(proxy_faults, uris)
    assert proxy_faults.stats()["injected_total"] == FAIL_FIRST * len(faulty) > 0

    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    results = dict(zip(uris, _parallel(lambda u: read_with_retry(u, retries=1), uris), strict=True))
    lost = {u for u, (data, _) in results.items() if data is None}
    assert lost == faulty
    assert all(
        results[u][1].startswith("unreadable: ") and "(after 1 attempt(s))" in results[u][1] for u in lost
    )


def test_tagging_through_throttling_proxy_every_image_once(
    photos, proxy_faults, tiny_bundle, chaos_ray
) -> None:
    """The tier's workers have boto3 retries off: ``read_with_retry`` (read_retries=5) must absorb all."""
    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.pipeline import run_tagging

    prefix, uris = photos
    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    output = "s3://chaos-throttle/tags-retried"
    cfg = TagConfig(
        model=tiny_bundle,
        input=prefix,
        output=output,
        shard_size=16,
        batch_size=8,
        actors="1",
        threads_per_actor=1,
    )
    summary = run_tagging(cfg)
    stats = proxy_faults.stats()
    table = read_table(output)
    counts = support.table_counts(table.column("image_uri").to_pylist(), uris)
    faulty = _faulty(proxy_faults, uris)
    support.record(
        "test_tagging_through_throttling_proxy",
        f"503 SlowDown / 500 / TCP reset on {len(faulty)} of {len(uris)} keys (first {FAIL_FIRST} GETs each)",
        stats["injected_total"],
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    # the faults happened, on images and on whatever else the run read through the proxy (the read
    # tasks load the shard descriptors from the run's state too): every one absorbed
    assert stats["injected_total"] == FAIL_FIRST * len(set(stats["faulty_keys"])) and len(faulty) >= 5
    assert (counts.rows, counts.duplicates, counts.missing, counts.extra) == (N_IMAGES, 0, 0, 0)
    assert table.column("error").null_count == N_IMAGES  # retried to success: no error row at all
    assert summary.errors == 0 and storage.exists(f"{output}/_runs/{summary.run_id}/_SUCCESS")


def test_tagging_job_without_retries_fails_with_a_clear_message(
    photos, proxy_faults, tiny_bundle, chaos_ray, tmp_path: Path, capsys
) -> None:
    """Both retry layers off (boto3 1 attempt in the workers, read_retries 1): the faults reach the table."""
    prefix, uris = photos
    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    output = "s3://chaos-throttle/tags-no-retries"
    config = tmp_path / "tag.yaml"
    config.write_text("read_retries: 1\n")
    code = _tag_job().main(
        ["--model", tiny_bundle, "--input", prefix, "--output", output, "--config", str(config),
         "--shard-size", "16", "--batch-size", "8", "--actors", "1", "--threads-per-actor", "1"]
    )  # fmt: skip
    err = capsys.readouterr().err
    faulty = _faulty(proxy_faults, uris)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert "max-error-rate" in errors[0] and f"unreadable={len(faulty)}" in errors[0], errors
    table = read_table(output)
    counts = support.table_counts(table.column("image_uri").to_pylist(), uris)
    unreadable = {r["image_uri"] for r in table.to_pylist() if (r["error"] or "").startswith("unreadable")}
    support.record(
        "test_tagging_job_without_retries_fails",
        f"same faults, boto3 1 attempt + read_retries 1 ({len(faulty)} keys -> `unreadable` rows, exit 1)",
        proxy_faults.stats()["injected_total"],
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    assert unreadable == faulty and len(faulty) >= 5  # exactly the faulty keys, as rows, not gaps
    assert (counts.rows, counts.duplicates, counts.missing) == (N_IMAGES, 0, 0)
    run_ids = set(table.column("run_id").to_pylist())
    assert len(run_ids) == 1 and not storage.exists(f"{output}/_runs/{run_ids.pop()}/_SUCCESS")


def _tag_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tag_job", REPO_ROOT / "jobs" / "tag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _val_manifest(uris: list[str]):
    from mlc_ray.data.manifest import Manifest

    labels = [["a"] if i % 2 else ["b"] for i in range(len(uris))]
    return Manifest(
        images=list(uris), labels=labels, splits=["val"] * len(uris), vocabulary=["a", "b"], source="chaos"
    )


def test_training_decode_reads_through_throttling(photos, proxy_faults, monkeypatch) -> None:
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.train.data import decode_batch, image_rows

    _, uris = photos
    rows = image_rows(_val_manifest(uris), ["a", "b"]).to_pydict()
    batches = [
        {"index": np.asarray(rows["index"][i : i + 4]), "uri": np.asarray(rows["uri"][i : i + 4]),
         "label_ids": rows["label_ids"][i : i + 4]}
        for i in range(0, N_IMAGES, 4)
    ]  # fmt: skip
    kwargs = {
        "split": "val",
        "preprocess": PreprocessConfig(image_size=32).to_dict(),
        "num_labels": 2,
        "augment": None,
    }

    def decode_all() -> list[int]:
        return [
            int(i) for out in _parallel(lambda b: decode_batch(b, **kwargs), batches) for i in out["index"]
        ]

    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    _via_proxy(monkeypatch, proxy_faults, None)
    assert sorted(decode_all()) == list(range(N_IMAGES))
    faulty = _faulty(proxy_faults, uris)
    assert proxy_faults.stats()["injected_total"] == FAIL_FIRST * len(faulty) > 0

    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    _via_proxy(monkeypatch, proxy_faults, 1)
    kept = {uris[i] for i in decode_all()}  # a bad read is a dropped, recorded row: never an exception
    assert set(uris) - kept == faulty


def test_training_dataset_through_throttling_proxy(photos, proxy_faults, chaos_ray) -> None:
    """The Ray Data training input with boto3 retries off (the tier's workers): the faulty images are
    dropped and recorded in the run's bad-image log, every other row arrives exactly once, no crash."""
    import ray

    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.train.data import BadImageLog, build_dataset

    _, uris = photos
    proxy_faults.configure(fraction=FRACTION, fail_first=FAIL_FIRST, seed=SEED)
    bad_log = BadImageLog()
    ds = build_dataset(
        _val_manifest(uris), ["a", "b"], split="val", preprocess=PreprocessConfig(image_size=32),
        bad_image_log=bad_log, decode_cpus=0.5,
    )  # fmt: skip
    indices = [int(i) for batch in ds.iter_batches(batch_format="numpy") for i in batch["index"]]
    faulty = _faulty(proxy_faults, uris)
    bad = ray.get(bad_log.entries.remote())
    counts = support.table_counts([uris[i] for i in indices] + [b["uri"] for b in bad], uris)
    support.record(
        "test_training_dataset_through_throttling_proxy",
        f"503 / 500 / reset on {len(faulty)} of {len(uris)} training images, boto3 retries off "
        "(lost reads -> bad-image log)",
        proxy_faults.stats()["injected_total"],
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    assert len(faulty) >= 5 and {b["uri"] for b in bad} == faulty
    assert {b["code"] for b in bad} == {"read_error"}
    assert sorted(uris[i] for i in indices) == sorted(set(uris) - faulty)  # the rest, each once
    assert (counts.duplicates, counts.missing) == (0, 0)

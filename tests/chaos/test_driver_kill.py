"""Driver death and rerun: ``jobs/tag.py`` SIGKILLed at three exact points of one run, then resumed.

Fault: the driver (its own process, a separate Ray job on the tier's cluster, see ``driver.py``)
kills itself with SIGKILL

1. during the listing (after 2 of 6 shard descriptors are stored),
2. mid-shard, after the attempt committed its first shard (a shard's rows are partly buffered in
   the driver, not committed; read blocks of 5 keys, batches of 4 and Ray Data's preserve_order,
   so each 10-key shard reaches the driver in two parts, in order),
3. during a commit (the shard's temp object is on S3, the copy to its final key has not happened;
   the stray temp object must stay invisible to table readers),

each time rerunning the *same command* (same run identity); the fourth attempt runs to the end.
Checked after every death: nothing under a committed name is partial, no ``_SUCCESS``; and at the
end: every image exactly once, the shards committed by earlier attempts were not redone (same
objects, same ETags), the summary counts every shard, and the cluster's CPUs are free again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from mlc_ray import storage
from tests.chaos import support
from tests.helpers import REPO_ROOT, read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

N_IMAGES = 60
SHARD = 10
BUCKET = "chaos-driver"
OUTPUT = f"s3://{BUCKET}/tags"
KILLS = ("listing:2", "mid-shard:1", "commit:1")


def _run_driver(chaos_ray: str, proxy_endpoint: str, bundle: str, prefix: str, kill_at: str | None):
    cmd = [
        sys.executable, "-m", "tests.chaos.driver", "--ray-address", chaos_ray,
        "--worker-env", f"AWS_ENDPOINT_URL={proxy_endpoint}",
        *(["--kill-at", kill_at] if kill_at else []), "--read-block-keys", "5", "--preserve-order",
        "--", "--model", bundle, "--input", prefix, "--output", OUTPUT,
        "--shard-size", str(SHARD), "--batch-size", "4", "--actors", "1", "--threads-per-actor", "1",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)


def _committed() -> dict[str, str]:
    try:
        return {
            i.uri: i.etag
            for p in storage.iter_pages(OUTPUT, suffixes=(".parquet",))
            for i in p
            if "/dt=" in i.uri
        }
    except FileNotFoundError:
        return {}


def _raw_keys() -> list[str]:
    """Every key under the output, temp objects included (a plain S3 listing)."""
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="tags/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _run_state() -> dict:
    [state_uri] = [o.uri for o in storage.iter_objects(f"{OUTPUT}/_runs") if o.uri.endswith("/state.json")]
    return json.loads(storage.read_text(state_uri))


def test_driver_killed_at_three_points_rerun_finishes_exactly_once(
    s3_server, chaos_ray, fault_proxy, tiny_bundle
) -> None:
    import boto3
    import ray

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    uris = sorted(upload_images(BUCKET, "in", N_IMAGES, with_bad=False))
    prefix = f"s3://{BUCKET}/in/"
    history: list[tuple[str, int, int]] = []  # (kill point, committed before, committed after)

    for kill_at in KILLS:
        before = _committed()
        done = _run_driver(chaos_ray, fault_proxy.endpoint, tiny_bundle, prefix, kill_at)
        log = done.stdout[-2000:] + done.stderr[-3000:]
        assert done.returncode == -signal.SIGKILL, log  # it died where it was told to, not earlier or later
        assert f"SIGKILL at {kill_at.split(':')[0]}" in done.stderr, log
        after = _committed()
        assert {u: after[u] for u in before} == before  # committed shards are never rewritten
        for uri in after:
            fs, path = storage.arrow_filesystem(uri)
            assert pq.read_metadata(path, filesystem=fs).num_rows == SHARD  # committed = whole
        state = _run_state()
        assert not storage.exists(f"{OUTPUT}/_runs/{state['run_id']}/_SUCCESS")
        if kill_at.startswith("listing"):
            assert not state["listing_complete"] and after == {}
        if kill_at.startswith("mid-shard"):
            assert 1 <= len(after) < N_IMAGES // SHARD  # some shards committed, the one in flight not
        if kill_at.startswith("commit"):
            assert len(after) == len(before)  # the shard being copied has no final object
            # its uploaded temp object stays behind, hidden ('.' name) from listings and table readers
            strays = [k for k in _raw_keys() if "/dt=" in k and storage.is_temp_name(k)]
            assert len(strays) == 1 and strays[0].rsplit("/", 1)[1].startswith("."), strays
            assert read_table(OUTPUT).num_rows == SHARD * len(after)
        history.append((kill_at, len(before), len(after)))

    committed_before_final = _committed()
    done = _run_driver(chaos_ray, fault_proxy.endpoint, tiny_bundle, prefix, None)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    final = _committed()
    state = _run_state()
    summary = json.loads(storage.read_text(f"{OUTPUT}/_runs/{state['run_id']}/summary.json"))
    counts = support.table_counts(read_table(OUTPUT).column("image_uri").to_pylist(), uris)
    support.record(
        "test_driver_killed_at_three_points",
        "driver SIGKILL during listing, mid-shard, during an S3 commit; same command rerun after each",
        len(KILLS),
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    print("[chaos] kills (point, shards committed before, after):", history)
    assert (counts.rows, counts.duplicates, counts.missing, counts.extra) == (N_IMAGES, 0, 0, 0)
    assert {u: final[u] for u in committed_before_final} == committed_before_final  # not redone
    assert len(final) == N_IMAGES // SHARD
    assert state["attempts"] == len(KILLS) + 1  # one run, resumed after each death
    assert summary["shards_skipped"] == len(committed_before_final) > 0
    assert summary["images"] == N_IMAGES and summary["images_this_attempt"] == N_IMAGES - SHARD * len(
        committed_before_final
    )
    assert storage.exists(f"{OUTPUT}/_runs/{state['run_id']}/_SUCCESS")
    # the dead drivers' jobs released the cluster: all CPUs free again
    support.wait_until(lambda: ray.available_resources().get("CPU", 0) == 2.0, 60, "the cluster's CPUs")

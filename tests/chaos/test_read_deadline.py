"""A GET the S3 side holds open (no byte, connection kept) costs one object at most ``--read-deadline-s``:
its row is ``unreadable`` and the job finishes, every other image tagged.

Fault: the fault proxy holds every GET of one key (``hold_get_pattern``) until the test ends. Before
the read deadline, such a read waited botocore's 60 s read timeout on each of its attempts (boto3's
standard retries times tagging's own), so one hung key held its read task for minutes.
"""

from __future__ import annotations

import time

import pytest

from mlc_ray import storage
from tests.chaos import support
from tests.helpers import read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

BUCKET = "chaos-deadline"
N_IMAGES = 24
DEADLINE_S = 3.0


@pytest.fixture(scope="module")
def photos(s3_server) -> tuple[str, list[str]]:
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    expected = upload_images(BUCKET, "in", N_IMAGES, with_bad=False)
    return f"s3://{BUCKET}/in/", sorted(expected)


def test_held_get_is_unreadable_within_the_deadline_and_the_job_finishes(
    photos, proxy_faults, tiny_bundle, chaos_ray
) -> None:
    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.pipeline import run_tagging

    prefix, uris = photos
    held = uris[3]
    proxy_faults.configure(hold_get_pattern=f"^{held.removeprefix('s3://')}$")
    output = f"s3://{BUCKET}/tags"
    cfg = TagConfig(
        model=tiny_bundle, input=prefix, output=output, shard_size=8, batch_size=8, actors="1",
        threads_per_actor=1, read_deadline_s=DEADLINE_S, max_error_rate=0.5,
    )  # fmt: skip
    t0 = time.monotonic()
    summary = run_tagging(cfg)
    wall = time.monotonic() - t0
    stats = proxy_faults.stats()
    rows = {r["image_uri"]: r for r in read_table(output).to_pylist()}
    counts = support.table_counts(list(rows), uris)
    support.record(
        "test_held_get_is_unreadable_within_the_deadline",
        f"every GET of 1 of {N_IMAGES} keys held open; --read-deadline-s {DEADLINE_S:g} (job {wall:.0f} s)",
        stats["held_gets"],
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    assert stats["held_gets"] >= 1  # the fault happened
    assert (counts.rows, counts.duplicates, counts.missing) == (N_IMAGES, 0, 0)
    error = rows[held]["error"] or ""
    # the socket timeout or the watchdog, whichever fires first, names the deadline and its flag
    assert error.startswith("unreadable") and f"{DEADLINE_S:g} s" in error, error
    assert "--read-deadline-s" in error, error
    assert all(r["error"] is None for u, r in rows.items() if u != held)
    assert summary.errors_by_code == {"unreadable": 1}
    # one held read costs the deadline (plus the watchdog's poll), not botocore's 60 s per attempt
    assert wall < 60, f"the job took {wall:.0f} s"

"""Node death: a whole worker node of a multi-node cluster dies during a tagging run.

Fault: ``node_death.py`` (its own process, its own ``ray.cluster_utils.Cluster``: a 0-CPU head and
two 2-CPU worker nodes) removes the node running the Predictor actor, ungracefully, once the run
has committed a shard: that node's raylet, read tasks, inference actor and object store go at once.
Each Predictor call sleeps 0.3 s (``--predictor-delay-s``: ``hooks.install_predictor_faults`` in
that process) so the run is still going when the node dies.

Expected: the run finishes by itself on the other node (lost blocks are recomputed from their read
tasks, the actor is restarted there and its batches retried, within ``PREDICTOR_MAX_TASK_RETRIES``);
the table holds exactly the input set, no duplicate, no gap, no error row; afterwards the surviving
node's CPUs are all free and no Predictor process is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from mlc_ray import storage
from tests.chaos import support
from tests.helpers import REPO_ROOT, predictor_pids, read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

N_IMAGES = 60
BUCKET = "chaos-node"


def test_worker_node_killed_mid_run_table_exactly_once(s3_server, tiny_bundle, tmp_path) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    uris = sorted(upload_images(BUCKET, "in", N_IMAGES, with_bad=False))
    output = f"s3://{BUCKET}/tags"
    result_file = tmp_path / "node-death.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the tier's
    # Cluster() writes its address to <RAY_TMPDIR>/ray_current_cluster, where any ray.init() without
    # an address would find it: a private temp dir keeps it away from every other test process
    env["RAY_TMPDIR"] = str(tempfile.mkdtemp(prefix="mlcr-nd-", dir="/tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.chaos.node_death", "--model", tiny_bundle,
         "--input", f"s3://{BUCKET}/in/", "--output", output, "--result", str(result_file),
         "--predictor-delay-s", "0.3"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    print("[chaos] node death:", json.dumps(result))
    assert "error" not in result, f"{result['error']}\n{proc.stderr[-6000:]}"
    assert "kill" in result, "node A was never killed: the run ended before its first commit"

    table = read_table(output)
    counts = support.table_counts(table.column("image_uri").to_pylist(), uris)
    support.record(
        "test_worker_node_killed_mid_run",
        "the worker node running the Predictor actor (raylet, tasks, actor, object store) killed mid-run",
        1,
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    assert result["kill"]["committed_before"] >= 1  # killed mid-run, not before or after it
    assert result["kill"]["committed_before"] < N_IMAGES // 20
    assert (counts.rows, counts.duplicates, counts.missing, counts.extra) == (N_IMAGES, 0, 0, 0)
    assert table.column("error").null_count == N_IMAGES
    assert result["summary"] == {"images": N_IMAGES, "errors": 0, "shards": N_IMAGES // 20}
    # resources released: the dead node is gone, the survivor's CPUs are all free, no pool actor left
    assert result["alive_nodes_after"] == 2 and result["free_cpus_after"] == 2.0, result
    assert result["pool_actors_left"] == [], result
    support.wait_until(lambda: not predictor_pids(), 30, "the Predictor processes to exit")

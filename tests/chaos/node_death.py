"""Kill a whole worker node in the middle of a tagging run, on a multi-node cluster of its own.

    python -m tests.chaos.node_death --model DIR --input URI --output URI --result FILE.json

Runs in its own process (the tier's single-node Ray lives in the pytest process):
``ray.cluster_utils.Cluster`` starts a head node with **0 CPUs** (GCS and the driver only, so every
read task and inference actor runs on a worker node) and two worker nodes of 2 CPUs. Once the run
has committed its first shard, the node running the Predictor actor (found from the actor
process's raylet) is removed *ungracefully*: its raylet and every worker process on it SIGKILLed,
its object store lost, as when an instance is preempted. ``run_tagging`` must finish by itself on
the other node. The result file says what happened (shards committed before the kill, the
summary, the free CPUs after the run).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from tests.helpers import REPO_ROOT


def committed_parts(output: str) -> list[str]:
    from mlc_ray import storage

    return [
        o.uri
        for o in storage.iter_objects(output)
        if o.uri.endswith(".parquet") and "/_runs/" not in o.uri and not storage.is_temp_name(o.uri)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--input", "--output", "--result"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--shard-size", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--predictor-delay-s", type=float, default=0.0, help="each Predictor call sleeps")
    args = parser.parse_args(argv)

    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.pipeline import run_tagging
    from tests.chaos.hooks import install_predictor_faults
    from tests.helpers import predictor_pids

    if args.predictor_delay_s:
        install_predictor_faults(delay_s=args.predictor_delay_s)

    # GCS declares a node dead after missed health checks: ~1 min by default, 2-3 s here
    health = {
        "health_check_period_ms": 500,
        "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 3,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": health},
    )
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )
    result: dict = {"nodes_before": len(ray.nodes())}
    done = threading.Event()

    def node_of(pid: int):  # the worker node whose raylet started process ``pid``
        raylets = {n.all_processes["raylet"][0].process.pid: n for n in workers}
        for parent in psutil.Process(pid).parents():
            if parent.pid in raylets:
                return raylets[parent.pid]
        return None

    def kill_the_actors_node() -> None:
        deadline = time.monotonic() + 180
        while not done.is_set() and time.monotonic() < deadline:
            pids = sorted(predictor_pids())
            node = node_of(pids[0]) if pids else None
            parts = committed_parts(args.output)
            if parts and node is not None:
                cluster.remove_node(node, allow_graceful=False)
                result["kill"] = {
                    "committed_before": len(parts),
                    "predictor_pids": pids,
                    "node": workers.index(node),
                }
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_actors_node, daemon=True)
    killer.start()
    cfg = TagConfig(
        model=args.model, input=args.input, output=args.output, shard_size=args.shard_size,
        batch_size=args.batch_size, actors="1", threads_per_actor=1,
    )  # fmt: skip
    try:
        summary = run_tagging(cfg)
        result["summary"] = {"images": summary.images, "errors": summary.errors, "shards": summary.shards}
    except Exception as exc:  # reported to the test, which fails with it
        result["error"] = f"{type(exc).__name__}: {exc}"
        import traceback

        traceback.print_exc()
    finally:
        done.set()
        killer.join(timeout=60)
    # resources released: the pool's actors exit and the surviving node's CPUs are all free again
    from ray._private import state as ray_state

    def pool_actors() -> list[dict]:
        return [
            {"class": a.get("ActorClassName"), "state": a.get("State")}
            for a in ray_state.actors().values()
            if a.get("State") != "DEAD" and "MapWorker" in str(a.get("ActorClassName"))
        ]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (ray.available_resources().get("CPU", 0) < 2.0 or pool_actors()):
        time.sleep(0.2)
    result["free_cpus_after"] = ray.available_resources().get("CPU", 0)
    result["pool_actors_left"] = pool_actors()
    result["alive_nodes_after"] = sum(1 for n in ray.nodes() if n["Alive"])
    Path(args.result).write_text(json.dumps(result, indent=2))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

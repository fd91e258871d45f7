"""The Ray floor of a tagging run: what the embedded local Ray and Ray Data cost with no mlc_ray work.

    python benchmarks/ray_floor.py [--chunks 16] [--actors 2]

``benchmarks/tagging.py`` runs this beside ``jobs/tag.py`` (configuration ``ray_floor``) so that the
job's fixed cost can be read against what Ray itself costs on the same machine in the same run: the
same ``init_ray`` (local Ray, no dashboard), the same dataset shape as ``tagging/dataset.py`` (chunk
references in ``--chunks`` blocks → a ``map_batches`` task at 0.5 CPU → an ``ActorPoolStrategy`` of
``--actors`` at the CPUs ``choose_parallelism`` gives them, batch 32) but identity functions in place
of the S3 reads and the ``Predictor``, then ``shutdown_local_ray``. Prints one JSON line of phase
times (seconds since the process started, by ``time.time()`` against the process's start time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

T0 = psutil.Process().create_time()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Identity:
    """The Predictor's place in the pool: returns its batch."""

    def __call__(self, batch):  # noqa: ANN001, ANN204 - a Ray Data UDF
        return batch


def identity(batch):  # noqa: ANN001, ANN201 - a Ray Data UDF
    return batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=16, help="input blocks (a 1,000-key run has 16)")
    p.add_argument("--actors", type=int, default=2)
    args = p.parse_args()
    marks = {"python start + imports": time.time() - T0}

    import pyarrow as pa
    import ray

    from mlc_ray.cli import init_ray, shutdown_local_ray
    from mlc_ray.progress import quiet_ray_progress
    from mlc_ray.tagging.parallelism import choose_parallelism

    init_ray()
    quiet_ray_progress()
    par = choose_parallelism(ray.cluster_resources().get("CPU", 1), actors=(args.actors, args.actors))
    marks["Ray start"] = time.time() - T0
    blocks = [
        pa.table({"_shard": [0], "_start": [64 * i], "_stop": [64 * (i + 1)]}) for i in range(args.chunks)
    ]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(identity, batch_size=None, batch_format="pyarrow", num_cpus=par.read_cpus)
    ds = ds.map_batches(
        Identity,
        compute=ray.data.ActorPoolStrategy(min_size=par.min_actors, max_size=par.max_actors),
        batch_size=32,
        batch_format="pyarrow",
        num_cpus=par.cpus_per_actor,
    )
    rows = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if not rows:
            marks["actor pool start (to the first rows)"] = time.time() - T0
        rows += batch.num_rows
    marks["all rows"] = time.time() - T0
    shutdown_local_ray()
    marks["Ray shutdown"] = time.time() - T0
    print(json.dumps({"rows": rows, "marks_s": marks}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

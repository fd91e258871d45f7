"""The Ray floor of a tagging run: what the embedded local Ray and Ray Data cost with no mlc_ray work.

    python benchmarks/ray_floor.py [--chunks 16] [--actors 2]

``benchmarks/tagging.py`` runs this beside ``jobs/tag.py`` (configuration ``ray_floor``) so that the
job's fixed cost can be read against what Ray itself costs on the same machine in the same run: the
same ``init_ray`` (local Ray, no dashboard), the same dataset shape as ``tagging/dataset.py`` (chunk
references in ``--chunks`` blocks → a ``map_batches`` task at 0.5 CPU → an ``ActorPoolStrategy`` of
the actors and CPUs ``choose_parallelism`` gives, the job's default batch) but a key-per-row expansion in place
of the S3 reads and an identity ``__call__`` in place of the ``Predictor``, then ``shutdown_local_ray``. Prints one JSON line of phase
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


def keys_of_chunks(batch):  # noqa: ANN001, ANN201 - a Ray Data UDF
    """The read step's place: one row per key of each chunk (as ``read_chunks`` yields), no reads."""
    import pyarrow as pa

    starts, stops = batch.column("_start").to_pylist(), batch.column("_stop").to_pylist()
    return pa.table({"_pos": pa.array([p for a, b in zip(starts, stops, strict=True) for p in range(a, b)])})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=16, help="input blocks (a 1,000-key run has 16)")
    p.add_argument("--actors", type=int, help="pool size (default: choose_parallelism's, as the job)")
    args = p.parse_args()
    marks = {"python start + imports": time.time() - T0}

    import pyarrow as pa
    import ray

    from mlc_ray.cli import init_ray, shutdown_local_ray
    from mlc_ray.progress import quiet_ray_progress
    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.dataset import READ_BLOCK_KEYS
    from mlc_ray.tagging.parallelism import choose_parallelism

    init_ray()
    quiet_ray_progress()
    actors = (args.actors, args.actors) if args.actors else None
    par = choose_parallelism(ray.cluster_resources().get("CPU", 1), actors=actors)
    marks["Ray start"] = time.time() - T0
    keys = READ_BLOCK_KEYS
    blocks = [
        pa.table({"_shard": [0], "_start": [keys * i], "_stop": [keys * (i + 1)]}) for i in range(args.chunks)
    ]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(keys_of_chunks, batch_size=None, batch_format="pyarrow", num_cpus=par.read_cpus)
    ds = ds.map_batches(
        Identity,
        compute=ray.data.ActorPoolStrategy(min_size=par.min_actors, max_size=par.max_actors),
        batch_size=TagConfig.batch_size,  # the job's default
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

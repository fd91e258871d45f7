"""Stages [3]+[4] for one window of shards: a Ray Dataset read → predict, committed shard by shard.

``tag_window`` builds one Ray Dataset over the window's keys (blocks of ``READ_BLOCK_KEYS``):
``read_objects`` tasks (``read.py``) → ``Predictor`` actors (``predictor.py``, an
``ActorPoolStrategy`` sized by ``parallelism.py``); the driver routes each returned part to its
shard's buffer and commits a shard as soon as it is whole (``commit.py``). Ray Data retries a batch
whose actor died at most ``PREDICTOR_MAX_TASK_RETRIES`` times; after that the window's dataset stops
and the images of its uncommitted shards are isolated (``isolation.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.progress import ProgressLine
from mlc_ray.tagging.commit import ShardBuffer, ShardCommitter
from mlc_ray.tagging.config import TagConfig
from mlc_ray.tagging.inputs import Shard
from mlc_ray.tagging.isolation import isolate
from mlc_ray.tagging.parallelism import Parallelism
from mlc_ray.tagging.predictor import Predictor, actor_death_errors
from mlc_ray.tagging.read import read_objects

__all__ = ["tag_window", "READ_BLOCK_KEYS", "PREDICTOR_MAX_TASK_RETRIES"]

log = logging.getLogger(__name__)

READ_BLOCK_KEYS = 64  # keys per read task
# Bounded on purpose: Ray Data's actor pools default to unlimited actor restarts *and* unlimited
# task retries, so an input that crashes its actor's process every time (a decoder bug in a C
# library, a model that aborts) would be retried forever and the job would never end. A batch
# whose actor dies is retried this many times (a lost node or an OOM kill is survived), then the
# run fails with a message naming the shards left; committed shards stay and a rerun resumes.
PREDICTOR_MAX_TASK_RETRIES = 4


def tag_window(
    cfg: TagConfig,
    shards: list[Shard],
    par: Parallelism,
    predictor_kwargs: dict,
    committer: ShardCommitter,
    *,
    progress: ProgressLine,
    first_rows: list[float] | None = None,
) -> str:
    """[3]+[4] one Ray Dataset over a window of shards; commit each shard as soon as it is whole.
    Returns the dataset's execution stats (``Dataset.stats()``). ``first_rows``: when given, the
    ``time.monotonic()`` at which the window's first rows reached the driver is appended to it."""
    import ray

    buffers = {s.index: ShardBuffer(s) for s in shards}
    ds = _shard_dataset(shards)
    ds = ds.map_batches(
        read_objects,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=par.read_cpus,
        fn_kwargs={
            "read_threads": cfg.read_threads,
            "read_retries": cfg.read_retries,
            "read_deadline_s": float(cfg.read_deadline_s),
        },
    )
    ds = ds.map_batches(
        Predictor,
        compute=ray.data.ActorPoolStrategy(min_size=par.min_actors, max_size=par.max_actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=par.cpus_per_actor,
        num_gpus=par.gpus_per_actor if cfg.use_gpu else None,
        fn_constructor_kwargs=predictor_kwargs,
        # no named parameter for it in Ray 2.60: a (deprecated, until 2.64) ray_remote_args key
        max_task_retries=PREDICTOR_MAX_TASK_RETRIES,
    )

    def commit(buf: ShardBuffer) -> None:
        committer.commit(buf)
        del buffers[buf.shard.index]

    actor_deaths = actor_death_errors()
    started = time.monotonic()
    try:
        for part in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if first_rows is not None and (not first_rows or first_rows[-1] < started):
                first_rows.append(time.monotonic())
            shard_ids = np.asarray(part.column("_shard").to_numpy(zero_copy_only=False))
            for index in np.unique(shard_ids):
                buf = buffers.get(int(index))
                if buf is None:
                    continue  # already committed (a retried block after its shard was whole)
                added, failed = buf.add(part.filter(pa.array(shard_ids == index)))
                progress.update(added, failed)
                if buf.complete:
                    commit(buf)
    except actor_deaths as exc:  # a batch outlived PREDICTOR_MAX_TASK_RETRIES: isolate its images
        left = {i: int((~b.seen).sum()) for i, b in buffers.items()}
        log.warning(
            "a batch's actor died %d times (%s): tagging the %d images of shards %s without rows again "
            "in small isolated tasks, to find the image(s) that crash or hang their process",
            PREDICTOR_MAX_TASK_RETRIES + 1,
            type(exc).__name__,
            sum(left.values()),
            sorted(left),
        )
        isolate(cfg, par, predictor_kwargs, list(buffers.values()), cause=exc)
        for buf in list(buffers.values()):
            commit(buf)
        return f"(no Ray Data stats: the window's dataset stopped at {type(exc).__name__}; isolated)\n"
    if buffers:
        missing = {i: int((~b.seen).sum()) for i, b in buffers.items()}
        raise RuntimeError(f"shards {missing} did not receive all their rows; rerun to resume the run")
    return ds.stats()


def _shard_dataset(shards: list[Shard]) -> Any:
    import ray

    blocks = []
    for shard in shards:
        for start in range(0, len(shard), READ_BLOCK_KEYS):
            stop = min(start + READ_BLOCK_KEYS, len(shard))
            blocks.append(
                pa.table(
                    {
                        "_shard": pa.array([shard.index] * (stop - start), pa.int32()),
                        "_pos": pa.array(range(start, stop), pa.int32()),
                        "image_uri": pa.array(shard.uris[start:stop], pa.string()),
                        "source_etag": pa.array(shard.etags[start:stop], pa.string()),
                    }
                )
            )
    return ray.data.from_arrow(blocks)

"""Stages [3]+[4] for every pending shard of a run: one Ray Dataset read → predict, committed shard by shard.

``tag_shards`` builds **one** Ray Dataset for all the run's pending shards, so each ``Predictor``
actor loads the model once for the whole run however many keys it has. The dataset's input is not
the keys but chunk references ``(shard, start, stop)`` of ``READ_BLOCK_KEYS`` keys each (12 bytes per
chunk in the driver): each ``read_chunks`` task loads its shard's descriptor from the run's state
(``ShardStore``, cached per worker process) and reads its chunk's objects (``read.py``: threads,
retries, deadline); then the ``Predictor`` actors (``predictor.py``, an ``ActorPoolStrategy`` sized
by ``parallelism.py``). The driver keeps a buffer only for shards whose rows have started to arrive
(opened from the descriptor on their first row) and commits a shard as soon as it is whole
(``commit.py``), so its memory holds the shards in flight, not the run.

Ray Data retries a batch whose actor died at most ``PREDICTOR_MAX_TASK_RETRIES`` times; after that
the dataset stops and the images of the shards with rows in flight, and of the next shards up to
``ISOLATION_WINDOW_KEYS`` keys (at least one shard), are isolated (``isolation.py``); the shards
after them go into a new dataset. Every stop commits at least one shard, so the loop ends.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.progress import ProgressLine
from mlc_ray.tagging.commit import ShardBuffer, ShardCommitter
from mlc_ray.tagging.config import TagConfig
from mlc_ray.tagging.inputs import Shard, ShardStore
from mlc_ray.tagging.isolation import isolate
from mlc_ray.tagging.parallelism import Parallelism
from mlc_ray.tagging.predictor import Predictor, actor_death_errors
from mlc_ray.tagging.read import read_objects, read_with_retry

__all__ = ["tag_shards", "read_chunks", "READ_BLOCK_KEYS", "MAX_BLOCKS", "PREDICTOR_MAX_TASK_RETRIES"]

log = logging.getLogger(__name__)

READ_BLOCK_KEYS = 64  # keys per chunk: what one read task reads (several per task past MAX_BLOCKS)
MAX_BLOCKS = 2_000  # input blocks of a run's dataset: bounds the driver's block metadata
DESCRIPTOR_READ_RETRIES = 5  # a shard descriptor unread is a failed run, an image unread is one error row
ISOLATION_WINDOW_KEYS = 50_000  # keys an isolation pass takes beyond the shards with rows in flight
# Bounded on purpose: Ray Data's actor pools default to unlimited actor restarts *and* unlimited
# task retries, so an input that crashes its actor's process every time (a decoder bug in a C
# library, a model that aborts) would be retried forever and the job would never end. A batch
# whose actor dies is retried this many times (a lost node or an OOM kill is survived), then the
# run fails with a message naming the shards left; committed shards stay and a rerun resumes.
PREDICTOR_MAX_TASK_RETRIES = 4


@functools.lru_cache(maxsize=4)
def _shard_keys(
    state_dir: str, index: int, retries: int, deadline_s: float
) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """A shard's keys from its descriptor, read with the tagging reads' retry policy (a throttled
    store is retried, not fatal); cached per worker process (a shard's chunks mostly run on the same
    few workers one after another)."""
    store = ShardStore(state_dir)
    data, error = read_with_retry(store.uri(index), retries, deadline_s=deadline_s)
    if data is None:
        raise RuntimeError(f"shard descriptor {store.uri(index)}: {error}; rerun to resume the run")
    shard = Shard.from_json(data.decode())
    if shard.index != index:
        raise RuntimeError(f"{store.uri(index)}: holds shard {shard.index}, expected {index}")
    return shard.uris, shard.etags


def read_chunks(
    batch: pa.Table,
    *,
    state_dir: str,
    read_threads: int,
    read_retries: int,
    read_deadline_s: float,
) -> Iterator[pa.Table]:
    """Ray Data task UDF: chunk references ``(_shard, _start, _stop)`` → the chunks' keys with their
    bytes (``read_objects``): ``_shard``, ``_pos``, ``image_uri``, ``source_etag``, ``data``, ``read_error``;
    one table per chunk as soon as it is read (a block of many chunks never sits whole in memory)."""
    for index, start, stop in zip(
        batch.column("_shard").to_pylist(),
        batch.column("_start").to_pylist(),
        batch.column("_stop").to_pylist(),
        strict=True,
    ):
        # the run's own state, not an image: never fewer tries than DESCRIPTOR_READ_RETRIES
        retries = max(read_retries, DESCRIPTOR_READ_RETRIES)
        uris, etags = _shard_keys(state_dir, int(index), retries, read_deadline_s)
        keys = pa.table(
            {
                "_shard": pa.array([index] * (stop - start), pa.int32()),
                "_pos": pa.array(range(start, stop), pa.int32()),
                "image_uri": pa.array(uris[start:stop], pa.string()),
                "source_etag": pa.array(etags[start:stop], pa.string()),
            }
        )
        yield read_objects(
            keys, read_threads=read_threads, read_retries=read_retries, read_deadline_s=read_deadline_s
        )


def tag_shards(
    cfg: TagConfig,
    store: ShardStore,
    pending: dict[int, tuple[int, str]],
    par: Parallelism,
    predictor_kwargs: dict,
    committer: ShardCommitter,
    *,
    progress: ProgressLine,
    first_rows: list[float] | None = None,
) -> list[str]:
    """[3]+[4] every shard of ``pending`` (index → (number of keys, digest from the listing)), in one
    Ray Dataset (more only after an isolation pass); each shard committed as soon as it is whole.
    Returns each dataset's execution stats (``Dataset.stats()``). ``first_rows``: the
    ``time.monotonic()`` at which the first rows reached the driver is appended to it."""
    left = dict(pending)
    stats: list[str] = []
    while left:
        stats.append(
            _tag_dataset(
                cfg, store, left, par, predictor_kwargs, committer, progress=progress, first_rows=first_rows
            )
        )
    return stats


def _tag_dataset(
    cfg: TagConfig,
    store: ShardStore,
    left: dict[int, tuple[int, str]],
    par: Parallelism,
    predictor_kwargs: dict,
    committer: ShardCommitter,
    *,
    progress: ProgressLine,
    first_rows: list[float] | None,
) -> str:
    """One dataset over the shards of ``left``; removes from ``left`` every shard it commits."""
    import ray

    ds = _chunk_dataset(left)
    ds = ds.map_batches(
        read_chunks,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=par.read_cpus,
        fn_kwargs={
            "state_dir": store.state_dir,
            "read_threads": cfg.read_threads,
            "read_retries": cfg.read_retries,
            "read_deadline_s": float(cfg.read_deadline_s),
        },
    )
    with warnings.catch_warnings():
        # no named parameter for max_task_retries in Ray 2.60: a ray_remote_args key, which Ray warns
        # is deprecated (until 2.64; pyproject pins <2.61) on every run, a line users cannot act on
        warnings.filterwarnings(
            "ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning
        )
        ds = ds.map_batches(
            Predictor,
            compute=ray.data.ActorPoolStrategy(min_size=par.min_actors, max_size=par.max_actors),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_cpus=par.cpus_per_actor,
            num_gpus=par.gpus_per_actor if cfg.use_gpu else None,
            fn_constructor_kwargs=predictor_kwargs,
            max_task_retries=PREDICTOR_MAX_TASK_RETRIES,
        )
    buffers: dict[int, ShardBuffer] = {}

    def open_buffer(index: int) -> ShardBuffer:
        shard = store.get(index)
        if shard.digest != left[index][1]:
            raise RuntimeError(f"{store.uri(index)}: descriptor does not match the run's listing")
        buffers[index] = ShardBuffer(shard)
        return buffers[index]

    def commit(buf: ShardBuffer) -> None:
        committer.commit(buf)
        del buffers[buf.shard.index]
        del left[buf.shard.index]

    actor_deaths = actor_death_errors()
    started = time.monotonic()
    try:
        for part in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if first_rows is not None and (not first_rows or first_rows[-1] < started):
                first_rows.append(time.monotonic())
            shard_ids = np.asarray(part.column("_shard").to_numpy(zero_copy_only=False))
            for index in np.unique(shard_ids):
                index = int(index)
                if index not in left:
                    continue  # already committed (a retried block after its shard was whole)
                buf = buffers.get(index) or open_buffer(index)
                added, failed = buf.add(part.filter(pa.array(shard_ids == index)))
                progress.update(added, failed)
                if buf.complete:
                    commit(buf)
    except actor_deaths as exc:  # a batch outlived PREDICTOR_MAX_TASK_RETRIES: isolate its images
        # the failing batch is in a shard in flight or among the next ones: isolate those with rows
        # and the following shards up to ISOLATION_WINDOW_KEYS keys (at least one); the rest of the
        # run goes into a new dataset
        keys = sum(len(b.shard) for b in buffers.values())
        for index in sorted(left):
            if index in buffers:
                continue
            if buffers and keys + left[index][0] > ISOLATION_WINDOW_KEYS:
                break
            open_buffer(index)
            keys += left[index][0]
        missing = {i: int((~b.seen).sum()) for i, b in buffers.items()}
        log.warning(
            "a batch's actor died %d times (%s): tagging the %d images of shards %s without rows again "
            "in small isolated tasks, to find the image(s) that crash or hang their process%s",
            PREDICTOR_MAX_TASK_RETRIES + 1,
            type(exc).__name__,
            sum(missing.values()),
            sorted(missing),
            f"; the {len(left) - len(buffers)} shard(s) not started go into a new dataset"
            if len(left) > len(buffers)
            else "",
        )
        isolate(cfg, par, predictor_kwargs, list(buffers.values()), cause=exc)
        for buf in list(buffers.values()):
            commit(buf)
        return f"(no Ray Data stats: the dataset stopped at {type(exc).__name__}; isolated)\n"
    if left:
        missing = {i: int((~buffers[i].seen).sum()) if i in buffers else left[i][0] for i in left}
        raise RuntimeError(f"shards {missing} did not receive all their rows; rerun to resume the run")
    return ds.stats()


def _chunk_dataset(left: dict[int, tuple[int, str]]) -> Any:
    """Chunk references ``(_shard, _start, _stop)`` of ``READ_BLOCK_KEYS`` keys, in shard order, one
    chunk per block up to ``MAX_BLOCKS`` blocks (more chunks share blocks; a task reads a block's
    chunks one after another)."""
    import ray

    shard_ids, starts, stops = [], [], []
    for index in sorted(left):
        n = left[index][0]
        for start in range(0, n, READ_BLOCK_KEYS):
            shard_ids.append(index)
            starts.append(start)
            stops.append(min(start + READ_BLOCK_KEYS, n))
    per_block = max(1, -(-len(starts) // MAX_BLOCKS))
    blocks = [
        pa.table(
            {
                "_shard": pa.array(shard_ids[i : i + per_block], pa.int32()),
                "_start": pa.array(starts[i : i + per_block], pa.int32()),
                "_stop": pa.array(stops[i : i + per_block], pa.int32()),
            }
        )
        for i in range(0, len(starts), per_block)
    ]
    return ray.data.from_arrow(blocks)

"""Poison images: the isolation pass that finds the image(s) that crash or hang their process.

When a batch's actor has died ``PREDICTOR_MAX_TASK_RETRIES + 1`` times (``dataset.py``), the run's
dataset stops and ``isolate`` tags the images of the shards it had in flight again on ``Isolator`` actors
(``max_restarts=0``, ``max_task_retries=0``): a group whose process dies, or outlives
``--batch-timeout-s`` (timed by the driver from when the call reaches an idle, ready actor; the
actor is then killed), is split in halves until the image is alone; alone, it gets
``ISOLATION_ATTEMPTS`` tries, then its row says ``crashed: ...`` or ``timeout: ...``. The job goes
on; more than ``ISOLATION_MAX_IMAGES`` such images in one isolation pass means the model or the machine is
broken, not an image: the run fails with a clear error.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.cli import JobError
from mlc_ray.tagging.commit import ShardBuffer
from mlc_ray.tagging.config import TagConfig
from mlc_ray.tagging.inputs import Shard
from mlc_ray.tagging.parallelism import Parallelism
from mlc_ray.tagging.predictor import ROUTING_COLUMNS, Predictor, actor_death_errors
from mlc_ray.tagging.read import read_objects
from mlc_ray.tagging.report import THUMB_COLUMN
from mlc_ray.tagging.table import ERROR_CRASHED, ERROR_TIMEOUT, Provenance, tag_rows

__all__ = ["isolate", "Isolator", "ISOLATION_ATTEMPTS", "ISOLATION_MAX_IMAGES"]

log = logging.getLogger(__name__)

ISOLATION_ATTEMPTS = 2  # tries of an isolated single image before its row says crashed/timeout
ISOLATION_MAX_IMAGES = 20  # more crashing images than this in one isolation pass: the run fails instead


class Isolator:
    """Ray actor of the isolation pass: one warm Predictor (no watchdog: the driver times each call
    from when it is sent to this idle, ready actor, and kills the actor when it is late)."""

    def __init__(
        self, predictor_kwargs: dict, read_threads: int, read_retries: int, read_deadline_s: float
    ) -> None:
        self.predictor = Predictor(**{**predictor_kwargs, "batch_timeout_s": None})
        self.read_threads, self.read_retries = read_threads, read_retries
        self.read_deadline_s = read_deadline_s

    def ready(self) -> bool:
        return True

    def tag(self, table: pa.Table) -> pa.Table:
        return self.predictor(
            read_objects(
                table,
                read_threads=self.read_threads,
                read_retries=self.read_retries,
                read_deadline_s=self.read_deadline_s,
            )
        )


def isolate(
    cfg: TagConfig, par: Parallelism, predictor_kwargs: dict, buffers: list[ShardBuffer], *, cause: Exception
) -> None:
    """Fill ``buffers``' missing rows by tagging their images again on isolation actors, halving each
    group whose process dies or hangs until the image is alone (module docstring); fills every row."""
    import ray

    actor_cls = ray.remote(Isolator).options(
        num_cpus=par.cpus_per_actor,
        num_gpus=par.gpus_per_actor if cfg.use_gpu else None,
        max_restarts=0,
        max_task_retries=0,
    )
    by_index = {b.shard.index: b for b in buffers}
    pending: list[tuple[pa.Table, int]] = []  # (group, failed tries of this exact group)
    for buf in buffers:
        missing = np.flatnonzero(~buf.seen)
        for start in range(0, len(missing), cfg.batch_size):
            pending.append((_key_table(buf.shard, missing[start : start + cfg.batch_size]), 0))
    pending.reverse()  # pop() takes them in shard order
    timeout = float(cfg.batch_timeout_s)
    poisoned: list[str] = []
    actor_deaths = actor_death_errors()

    def new_actor() -> Any:
        actor = actor_cls.remote(
            predictor_kwargs, cfg.read_threads, cfg.read_retries, float(cfg.read_deadline_s)
        )
        try:
            ray.get(actor.ready.remote(), timeout=max(300.0, timeout))
        except (*actor_deaths, ray.exceptions.GetTimeoutError) as exc:
            raise JobError(
                f"the isolation pass could not start an inference actor ({type(exc).__name__}) after "
                f"{type(cause).__name__} in the tagging dataset; committed shards stay and a rerun resumes",
                exit_code=1,
            ) from exc
        return actor

    def route(part: pa.Table) -> None:
        shard_ids = np.asarray(part.column("_shard").to_numpy(zero_copy_only=False))
        for index in np.unique(shard_ids):
            by_index[int(index)].add(part.filter(pa.array(shard_ids == index)))

    def failed(group: pa.Table, tries: int, kind: str, detail: str) -> None:
        if group.num_rows > 1:
            half = group.num_rows // 2
            pending.extend([(group.slice(half), 0), (group.slice(0, half), 0)])
            return
        if tries + 1 < ISOLATION_ATTEMPTS:
            pending.append((group, tries + 1))
            return
        uri = group.column("image_uri")[0].as_py()
        poisoned.append(uri)
        log.error("%s: its process %s %d times with the image alone (%s)", uri, kind, tries + 1, detail)
        if len(poisoned) > ISOLATION_MAX_IMAGES:
            raise JobError(
                f"more than {ISOLATION_MAX_IMAGES} images crashed or hung their process even when "
                f"tagged alone (first: {poisoned[0]}): the model, the backend or the machine is broken, "
                "not the images; committed shards stay and a rerun resumes the run",
                exit_code=1,
            ) from cause
        code = ERROR_CRASHED if kind == "crashed" else ERROR_TIMEOUT
        message = (
            f"{code}: the process tagging this image {kind} {tries + 1} times with the image alone ({detail})"
        )
        route(_error_rows(group, message, predictor_kwargs))

    actors = [new_actor() for _ in range(max(1, min(par.max_actors, len(pending))))]
    idle = list(range(len(actors)))
    in_flight: dict[Any, tuple[int, pa.Table, int, float]] = {}  # ref -> (slot, group, tries, sent)
    try:
        while pending or in_flight:
            while pending and idle:
                slot = idle.pop()
                group, tries = pending.pop()
                in_flight[actors[slot].tag.remote(group)] = (slot, group, tries, time.monotonic())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                slot, group, tries, _ = in_flight.pop(ref)
                try:
                    route(ray.get(ref))
                except actor_deaths as exc:
                    actors[slot] = new_actor()
                    failed(group, tries, "crashed", type(exc).__name__)
                idle.append(slot)
            now = time.monotonic()
            for ref, (slot, group, tries, sent) in list(in_flight.items()):
                if now - sent > timeout:
                    del in_flight[ref]
                    ray.kill(actors[slot])
                    actors[slot] = new_actor()
                    failed(group, tries, "hung", f"> {timeout:.0f} s, --batch-timeout-s")
                    idle.append(slot)
    finally:
        for actor in actors:
            ray.kill(actor)
    if poisoned:
        log.warning("isolated %d image(s) that crash or hang their process: %s", len(poisoned), poisoned)


def _key_table(shard: Shard, positions: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "_shard": pa.array([shard.index] * len(positions), pa.int32()),
            "_pos": pa.array(positions, pa.int32()),
            "image_uri": pa.array([shard.uris[p] for p in positions], pa.string()),
            "source_etag": pa.array([shard.etags[p] for p in positions], pa.string()),
        }
    )


def _error_rows(group: pa.Table, message: str, predictor_kwargs: dict) -> pa.Table:
    n = group.num_rows
    table = tag_rows(
        image_uris=group.column("image_uri").to_pylist(),
        source_etags=group.column("source_etag").to_pylist(),
        label_names=predictor_kwargs["labels"],
        scores=None,
        predicted=None,
        ok_rows=[],
        widths=[None] * n,
        heights=[None] * n,
        errors=[message] * n,
        provenance=Provenance.from_dict(predictor_kwargs["provenance"]),
    )
    table = table.append_column(ROUTING_COLUMNS[0], group.column("_shard"))
    table = table.append_column(ROUTING_COLUMNS[1], group.column("_pos"))
    return table.append_column(THUMB_COLUMN, pa.nulls(n, pa.binary()))

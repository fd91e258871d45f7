"""How many inference actors, with how many threads each: ``choose_parallelism``.

The rule, overridable with ``--actors`` / ``--threads-per-actor``: with C cluster CPUs, keep
R = C // 8 CPUs for the read tasks and the driver when C >= 8, none below (reads are I/O bound: each
read task holds ``num_cpus=0.5`` and many threads, and a few ms of CPU per image does not need a
whole CPU of a small machine); give each inference actor T = 1 intra-op thread when C - R < 4,
else T = 2 (onnxruntime scales sub-linearly with threads, so more single-session actors beat one
wide session); actors = (C - R) // T, fixed size. With ``--use-gpu``: one actor per GPU,
T = max(1, (C - R) // GPUs) CPU threads for its decoding. Each actor reserves T CPUs, unless the
minimum pool would leave less than a read task's 0.5 CPU (always so below 8 CPUs; an explicit
``--actors`` / ``--threads-per-actor`` too large): then the actors share what is left (quarter
CPUs, threads oversubscribed; a warning when the pool was explicit), because a pool that holds
every CPU never runs a read task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from mlc_ray.cli import UserError

__all__ = ["Parallelism", "choose_parallelism", "fit_to_blocks"]

log = logging.getLogger(__name__)

SMALL_CLUSTER_CPUS = 8  # below this, no CPU is kept back from the actors for the read tasks


@dataclass(frozen=True)
class Parallelism:
    min_actors: int
    max_actors: int
    threads_per_actor: int
    gpus_per_actor: float = 0.0
    read_cpus: float = 0.5
    # CPUs each actor reserves: its threads, unless min_actors x threads leave no room for the read
    # tasks (a 2-CPU machine with --threads-per-actor 2); then the room is shared, and the actors'
    # threads oversubscribe it, instead of a pool that can never schedule a read task
    cpus_per_actor: float = 0.0

    def __post_init__(self) -> None:
        if not self.cpus_per_actor:
            object.__setattr__(self, "cpus_per_actor", float(self.threads_per_actor))


def choose_parallelism(
    cluster_cpus: float,
    *,
    cluster_gpus: float = 0.0,
    use_gpu: bool = False,
    actors: tuple[int, int] | None = None,
    threads_per_actor: int | None = None,
) -> Parallelism:
    """Actors and threads from the cluster's CPUs (the rule is in the module docstring)."""
    cpus = max(1, int(cluster_cpus))
    # under 8 CPUs a whole CPU kept back for reads idles most of the time (a read costs a few ms of
    # CPU, mostly waiting): the actors take every CPU and share the read tasks' half CPU (below)
    reserve = cpus // 8 if cpus >= SMALL_CLUSTER_CPUS else 0
    budget = max(1, cpus - reserve)
    explicit = actors is not None or threads_per_actor is not None
    if use_gpu:
        gpus = max(1, int(cluster_gpus))
        n = actors or (gpus, gpus)
        threads = threads_per_actor or max(1, budget // n[1])
        par = Parallelism(n[0], n[1], threads, gpus_per_actor=min(1.0, gpus / n[1]))
    else:
        threads = threads_per_actor or (1 if budget < 4 else 2)
        if actors is None:
            count = max(1, budget // threads)
            actors = (count, count)
        par = Parallelism(actors[0], actors[1], threads)
    room = float(cluster_cpus) - par.read_cpus  # what the actors may reserve with one read task running
    if par.min_actors * par.cpus_per_actor > room:
        share = room / par.min_actors
        if share < 0.25:
            raise UserError(
                f"--actors {par.min_actors}: the cluster has {cluster_cpus:g} CPUs, too few for "
                f"{par.min_actors} inference actors and the read tasks; use fewer actors or more CPUs"
            )
        share = float(int(share * 4) / 4)  # quarter CPUs
        (log.warning if explicit else log.info)(
            "%d actor(s) x %d thread(s) would leave no CPU for the read tasks on %g CPUs: each actor "
            "reserves %.2f CPUs and runs its %d thread(s) on them",
            par.min_actors,
            par.threads_per_actor,
            cluster_cpus,
            share,
            par.threads_per_actor,
        )
        par = replace(par, cpus_per_actor=share)
    return par


def fit_to_blocks(par: Parallelism, blocks: int) -> Parallelism:
    """The pool never outnumbers the run's input blocks (``READ_BLOCK_KEYS`` keys each): a small
    incremental run of a few dozen images is one block, which one actor takes; a second actor only
    cost its start (measured 2026-12-06, AMD EPYC 2 vCPUs, a 9-image run, three alternating pairs:
    pool start to the first rows 5.2-6.1 s with 2 actors, 3.6-5.0 s with 1) and made Ray Data warn
    that the pool "won't fully utilize the available concurrency"."""
    if not 0 < blocks < par.max_actors:
        return par
    return replace(par, min_actors=min(par.min_actors, blocks), max_actors=blocks)

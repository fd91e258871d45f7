"""Bulk tagging with Ray Data: list → read bytes (tasks) → decode + infer (actor pool) → Parquet shards.

``run_tagging(cfg)`` is the whole job; ``jobs/tag.py`` only parses arguments. The stages:

1. **Resolve** the model once in the driver (``registry.resolve_model``: alias → concrete version,
   files downloaded once and checked against their sha256 tags). The backend's file bytes are put in
   the object store once and every actor builds its session from them, so actors on other nodes
   never touch MLflow or the cache.
2. **List** the input as a stream of pages, cut it into shards of ``shard_size`` keys and persist
   each shard's descriptor under ``<output>/_runs/<run_id>/shards/`` (driver memory: one shard).
   ``--incremental`` drops keys whose (uri, etag) this model version already tagged (``TaggedIndex``).
3. **Tag** pending shards in windows of about ``WINDOW_KEYS`` keys: a Ray Dataset of the window's
   keys → ``read_objects`` tasks (threads, retries with jittered backoff; a missing or unreadable
   object becomes an ``unreadable`` error row) → ``Predictor`` actors
   (``ActorPoolStrategy``): robust decode at draft scale, ``preprocess_eval`` per the version's
   ``preprocess.json``, inference, thresholds, and a ``pyarrow.Table`` in the tag-table schema.
4. **Commit**: the driver gathers each shard's rows; when all of a shard's positions are in (no
   more, no less, in the shard's order) it writes the shard's Parquet file under a temporary name
   and commits it under its deterministic name. Committed shards are skipped on a rerun, so a
   killed driver or actor never loses or duplicates a row: Ray Data retries a task whose actor
   died (at most ``PREDICTOR_MAX_TASK_RETRIES`` times), and a shard is only committed whole.
   **Poison images**: a batch running longer than ``--batch-timeout-s`` makes its actor exit (a
   watchdog thread), so a hang becomes an actor death too. When a batch's actor has died
   ``PREDICTOR_MAX_TASK_RETRIES + 1`` times, the window's dataset stops and the images of its
   uncommitted shards are *isolated*: tagged again in small Ray tasks (``max_retries=0``), a group
   whose process dies (or outlives the timeout: cancelled) is split in halves until the image is
   alone; alone, it gets ``ISOLATION_ATTEMPTS`` tries, then its row says ``crashed: ...`` or
   ``timeout: ...``. The job goes on; more than ``ISOLATION_MAX_IMAGES`` such images in one window
   means the model or the machine is broken, not an image: the run fails with a clear error.
5. **Summarise**: counts and errors by code in ``summary.json`` (+ ``_SUCCESS`` when the error rate
   is within ``--max-error-rate``) under the run's state directory, and a table in the log.
6. **Report** (``report.py``): per-label counts and score histograms taken from each shard's rows at
   commit, contact-sheet thumbnails chosen in the actors (``_thumb`` column, dropped before the
   Parquet file), the drift check against the bundle's ``label_rates.json``, the files under
   ``_runs/<run_id>/report/`` and one MLflow run in experiment ``tagging``. ``--drift-alert`` turns a
   moved label into exit 3, after everything is written. Tag-time options (``options.py``) decide
   the listed labels in the Predictor; the log gets one progress line every ``--progress-every`` s.

Parallelism rule (``choose_parallelism``), overridable with ``--actors`` / ``--threads-per-actor``:
with C cluster CPUs, keep R = max(1, C // 8) CPUs for the read tasks and the driver (reads are I/O
bound: each read task holds ``num_cpus=0.5`` and many threads); give each inference actor T = 1
intra-op thread when C - R < 4, else T = 2 (onnxruntime scales sub-linearly with threads, so more
single-session actors beat one wide session); actors = (C - R) // T, fixed size. With ``--use-gpu``:
one actor per GPU, T = max(1, (C - R) // GPUs) CPU threads for its decoding. Each actor reserves T
CPUs, unless the minimum pool (explicit ``--actors`` / ``--threads-per-actor``) would leave less
than a read task's 0.5 CPU: then the actors share what is left (quarter CPUs, threads
oversubscribed) and a warning says so, because a pool that holds every CPU never runs a read task.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.cli import JobError, UserError
from mlc_ray.progress import ProgressLine, quiet_ray_progress
from mlc_ray.tagging.config import DEFAULT_READ_DEADLINE_S, DEMO_MODEL_URI, TagConfig
from mlc_ray.tagging.inputs import Shard, ShardStore, is_manifest, iter_input_keys, iter_shards
from mlc_ray.tagging.options import TagOptions
from mlc_ray.tagging.report import (
    THUMB_COLUMN,
    RunReport,
    ThumbnailSampler,
    empty_totals,
    load_expectation,
    merge_totals,
    shard_label_stats,
)
from mlc_ray.tagging.state import (
    RunState,
    TaggedIndex,
    changed_settings,
    default_run_id,
    key_hashes,
    row_affecting_settings,
    run_dir,
)
from mlc_ray.tagging.table import (
    ERROR_CRASHED,
    ERROR_TIMEOUT,
    ERROR_UNREADABLE,
    TAG_TABLE_SCHEMA,
    Provenance,
    TagTableWriter,
    shard_file_name,
    tag_rows,
)

__all__ = [
    "run_tagging",
    "TagSummary",
    "Parallelism",
    "choose_parallelism",
    "read_objects",
    "Predictor",
    "EXIT_ERROR_RATE",
    "EXIT_DRIFT",
]

log = logging.getLogger(__name__)

EXIT_ERROR_RATE = 1  # the job's exit code when the error rate is above --max-error-rate
EXIT_DRIFT = 3  # ... when a label's rate left the --drift-alert band (rows and report are written)
WINDOW_KEYS = 50_000  # keys per Ray Dataset: bounds the driver's buffered results
READ_BLOCK_KEYS = 64  # keys per read task
# Bounded on purpose: Ray Data's actor pools default to unlimited actor restarts *and* unlimited
# task retries, so an input that crashes its actor's process every time (a decoder bug in a C
# library, a model that aborts) would be retried forever and the job would never end. A batch
# whose actor dies is retried this many times (a lost node or an OOM kill is survived), then the
# run fails with a message naming the shards left; committed shards stay and a rerun resumes.
PREDICTOR_MAX_TASK_RETRIES = 4
ISOLATION_ATTEMPTS = 2  # tries of an isolated single image before its row says crashed/timeout
ISOLATION_MAX_IMAGES = 20  # more crashing images than this in one window: the run fails instead
ROUTING_COLUMNS = (pa.field("_shard", pa.int32()), pa.field("_pos", pa.int32()))
# _thumb: a small JPEG for the rows that enter the run's contact-sheet selections (report.py), else null
PREDICTOR_OUTPUT_SCHEMA = pa.schema([*TAG_TABLE_SCHEMA, *ROUTING_COLUMNS, THUMB_COLUMN])
# Test/chaos hook: when set to a path that does not exist yet, the first Predictor call creates it
# and kills its own process (a crashed actor), once per marker.
CHAOS_EXIT_ONCE_ENV = "MLC_RAY_CHAOS_PREDICTOR_EXIT_ONCE"
# Test/chaos hook: seconds each Predictor call sleeps (lets a test kill the driver mid-run).
CHAOS_DELAY_ENV = "MLC_RAY_CHAOS_PREDICTOR_DELAY_S"


def _actor_deaths() -> tuple[type[BaseException], ...]:
    import ray

    return (
        ray.exceptions.ActorDiedError,
        ray.exceptions.ActorUnavailableError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.TaskCancelledError,
    )


_TRANSIENT_CODES = {
    "SlowDown",
    "503",
    "500",
    "502",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
}


# --------------------------------------------------------------------------------------------- parallelism


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
    reserve = max(1, cpus // 8)
    budget = max(1, cpus - reserve)
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
        log.warning(
            "%d actor(s) x %d thread(s) would leave no CPU for the read tasks on %g CPUs: each actor "
            "reserves %.2f CPUs and runs its %d threads on them",
            par.min_actors,
            par.threads_per_actor,
            cluster_cpus,
            share,
            par.threads_per_actor,
        )
        par = replace(par, cpus_per_actor=share)
    return par


# --------------------------------------------------------------------------------------------- read stage


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | ValueError):
        return False
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = str((response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", ""))
        if code in ("NoSuchKey", "404", "403", "AccessDenied", "NoSuchBucket"):
            return False
        return code in _TRANSIENT_CODES or status in _TRANSIENT_CODES
    # connection resets, timeouts, botocore's EndpointConnectionError / ReadTimeoutError, ...
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or "botocore" in type(exc).__module__


def read_with_retry(
    uri: str, retries: int = 5, base_delay: float = 0.2, deadline_s: float = DEFAULT_READ_DEADLINE_S
) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, "unreadable: why"). The one retry policy of a tagging read: at most
    ``retries`` attempts, each a single S3 request (botocore's own retries off) with socket timeouts
    of ``deadline_s``, transient errors retried after a jittered backoff, and no attempt started
    after ``deadline_s`` from the first; a missing/forbidden object is not retried.
    ``read_objects`` also abandons an attempt still hanging at the deadline."""
    from mlc_ray import storage

    start = time.monotonic()
    for attempt in range(1, retries + 1):
        try:
            return storage.read_bytes(uri, single_attempt_timeout_s=deadline_s), None
        except Exception as exc:  # every failure becomes a row, never a failed job
            kind = "not found" if isinstance(exc, FileNotFoundError) else type(exc).__name__
            why = f"{ERROR_UNREADABLE}: {kind}: {exc} (after {attempt} attempt(s))"
            if not _is_transient(exc) or attempt == retries:
                return None, why
            delay = min(10.0, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if time.monotonic() - start + delay >= deadline_s:
                return None, f"{why}; read deadline {deadline_s:g} s (--read-deadline-s) reached"
            time.sleep(delay)
    return None, f"{ERROR_UNREADABLE}: no attempt made"  # retries < 1


def read_objects(
    batch: pa.Table,
    *,
    read_threads: int = 16,
    read_retries: int = 5,
    read_deadline_s: float = DEFAULT_READ_DEADLINE_S,
) -> pa.Table:
    """Ray Data task UDF: add ``data`` (bytes or null) and ``read_error``; fill unknown etags (local
    files, manifest entries) with ``storage.content_hash`` of the bytes. An object still not read
    ``read_deadline_s`` after its first request (a GET held open) is an ``unreadable`` row at that
    moment; its thread is left to its socket timeout (the same deadline) and the task moves on."""
    from mlc_ray import storage

    uris = batch.column("image_uri").to_pylist()
    etags = batch.column("source_etag").to_pylist()
    workers = max(1, min(read_threads, len(uris)))
    started: dict[int, float] = {}

    def read(i: int) -> tuple[bytes | None, str | None]:
        started[i] = time.monotonic()
        return read_with_retry(uris[i], read_retries, deadline_s=read_deadline_s)

    results: list[tuple[bytes | None, str | None]] = [(None, None)] * len(uris)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(read, i): i for i in range(len(uris))}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=min(1.0, read_deadline_s / 4), return_when=FIRST_COMPLETED)
            for fut in done:
                results[futures[fut]] = fut.result()
            now = time.monotonic()
            for fut in [f for f in pending if now - started.get(futures[f], now) > read_deadline_s]:
                pending.discard(fut)
                results[futures[fut]] = (
                    None,
                    f"{ERROR_UNREADABLE}: no answer within the read deadline of {read_deadline_s:g} s "
                    "(--read-deadline-s)",
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    filled = [
        etag if etag or data is None else storage.content_hash(data)
        for etag, (data, _) in zip(etags, results, strict=True)
    ]
    out = batch.set_column(
        batch.schema.get_field_index("source_etag"), "source_etag", pa.array(filled, pa.string())
    )
    out = out.append_column("data", pa.array([d for d, _ in results], pa.binary()))
    return out.append_column("read_error", pa.array([e for _, e in results], pa.string()))


# --------------------------------------------------------------------------------------------- infer stage


class Predictor:
    """Ray Data actor UDF: decode + preprocess + infer + threshold, one backend session per actor."""

    def __init__(
        self,
        *,
        model: Any,
        labels: list[str],
        thresholds: list[float],
        preprocess: dict,
        provenance: dict,
        threads: int = 1,
        use_gpu: bool = False,
        batch_timeout_s: float | None = None,
        chaos_exit_once: str | None = None,
        chaos_delay_s: float = 0.0,
        options: dict | None = None,
        sample_thumbnails: bool = True,
    ) -> None:
        import threading

        import ray

        from mlc_ray.data.images import PreprocessConfig
        from mlc_ray.tagging.backends import make_backend

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        self.backend = make_backend(model, threads=threads, use_gpu=use_gpu)
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.preprocess = PreprocessConfig.from_dict(preprocess)
        self.provenance = Provenance.from_dict(provenance)
        self.options = TagOptions.from_dict(options)
        self.allowed = self.options.allowed_mask(self.labels)
        self.sampler = ThumbnailSampler(self.thresholds) if sample_thumbnails else None
        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self.chaos_exit_once = chaos_exit_once
        self.chaos_delay_s = float(chaos_delay_s)
        self.batch_timeout_s = batch_timeout_s
        self._busy_since: float | None = None
        if batch_timeout_s:
            threading.Thread(target=self._watchdog, name="batch-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        """Exit the process when a batch outlives ``batch_timeout_s``: a hung decoder or model call
        cannot be interrupted from Python, but a dead actor is retried (bounded), then isolated."""
        assert self.batch_timeout_s
        while True:
            time.sleep(min(1.0, self.batch_timeout_s / 4))
            started = self._busy_since
            if started is not None and time.monotonic() - started > self.batch_timeout_s:
                log.error(
                    "a batch has run %.0f s (> batch_timeout_s %.0f s): exiting this actor so the batch "
                    "is retried, and its images isolated if it hangs again",
                    time.monotonic() - started,
                    self.batch_timeout_s,
                )
                os._exit(1)

    def _prepare(
        self, item: tuple[bytes | None, str | None]
    ) -> tuple[np.ndarray | None, int | None, int | None, str | None]:
        from mlc_ray.data.images import prepare_image

        data, read_error = item
        if read_error is not None:
            return None, None, None, read_error
        # the one image path (decode policy from preprocess.json): what calibration and pyfunc score
        prepared = prepare_image(data, self.preprocess)
        return prepared.pixels, prepared.width or None, prepared.height or None, prepared.error

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._busy_since = time.monotonic()
        try:
            return self._tag(batch)
        finally:
            self._busy_since = None

    def _tag(self, batch: pa.Table) -> pa.Table:
        if self.chaos_exit_once and not os.path.exists(self.chaos_exit_once):
            with open(self.chaos_exit_once, "w") as fh:
                fh.write(str(os.getpid()))
            os._exit(1)  # simulate a crashed actor: Ray restarts it and retries the task
        if self.chaos_delay_s:
            time.sleep(self.chaos_delay_s)
        items = list(
            zip(batch.column("data").to_pylist(), batch.column("read_error").to_pylist(), strict=True)
        )
        prepared = (
            list(self.pool.map(self._prepare, items)) if self.pool else [self._prepare(i) for i in items]
        )
        ok_rows = [i for i, p in enumerate(prepared) if p[0] is not None]
        scores = predicted = None
        if ok_rows:
            pixels = np.stack([prepared[i][0] for i in ok_rows])
            scores = self.backend.run(pixels)
            if scores.shape != (len(ok_rows), len(self.labels)):
                raise RuntimeError(
                    f"model returned scores of shape {scores.shape}, expected ({len(ok_rows)}, {len(self.labels)})"
                )
            predicted = self.options.select(scores, self.thresholds, self.allowed)
        uris = batch.column("image_uri").to_pylist()
        thumbs: list[bytes | None] = [None] * len(uris)
        if ok_rows and self.sampler is not None:
            made = self.sampler.thumbnails(pixels, scores, [uris[i] for i in ok_rows])
            for i, thumb in zip(ok_rows, made, strict=True):
                thumbs[i] = thumb
        table = tag_rows(
            image_uris=uris,
            source_etags=batch.column("source_etag").to_pylist(),
            label_names=self.labels,
            scores=scores,
            predicted=predicted,
            ok_rows=ok_rows,
            widths=[p[1] for p in prepared],
            heights=[p[2] for p in prepared],
            errors=[p[3] for p in prepared],
            provenance=self.provenance,
        )
        table = table.append_column(ROUTING_COLUMNS[0], batch.column("_shard").cast(pa.int32()))
        table = table.append_column(ROUTING_COLUMNS[1], batch.column("_pos").cast(pa.int32()))
        return table.append_column(THUMB_COLUMN, pa.array(thumbs, pa.binary()))


# --------------------------------------------------------------------------------------------- summary


def error_code(error: str) -> str:
    return error.split(":", 1)[0].strip() or "unknown"


@dataclass
class TagSummary:
    """What a run did; written as ``summary.json`` and printed as a table."""

    run_id: str
    output: str
    dt: str
    model: str  # pinned URI
    model_version: str
    backend: str
    precision: str
    images: int = 0  # rows in the run's committed files (all attempts)
    ok: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_skipped: int = 0  # already committed by an earlier attempt of this run
    images_this_attempt: int = 0
    wall_s: float = 0.0
    images_per_s: float = 0.0  # images tagged by this attempt / its wall time
    max_error_rate: float = 1.0
    incremental: bool = False
    finished_at: str = ""
    notice: str = ""  # e.g. "run ... is already complete; N keys under the input are not in it: ..."
    tag_options: str = "{}"  # TagOptions.to_json()
    drift_alert: float | None = None  # --drift-alert X
    drift_available: bool = False  # the model bundle records its validation rates (label_rates.json)
    drift: list[dict] = field(default_factory=list)  # labels whose status is not "ok" (report.DriftRow)
    report: str = ""  # the report's index.html
    mlflow_run_id: str | None = None  # the run in MLflow experiment "tagging"

    @property
    def drift_alerts(self) -> list[dict]:
        return [d for d in self.drift if d.get("alert")]

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    @property
    def error_rate(self) -> float:
        return self.errors / self.images if self.images else 0.0

    @property
    def error_rate_ok(self) -> bool:
        return self.error_rate <= self.max_error_rate

    def to_json(self) -> str:
        data = asdict(self)
        data.update(errors=self.errors, error_rate=round(self.error_rate, 6))
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def format(self) -> str:
        rows = [
            ("run", f"{self.run_id} (dt={self.dt})"),
            ("model", f"{self.model} ({self.backend} {self.precision})"),
            ("output", self.output),
            ("images", f"{self.images}  ({self.shards} shards, {self.shards_skipped} already committed)"),
            ("ok", str(self.ok)),
            ("errors", f"{self.errors} ({self.error_rate:.2%}; max {self.max_error_rate:.2%})"),
        ]
        rows += [(f"  {code}", str(n)) for code, n in sorted(self.errors_by_code.items())]
        rows += [
            ("this attempt", f"{self.images_this_attempt} images in {self.wall_s:.1f} s"),
            ("images/s", f"{self.images_per_s:.1f}"),
        ]
        if self.tag_options != "{}":
            rows.append(("tag options", self.tag_options))
        moved = [d for d in self.drift if d.get("status") == "moved"]
        if not self.drift_available:
            rows.append(("drift", "not available (the model bundle records no validation rates)"))
        elif not moved:
            rows.append(("drift", "no label moved"))
        for d in moved:
            ratio = d.get("ratio")
            text = "inf" if ratio is None else f"{ratio:.2f}"
            rows.append(
                (
                    f"  {d['label']}",
                    f"rate {d['rate']:.4f} vs {d['expected_rate']:.4f} on validation (x{text}, p={d['p_value']:.1g})"
                    + ("  ALERT" if d.get("alert") else ""),
                )
            )
        if self.report:
            rows.append(("report", self.report))
        if self.mlflow_run_id:
            rows.append(("mlflow run", f"{self.mlflow_run_id} (experiment tagging)"))
        width = max(len(k) for k, _ in rows)
        table = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
        return f"{self.notice}\n{table}" if self.notice else table

    def raise_for_outcome(self) -> None:
        """``JobError`` exit 1 when the error rate is above --max-error-rate, else exit 3
        (``EXIT_DRIFT``) when a label's rate left the --drift-alert band; every row and the
        report are written by then."""
        if not self.error_rate_ok:
            first = ", ".join(f"{k}={v}" for k, v in self.errors_by_code.items())
            raise JobError(
                f"{self.errors} of {self.images} images failed ({self.error_rate:.2%} > "
                f"--max-error-rate {self.max_error_rate:.2%}; {first}); rows are in {self.output}, "
                "look at the `error` column",
                exit_code=EXIT_ERROR_RATE,
            )
        alerts = self.drift_alerts
        if alerts:
            moved = ", ".join(
                f"{d['label']} {d['rate']:.4f} vs {d['expected_rate']:.4f}"
                f" (x{'inf' if d['ratio'] is None else format(d['ratio'], '.2f')})"
                for d in alerts
            )
            raise JobError(
                f"drift: {len(alerts)} label rate(s) outside [1/{self.drift_alert:g}, {self.drift_alert:g}] x "
                f"the model's validation rate: {moved}; every row is written ({self.output}), see the "
                f"report {self.report or '(disabled)'}",
                exit_code=EXIT_DRIFT,
            )


# --------------------------------------------------------------------------------------------- driver


@dataclass
class _Model:
    pinned: str
    name: str
    version: str
    alias: str | None
    local_dir: str


def _resolve(cfg: TagConfig) -> _Model:
    from mlc_ray import storage
    from mlc_ray.registry import ModelNotFoundError, resolve_model

    if (
        not cfg.model.startswith("models:/")
        and not storage.is_s3(cfg.model)
        and not storage.exists(cfg.model)
    ):
        raise UserError(
            f"--model: bundle directory {cfg.model} does not exist; give models:/NAME@ALIAS, "
            "models:/NAME/VERSION or the directory jobs/train.py wrote (<storage-path>/<run-name>/model)"
        )
    try:
        resolved = resolve_model(cfg.model, cfg.model_cache)
    except ModelNotFoundError as exc:
        if cfg.model == DEMO_MODEL_URI:
            raise UserError(
                f"{exc}. The demo champion is not registered yet: run `make demo` (or jobs/train.py then "
                "jobs/promote.py) first, or pass --model models:/NAME@ALIAS or a bundle directory"
            ) from exc
        raise
    if resolved.name:
        return _Model(
            resolved.pinned_uri, resolved.name, str(resolved.version), resolved.alias, resolved.local_dir
        )
    # A bare bundle directory: its name, and the content hash of its fp32 graph as the "version".
    from mlc_ray.bundle import ModelBundle, sha256_file

    digest = sha256_file(ModelBundle(resolved.local_dir).onnx_path)[:12]
    name = os.path.basename(cfg.model.rstrip("/")) or "bundle"
    return _Model(f"{cfg.model.rstrip('/')}#{digest}", name, f"bundle-{digest}", None, resolved.local_dir)


def _load_model_metadata(local_dir: str) -> tuple[list[str], Any, dict]:
    from mlc_ray.bundle import ModelBundle

    bundle = ModelBundle(local_dir)
    # thresholds() refuses a thresholds.json whose labels are not labels.json's
    return bundle.labels(), bundle.thresholds(), bundle.preprocess().to_dict()


def _list_shards(
    cfg: TagConfig, input_uri: str, state: RunState, store: ShardStore, model: _Model
) -> list[str]:
    """[2] stream the listing into shard descriptors; returns the digest per shard (small)."""
    pages: Iterator[list] = iter_input_keys(input_uri)
    if cfg.incremental:
        index = TaggedIndex.from_table(cfg.output, model.name, model.version, by_uri=is_manifest(input_uri))
        log.info("incremental: %d images already tagged by %s v%s", len(index), model.name, model.version)
        pages = _filter_pages(pages, index)
    digests: list[str] = []
    n_images = 0
    for shard in iter_shards(pages, cfg.shard_size, limit=cfg.limit):
        if not digests:
            state.save()  # the input exists: from here on the run is resumable
        store.put(shard)
        digests.append(shard.digest)
        n_images += len(shard)
        if len(digests) % 100 == 0:
            log.info("listed %d shards (%d images) so far", len(digests), n_images)
    from mlc_ray import storage

    storage.write_text(
        storage.join(store.dir, "index.json"), json.dumps({"digests": digests, "images": n_images})
    )
    state.listing_complete, state.n_shards, state.n_images = True, len(digests), n_images
    state.save()
    return digests


def _filter_pages(pages: Iterator[list], index: TaggedIndex) -> Iterator[list]:
    from mlc_ray.tagging.inputs import InputKey

    for page in pages:
        if not index.by_uri and any(not k.etag for k in page):
            # local files list without an ETag: their content hash is what the table recorded
            with ThreadPoolExecutor(max_workers=8) as pool:
                hashes = list(pool.map(lambda k: k.etag or _content_etag_or_none(k.uri), page))
            page = [InputKey(k.uri, h) for k, h in zip(page, hashes, strict=True)]
        tagged = index.contains([k.uri for k in page], [k.etag for k in page])
        kept = [k for k, t in zip(page, tagged, strict=True) if not t]
        if kept:
            yield kept


def _content_etag_or_none(uri: str) -> str | None:
    from mlc_ray import storage

    try:
        return storage.content_etag(uri)
    except OSError:
        return None  # unreadable now: it will be an error row, retried by the next run


def _shard_counts_from_file(uri: str, labels: list[str], thresholds: Any) -> tuple[int, Counter, dict]:
    """Counts of a shard whose counts file is missing (killed between commit and counts): the only
    case that reads a committed file back."""
    import pyarrow.parquet as pq

    from mlc_ray import storage

    fs, path = storage.arrow_filesystem(uri)
    table = pq.read_table(path, columns=["error", "labels", "scores"], filesystem=fs)
    errors = table.column("error").to_pylist()
    stats = shard_label_stats(table, labels, list(thresholds))
    return len(errors), Counter(error_code(e) for e in errors if e), stats


class _ShardBuffer:
    """One shard's rows as they arrive from the actors, keyed by position (a retried task's rows
    replace, never add)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.parts: list[pa.Table] = []
        self.seen = np.zeros(len(shard), dtype=bool)

    def add(self, part: pa.Table) -> tuple[int, int]:
        """Keep the rows of positions not seen yet; returns (rows kept, of which errors)."""
        pos = np.asarray(part.column("_pos").to_numpy(zero_copy_only=False), dtype=np.int64)
        fresh = ~self.seen[pos]
        # positions repeated inside `part` itself keep their first row
        _, first = np.unique(pos, return_index=True)
        keep = np.zeros(len(pos), dtype=bool)
        keep[first] = True
        keep &= fresh
        if not keep.any():
            return 0, 0
        kept = part.filter(pa.array(keep))
        self.parts.append(kept)
        self.seen[pos[keep]] = True
        errors = kept.num_rows - kept.column("error").null_count if "error" in kept.column_names else 0
        return kept.num_rows, errors

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())

    def table(self, *, keep_thumbs: bool = False) -> pa.Table:
        combined = pa.concat_tables(self.parts)
        combined = combined.take(pa.array(np.argsort(combined.column("_pos").to_numpy(), kind="stable")))
        uris = combined.column("image_uri").to_pylist()
        if uris != list(self.shard.uris):
            raise RuntimeError(
                f"shard {self.shard.index}: rows do not match the shard's keys; not committing"
            )
        names = [*TAG_TABLE_SCHEMA.names, *(["_thumb"] if keep_thumbs else [])]
        return combined.select(names)


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


def run_tagging(cfg: TagConfig, *, raise_on_error_rate: bool = True) -> TagSummary:
    """Tag every image of ``cfg.input`` into the tag table at ``cfg.output`` (resuming the same run)."""
    import ray

    from mlc_ray import storage
    from mlc_ray.cli import init_ray
    from mlc_ray.config import config_to_dict
    from mlc_ray.tagging.backends import model_files_for

    t0 = time.monotonic()

    # [1] resolve the model once; load what the actors need (before anything is written)
    model = _resolve(cfg)
    labels, thresholds, preprocess = _load_model_metadata(model.local_dir)
    files = model_files_for(model.local_dir, cfg.backend, cfg.precision)
    input_uri = cfg.input
    if input_uri is None:
        from mlc_ray.data.demo import ensure_demo_data

        input_uri = ensure_demo_data()
        log.info("no --input: tagging the demo images (%s)", input_uri)

    options = cfg.tag_options
    options.check(labels)  # an unknown label in --labels: one error line, before anything is written

    # [2] run identity and state; list into shards unless an earlier attempt finished the listing
    settings = row_affecting_settings(
        model_pinned=model.pinned,
        thresholds_sha256=thresholds.sha256,
        backend=cfg.backend,
        precision=cfg.precision,
        preprocess=preprocess,
        input_uri=input_uri,
        output_uri=cfg.output,
        tag_options=options.to_dict(),
    )
    run_id = cfg.run_id or default_run_id(settings)
    if cfg.incremental and cfg.run_id is None:
        # each scheduled incremental run is its own run; a killed one is redone by the next
        run_id += "-i" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    state = RunState.load(cfg.output, run_id)
    if state is None:
        # saved by _list_shards with the first shard: an input that lists nothing (wrong URI,
        # missing bucket, empty prefix) fails the job without leaving anything under the output
        state = RunState.new(
            run_id=run_id,
            model=model.pinned,
            input=input_uri,
            output=cfg.output,
            config=config_to_dict(cfg),
            settings=settings,
        )
    else:
        if state.model != model.pinned:
            raise UserError(
                f"run {run_id} was started with {state.model}, not {model.pinned}; use another --run-id"
            )
        changed = changed_settings(state.settings, settings)
        if changed:  # only under an explicit --run-id: a default run id is the hash of the settings
            raise UserError(
                f"--run-id {run_id}: the run was started with other row-affecting settings "
                f"({'; '.join(changed)}); its rows would mix both: use another --run-id"
            )
        state.attempts += 1
        state.save()
        log.info("resuming run %s (attempt %d, dt=%s)", run_id, state.attempts, state.dt)
    store = ShardStore(run_dir(cfg.output, run_id))
    if state.listing_complete:
        digests = json.loads(storage.read_text(storage.join(store.dir, "index.json")))["digests"]
    else:
        digests = _list_shards(cfg, input_uri, state, store, model)
    log.info(
        "run %s: %d images in %d shards -> %s/dt=%s",
        run_id,
        state.n_images,
        len(digests),
        cfg.output,
        state.dt,
    )

    writer = TagTableWriter(cfg.output, state.dt, run_id)
    committed = writer.committed_names()
    pending = [i for i, d in enumerate(digests) if shard_file_name(run_id, i, d) not in committed]
    pending_set = set(pending)
    skipped = [i for i in range(len(digests)) if i not in pending_set]
    finished_before = not pending and storage.exists(
        storage.join(run_dir(cfg.output, run_id), "summary.json")
    )
    provenance = Provenance(
        model_name=model.name,
        model_version=model.version,
        model_alias=model.alias,
        thresholds_sha256=thresholds.sha256,
        backend=cfg.backend,
        precision=cfg.precision,
        run_id=run_id,
        tag_options=options.to_json(),
    )
    summary = TagSummary(
        run_id=run_id,
        output=storage.join(cfg.output, f"dt={state.dt}"),
        dt=state.dt,
        model=model.pinned,
        model_version=model.version,
        backend=cfg.backend,
        precision=cfg.precision,
        shards=len(digests),
        shards_skipped=len(skipped),
        max_error_rate=cfg.max_error_rate,
        incremental=cfg.incremental,
        tag_options=options.to_json(),
        drift_alert=cfg.drift_alert,
    )
    counts_dir = storage.join(run_dir(cfg.output, run_id), "counts")
    report = RunReport(
        output=cfg.output,
        run_id=run_id,
        labels=labels,
        thresholds=list(thresholds.values),
        allowed=options.allowed_mask(labels),
        expectation=load_expectation(model.local_dir, labels),
        enabled=cfg.report,
    )
    shard_keys = int(state.config.get("shard_size") or cfg.shard_size)
    progress = ProgressLine(
        "tagging",
        sum(max(0, min(shard_keys, state.n_images - i * shard_keys)) for i in pending),
        cfg.progress_every,
    )

    # [3] tag pending shards, window by window
    t_tag = time.monotonic()
    if pending:
        init_ray()
        quiet_ray_progress()
        resources = ray.cluster_resources()
        par = choose_parallelism(
            resources.get("CPU", 1),
            cluster_gpus=resources.get("GPU", 0),
            use_gpu=cfg.use_gpu,
            actors=cfg.actor_range,
            threads_per_actor=cfg.threads_per_actor,
        )
        if cfg.use_gpu and resources.get("GPU", 0) < 1:
            raise JobError(
                "--use-gpu: the Ray cluster has no GPU; drop --use-gpu or add GPU nodes", exit_code=2
            )
        log.info(
            "inference: %d-%d %s actor(s) x %d thread(s)%s, batch %d",
            par.min_actors,
            par.max_actors,
            cfg.backend,
            par.threads_per_actor,
            f", {par.gpus_per_actor} GPU each" if cfg.use_gpu else "",
            cfg.batch_size,
        )
        model_ref = ray.put(files)
        predictor_kwargs = {
            "model": model_ref,
            "labels": labels,
            "thresholds": list(thresholds.values),
            "preprocess": preprocess,
            "provenance": provenance.to_dict(),
            "threads": par.threads_per_actor,
            "use_gpu": cfg.use_gpu,
            "batch_timeout_s": float(cfg.batch_timeout_s),
            "chaos_exit_once": os.environ.get(CHAOS_EXIT_ONCE_ENV) or None,
            "chaos_delay_s": float(os.environ.get(CHAOS_DELAY_ENV) or 0.0),
            "options": options.to_dict(),
            "sample_thumbnails": cfg.report,
        }
        window = max(1, WINDOW_KEYS // cfg.shard_size)
        for w in range(0, len(pending), window):
            shards = [store.get(i) for i in pending[w : w + window]]
            for shard in shards:
                if shard.digest != digests[shard.index]:
                    raise RuntimeError(
                        f"{store.uri(shard.index)}: descriptor does not match the run's listing"
                    )
            stats = _tag_window(
                cfg,
                shards,
                par,
                predictor_kwargs,
                writer,
                counts_dir,
                summary,
                report=report,
                progress=progress,
            )
            # Ray Data's per-operator timings (read tasks, Predictor actors, the driver's wait):
            # where a run's time went, kept beside its state for whoever tunes the job
            stats_uri = storage.join(
                run_dir(cfg.output, run_id), "stats", f"attempt-{state.attempts}-window-{w // window}.txt"
            )
            storage.write_text(stats_uri, stats)
            log.info("Ray Data stats of this window: %s", stats_uri)
    wall_tag = time.monotonic() - t_tag

    # [5] totals over every shard of the run (earlier attempts included)
    if pending and progress.done:
        progress.log()  # the last progress line: where the run ended
    summary.images, summary.ok, summary.errors_by_code = 0, 0, {}
    errors: Counter = Counter()
    totals = empty_totals(len(labels))
    for i, d in enumerate(digests):
        counts_uri = storage.join(counts_dir, f"shard-{i:06d}.json")
        try:
            data = json.loads(storage.read_text(counts_uri))
            rows, codes = int(data["rows"]), Counter(data["errors"])
            label_stats = data.get("labels")
        except FileNotFoundError:  # committed, then killed before its counts were written
            rows, codes, label_stats = 0, Counter(), None
        if label_stats is None:  # that, or counts written before they held label stats
            rows, codes, label_stats = _shard_counts_from_file(
                writer.uri_for(i, d), labels, thresholds.values
            )
        summary.images += rows
        errors.update(codes)
        totals = merge_totals(totals, label_stats)
    summary.errors_by_code = dict(sorted(errors.items()))
    summary.ok = summary.images - sum(errors.values())
    summary.wall_s = round(time.monotonic() - t0, 3)
    summary.images_per_s = round(summary.images_this_attempt / wall_tag, 2) if wall_tag > 0 else 0.0
    summary.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    if finished_before:
        summary.notice = _finished_run_notice(run_id, input_uri, store, len(digests), summary.images)
        log.warning("%s", summary.notice)
    # [6] the report (files + MLflow run) and the drift check against the model's validation rates
    drift, doc = report.finish(
        json.loads(summary.to_json()),
        totals,
        drift_alert=cfg.drift_alert,
        model_name=model.name,
        model_version=model.version,
        model_alias=model.alias,
        n_shards=len(digests),
        log_to_mlflow=cfg.mlflow,
    )
    summary.drift = [d.to_dict() for d in drift if d.status in ("moved", "too few")]
    summary.drift_available = report.expectation is not None
    if doc is not None:
        summary.report = doc["index"]
        summary.mlflow_run_id = doc["mlflow_run_id"]
    rdir = run_dir(cfg.output, run_id)
    storage.write_text(storage.join(rdir, "summary.json"), summary.to_json())
    if summary.error_rate_ok:
        storage.write_text(storage.join(rdir, "_SUCCESS"), summary.to_json())
    log.info(
        "tagging finished: %d images, %d errors, %.1f images/s",
        summary.images,
        summary.errors,
        summary.images_per_s,
    )
    if raise_on_error_rate:
        summary.raise_for_outcome()
    return summary


def _finished_run_notice(run_id: str, input_uri: str, store: ShardStore, n_shards: int, images: int) -> str:
    """A finished run started again tags nothing: say so, and how many keys under the input (listed
    now) it does not hold, with the flag that tags them."""
    hashes = [key_hashes(list(shard.uris), [None] * len(shard)) for shard in map(store.get, range(n_shards))]
    index = TaggedIndex(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64), by_uri=True)
    missing = 0
    for page in iter_input_keys(input_uri):
        uris = [k.uri for k in page]
        missing += int((~index.contains(uris, [None] * len(uris))).sum())
    head = f"run {run_id} is already complete ({images} images): nothing was tagged again"
    if not missing:
        return f"{head}; every key under {input_uri} is in it"
    return (
        f"{head}; {missing} keys under {input_uri} are not in it: tag them with --incremental "
        "(only images this model version has not tagged), or start a new run with --run-id NAME"
    )


def _tag_window(
    cfg: TagConfig,
    shards: list[Shard],
    par: Parallelism,
    predictor_kwargs: dict,
    writer: TagTableWriter,
    counts_dir: str,
    summary: TagSummary,
    *,
    report: RunReport,
    progress: ProgressLine,
) -> str:
    """[3]+[4] one Ray Dataset over a window of shards; commit each shard as soon as it is whole.
    Returns the dataset's execution stats (``Dataset.stats()``)."""
    import ray

    from mlc_ray import storage

    buffers = {s.index: _ShardBuffer(s) for s in shards}
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

    def commit(buf: _ShardBuffer) -> None:
        table = buf.table(keep_thumbs=True)
        uri = writer.commit(table, buf.shard.index, buf.shard.digest)
        codes = Counter(error_code(e) for e in table.column("error").to_pylist() if e)
        label_stats = report.on_commit(table, buf.shard.index)
        storage.write_text(
            storage.join(counts_dir, f"shard-{buf.shard.index:06d}.json"),
            json.dumps({"rows": table.num_rows, "errors": dict(codes), "file": uri, "labels": label_stats}),
        )
        summary.images_this_attempt += table.num_rows
        del buffers[buf.shard.index]
        log.info("committed shard %d (%d rows) -> %s", buf.shard.index, table.num_rows, uri)

    actor_deaths = _actor_deaths()
    try:
        for part in ds.iter_batches(batch_format="pyarrow", batch_size=None):
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
        _isolate(cfg, par, predictor_kwargs, list(buffers.values()), cause=exc)
        for buf in list(buffers.values()):
            commit(buf)
        return f"(no Ray Data stats: the window's dataset stopped at {type(exc).__name__}; isolated)\n"
    if buffers:
        missing = {i: int((~b.seen).sum()) for i, b in buffers.items()}
        raise RuntimeError(f"shards {missing} did not receive all their rows; rerun to resume the run")
    return ds.stats()


class _Isolator:
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


def _isolate(
    cfg: TagConfig, par: Parallelism, predictor_kwargs: dict, buffers: list[_ShardBuffer], *, cause: Exception
) -> None:
    """Fill ``buffers``' missing rows by tagging their images again on isolation actors, halving each
    group whose process dies or hangs until the image is alone (module docstring); fills every row."""
    import ray

    actor_cls = ray.remote(_Isolator).options(
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
    actor_deaths = _actor_deaths()

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

"""Bulk tagging with Ray Data: list → read bytes (tasks) → decode + infer (actor pool) → Parquet shards.

``run_tagging(cfg)`` is the whole job; ``jobs/tag.py`` only parses arguments. This module is the
orchestrator: each stage lives in the module named for it.

1. **Resolve** (``resolve.py``) the model once in the driver: alias → concrete version, files
   downloaded once and checked against their sha256 tags. The backend's file bytes are put in the
   object store once and every actor builds its session from them, so actors on other nodes never
   touch MLflow or the cache.
2. **List** (``listing.py``): the run's identity and state (``state.py``: the same settings resume
   the same run), then the input as a stream of pages cut into shards of ``shard_size`` keys, each
   shard's descriptor persisted under ``<output>/_runs/<run_id>/shards/`` (driver memory: one
   shard). ``--incremental`` drops keys whose (uri, etag) this model version already tagged.
3. **Tag** (``dataset.py``) every pending shard in **one** Ray Dataset, so each actor loads the
   model once for the whole run: chunk references (shard, start, stop) → ``read_chunks`` tasks
   (the chunk's keys from the shard's descriptor, then ``read.py``: threads, retries with jittered
   backoff, a missing or unreadable object becomes an ``unreadable`` error row) → ``Predictor``
   actors (``predictor.py``, ``ActorPoolStrategy`` sized by ``parallelism.py``): robust decode at draft
   scale, ``preprocess_eval`` per the version's ``preprocess.json``, inference, thresholds, and a
   ``pyarrow.Table`` in the tag-table schema. The driver buffers only the shards in flight.
4. **Commit** (``commit.py``): the driver gathers each shard's rows; when all of a shard's positions
   are in (no more, no less, in the shard's order) it writes the shard's Parquet file under a
   temporary name and commits it under its deterministic name. Committed shards are skipped on a
   rerun, so a killed driver or actor never loses or duplicates a row: Ray Data retries a task whose
   actor died (at most ``PREDICTOR_MAX_TASK_RETRIES`` times), and a shard is only committed whole.
   **Poison images** (``isolation.py``): a batch running longer than ``--batch-timeout-s`` makes its
   actor exit (the Predictor's watchdog thread), so a hang becomes an actor death too. When a
   batch's actor has died ``PREDICTOR_MAX_TASK_RETRIES + 1`` times, the dataset stops and
   the images of the shards it had in flight (and of the next ones, up to 50,000 keys) are *isolated*: tagged again in small groups, halved on a
   death or a timeout until the image is alone; alone, it gets ``ISOLATION_ATTEMPTS`` tries, then
   its row says ``crashed: ...`` or ``timeout: ...``. The job goes on; more than
   ``ISOLATION_MAX_IMAGES`` such images in one isolation pass means the model or the machine is broken,
   not an image: the run fails with a clear error.
5. **Summarise** (``summary.py``): counts and errors by code in ``summary.json`` (+ ``_SUCCESS`` when
   the error rate is within ``--max-error-rate``) under the run's state directory, and a table in
   the log.
6. **Report** (``report.py``): per-label counts and score histograms taken from each shard's rows at
   commit, contact-sheet thumbnails chosen in the actors (``_thumb`` column, dropped before the
   Parquet file), the drift check against the bundle's ``label_rates.json``, the files under
   ``_runs/<run_id>/report/`` and one MLflow run in experiment ``tagging``. ``--drift-alert`` turns a
   moved label into exit 3, after everything is written. Tag-time options (``options.py``) decide
   the listed labels in the Predictor; the log gets one progress line every ``--progress-every`` s.

The names other modules and tests import from here (``TagSummary``, ``choose_parallelism``,
``read_objects``, ``Predictor``, the constants) are re-exported from the stage modules.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from mlc_ray.progress import ProgressLine, quiet_ray_progress
from mlc_ray.tagging.commit import ShardBuffer, ShardCommitter, gather_totals
from mlc_ray.tagging.config import TagConfig
from mlc_ray.tagging.dataset import PREDICTOR_MAX_TASK_RETRIES, READ_BLOCK_KEYS, tag_shards
from mlc_ray.tagging.isolation import ISOLATION_ATTEMPTS, ISOLATION_MAX_IMAGES
from mlc_ray.tagging.listing import finished_run_notice, list_run, open_run
from mlc_ray.tagging.parallelism import Parallelism, choose_parallelism, fit_to_blocks
from mlc_ray.tagging.predictor import Predictor
from mlc_ray.tagging.read import read_objects, read_with_retry
from mlc_ray.tagging.report import MlflowConnection, RunReport, load_expectation
from mlc_ray.tagging.resolve import load_model_metadata, resolve
from mlc_ray.tagging.state import row_affecting_settings, run_dir
from mlc_ray.tagging.summary import EXIT_DRIFT, EXIT_ERROR_RATE, TagSummary
from mlc_ray.tagging.table import Provenance, TagTableWriter, shard_file_name

__all__ = [
    "run_tagging",
    "TagConfig",
    "TagSummary",
    "Parallelism",
    "choose_parallelism",
    "read_objects",
    "read_with_retry",
    "Predictor",
    "ShardBuffer",
    "EXIT_ERROR_RATE",
    "EXIT_DRIFT",
    "READ_BLOCK_KEYS",
    "PREDICTOR_MAX_TASK_RETRIES",
    "ISOLATION_ATTEMPTS",
    "ISOLATION_MAX_IMAGES",
]

log = logging.getLogger(__name__)


class Timings:
    """Wall seconds by phase, in order: ``lap(name)`` charges the time since the previous lap to
    ``name``; ``carve`` moves a measured part of a phase into its own entry, just before it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    def carve(self, whole: str, part: str, seconds: float) -> None:
        if whole not in self.seconds or seconds <= 0:
            return
        seconds = min(seconds, self.seconds[whole])
        out: dict[str, float] = {}
        for key, value in self.seconds.items():
            if key == whole:
                out[part] = out.get(part, 0.0) + seconds
                value -= seconds
            out[key] = value
        self.seconds = out

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def run_tagging(cfg: TagConfig, *, raise_on_error_rate: bool = True) -> TagSummary:
    """Tag every image of ``cfg.input`` into the tag table at ``cfg.output`` (resuming the same run)."""
    import ray

    from mlc_ray import storage
    from mlc_ray.cli import check_gpus_for, init_ray
    from mlc_ray.tagging.backends import model_files_for

    t0 = time.monotonic()
    timings = Timings()

    # [1] resolve the model once; load what the actors need (before anything is written)
    model = resolve(cfg)
    labels, thresholds, preprocess = load_model_metadata(model.local_dir)
    files = model_files_for(model.local_dir, cfg.backend, cfg.precision)
    input_uri = cfg.input
    if input_uri is None:
        from mlc_ray.data.demo import ensure_demo_data

        input_uri = ensure_demo_data()
        log.info("no --input: tagging the demo images (%s)", input_uri)

    options = cfg.tag_options
    options.check(labels)  # an unknown label in --labels: one error line, before anything is written
    timings.lap("model resolve")

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
    state = open_run(cfg, model, input_uri, settings)
    run_id = state.run_id
    store, digests = list_run(cfg, input_uri, state, model)
    log.info(
        "run %s: %d images in %d shards -> %s/dt=%s",
        run_id,
        state.n_images,
        len(digests),
        cfg.output,
        state.dt,
    )

    # the report's MLflow run: connect now, in the background (import + store open take seconds)
    mlflow_connection = MlflowConnection() if digests and cfg.report and cfg.mlflow else None

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

    # [3]+[4] tag every pending shard in one dataset; each shard is committed as soon as it is whole
    timings.lap("run state + listing")
    t_tag = time.monotonic()
    committer = None
    first_rows: list[float] = []
    pool_start_s = 0.0
    if pending:
        init_ray()  # a local embedded Ray starts without its dashboard (MLC_RAY_DASHBOARD=1 keeps it)
        quiet_ray_progress()
        resources = ray.cluster_resources()
        par = choose_parallelism(
            resources.get("CPU", 1),
            cluster_gpus=resources.get("GPU", 0),
            use_gpu=cfg.use_gpu,
            actors=cfg.actor_range,
            threads_per_actor=cfg.threads_per_actor,
        )
        if cfg.use_gpu:
            check_gpus_for("--use-gpu")  # none on a local Ray: an error; on a cluster: its autoscaler
        pending_keys = {
            i: (max(0, min(shard_keys, state.n_images - i * shard_keys)), digests[i]) for i in pending
        }
        blocks = sum(-(-n // READ_BLOCK_KEYS) for n, _ in pending_keys.values())
        fitted = fit_to_blocks(par, blocks)
        capped, par = fitted.max_actors < par.max_actors, fitted
        log.info(
            "inference: %d-%d %s actor(s) x %d thread(s)%s, batch %d%s",
            par.min_actors,
            par.max_actors,
            cfg.backend,
            par.threads_per_actor,
            f", {par.gpus_per_actor} GPU each" if cfg.use_gpu else "",
            cfg.batch_size,
            f" (the run's {blocks} read block(s) of {READ_BLOCK_KEYS} keys)" if capped else "",
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
            "options": options.to_dict(),
            "sample_thumbnails": cfg.report,
        }
        committer = ShardCommitter(writer, counts_dir, report, summary)
        timings.lap("Ray start")
        started = time.monotonic()
        all_stats = tag_shards(
            cfg,
            store,
            pending_keys,
            par,
            predictor_kwargs,
            committer,
            progress=progress,
            first_rows=first_rows,
        )
        if first_rows:  # the time to the run's first rows: actor pool start + model load
            pool_start_s = first_rows[0] - started
        # Ray Data's per-operator timings (read tasks, Predictor actors, the driver's wait):
        # where a run's time went, kept beside its state for whoever tunes the job
        for d, stats in enumerate(all_stats):
            stats_uri = storage.join(
                run_dir(cfg.output, run_id), "stats", f"attempt-{state.attempts}-dataset-{d}.txt"
            )
            storage.write_text(stats_uri, stats)
            log.info("Ray Data stats of this run's dataset: %s", stats_uri)
    wall_tag = time.monotonic() - t_tag
    if pending:
        timings.lap("tagging")
        timings.carve("tagging", "actor pool start + model load (to the first rows)", pool_start_s)
        timings.carve("tagging", "shard commits", committer.seconds if committer else 0.0)

    # [5] totals over every shard of the run (earlier attempts included)
    if pending and progress.done:
        progress.log()  # the last progress line: where the run ended
    summary.images, errors, totals = gather_totals(counts_dir, digests, writer, labels, thresholds.values)
    timings.lap("totals")
    summary.errors_by_code = dict(sorted(errors.items()))
    summary.ok = summary.images - sum(errors.values())
    summary.wall_s = round(time.monotonic() - t0, 3)
    summary.images_per_s = round(summary.images_this_attempt / wall_tag, 2) if wall_tag > 0 else 0.0
    summary.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    if finished_before:
        summary.notice = finished_run_notice(run_id, input_uri, store, len(digests), summary.images)
        log.warning("%s", summary.notice)

    # [6] the report (files + MLflow run) and the drift check against the model's validation rates.
    # A run that listed nothing (an incremental run with nothing new) has nothing to report: no
    # report files and no MLflow run (a scheduled hourly run would add an empty one every hour)
    if not digests and report.enabled:
        log.info("nothing new to tag: no report and no MLflow run for run %s", run_id)
        report.enabled = False
    drift, doc = report.finish(
        json.loads(summary.to_json()),
        totals,
        drift_alert=cfg.drift_alert,
        model_name=model.name,
        model_version=model.version,
        model_alias=model.alias,
        n_shards=len(digests),
        log_to_mlflow=cfg.mlflow,
        mlflow_connection=mlflow_connection,
    )
    timings.lap("report + MLflow")
    summary.drift = [d.to_dict() for d in drift if d.status in ("moved", "too few")]
    summary.drift_available = report.expectation is not None
    if doc is not None:
        summary.report = doc["index"]
        summary.mlflow_run_id = doc["mlflow_run_id"]
    rdir = run_dir(cfg.output, run_id)
    summary.timings_s = timings.rounded()
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

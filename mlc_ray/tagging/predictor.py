"""The inference stage: ``Predictor``, the Ray Data actor UDF (one backend session per actor).

Per batch: robust decode at draft scale, ``preprocess_eval`` per the version's ``preprocess.json``
(the one image path, ``data.images.prepare_image``), inference, thresholds and tag-time options, and
a ``pyarrow.Table`` in the tag-table schema plus the routing columns (``_shard``, ``_pos``) and the
``_thumb`` column of the report's contact sheets. **Watchdog**: with ``batch_timeout_s`` a thread
exits the actor's process when a batch outlives it, so a hang (a decoder stuck in C code cannot be
interrupted from Python) becomes an actor death: retried (bounded), then isolated (``isolation.py``).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.tagging.options import TagOptions
from mlc_ray.tagging.report import THUMB_COLUMN, ThumbnailSampler
from mlc_ray.tagging.table import TAG_TABLE_SCHEMA, Provenance, tag_rows

__all__ = [
    "Predictor",
    "ROUTING_COLUMNS",
    "PREDICTOR_OUTPUT_SCHEMA",
    "actor_death_errors",
    "CHAOS_EXIT_ONCE_ENV",
    "CHAOS_DELAY_ENV",
]

log = logging.getLogger(__name__)

ROUTING_COLUMNS = (pa.field("_shard", pa.int32()), pa.field("_pos", pa.int32()))
# _thumb: a small JPEG for the rows that enter the run's contact-sheet selections (report.py), else null
PREDICTOR_OUTPUT_SCHEMA = pa.schema([*TAG_TABLE_SCHEMA, *ROUTING_COLUMNS, THUMB_COLUMN])
# Test/chaos hook: when set to a path that does not exist yet, the first Predictor call creates it
# and kills its own process (a crashed actor), once per marker.
CHAOS_EXIT_ONCE_ENV = "MLC_RAY_CHAOS_PREDICTOR_EXIT_ONCE"
# Test/chaos hook: seconds each Predictor call sleeps (lets a test kill the driver mid-run).
CHAOS_DELAY_ENV = "MLC_RAY_CHAOS_PREDICTOR_DELAY_S"


def actor_death_errors() -> tuple[type[BaseException], ...]:
    """What ``ray.get`` / a dataset's iterator raise when the process running a batch died."""
    import ray

    return (
        ray.exceptions.ActorDiedError,
        ray.exceptions.ActorUnavailableError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.TaskCancelledError,
    )


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

"""The report of a tagging run: label rates, score histograms, errors, contact sheets, drift.

Everything is gathered *inside* the pipeline, so a run over 100 M images costs no second pass over
the table or the images:

* **Counts and histograms** come from each shard's rows in the driver, at the moment the shard is
  committed (``shard_label_stats``): per label, how many images score at or above its calibrated
  threshold, how many list it (after the tag-time options), and a ``HIST_BINS``-bucket score
  histogram. They are saved with the shard's counts file, so a resumed run sums them exactly.
* **Thumbnails** are chosen per label by four bounded selections of ``SAMPLES_PER_KIND`` images
  each: ``top`` (highest scores), ``above`` / ``below`` (the images nearest to the threshold on
  each side: where a wrong threshold shows) and ``random`` (a uniform sample of the label's
  positives, by hashing each URI to [0, 1) and keeping the smallest hashes: reservoir sampling
  that merges across actors and resumes). Each selection keeps the K smallest *keys*
  (``sample_keys``); a Predictor actor runs the same selection over the images *it* saw
  (``ThumbnailSampler``) and makes a small JPEG thumbnail only for an image that enters one of its
  own selections, which is a superset of the global one. The driver merges those rows at commit
  (``SampleSet``) and saves the merged set beside the run's state.
* **Drift**: training records each label's predicted-positive rate on the validation set and its
  score histogram (``label_rates.json`` in the bundle, ``expected_label_rates``). A run compares its
  rate per label with it (``drift_rows``): the ratio, a two-proportion z-test, and a minimum count
  below which a label is "too few to tell". A label *moved* when the test is significant
  (p < ``DRIFT_P_VALUE``); with ``--drift-alert X`` the job exits 3 when a moved label's ratio is
  outside [1/X, X], after every row and the report are written.

``write_report`` renders ``report.json``, ``histograms.png``, ``contact-<label>.png`` per label and
``index.html`` under ``<output>/_runs/<run_id>/report/``; ``log_report_to_mlflow`` logs them to one
MLflow run per tagging run (experiment ``tagging``), found again on a resume by its ``run_id`` tag.

This module is the driver-side ``RunReport`` and the report's public names; the parts live in
``report_stats.py`` (counts, histograms, ``label_rates.json``), ``report_samples.py`` (the
selections and thumbnails), ``report_drift.py`` (the drift test) and ``report_render.py`` (the
files and the MLflow run).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from mlc_ray.tagging.report_drift import (
    DRIFT_MIN_COUNT,
    DRIFT_P_VALUE,
    DriftRow,
    drift_rows,
    load_expectation,
)
from mlc_ray.tagging.report_render import (
    TAGGING_EXPERIMENT,
    MlflowConnection,
    log_report_to_mlflow,
    sheet_name,
    write_report,
)
from mlc_ray.tagging.report_samples import (
    SAMPLE_KINDS,
    SAMPLES_PER_KIND,
    THUMB_COLUMN,
    THUMB_SIDE,
    SampleSet,
    ThumbnailSampler,
    make_thumbnail,
    sample_keys,
    uri_hash01,
)
from mlc_ray.tagging.report_stats import (
    HIST_BINS,
    LABEL_RATES_FILE,
    LABEL_RATES_FORMAT,
    empty_totals,
    expected_label_rates,
    merge_totals,
    scores_matrix,
    shard_label_stats,
)

__all__ = [
    "HIST_BINS",
    "MlflowConnection",
    "SAMPLE_KINDS",
    "SAMPLES_PER_KIND",
    "THUMB_SIDE",
    "THUMB_COLUMN",
    "LABEL_RATES_FILE",
    "LABEL_RATES_FORMAT",
    "DRIFT_P_VALUE",
    "DRIFT_MIN_COUNT",
    "sample_keys",
    "uri_hash01",
    "make_thumbnail",
    "ThumbnailSampler",
    "shard_label_stats",
    "scores_matrix",
    "merge_totals",
    "empty_totals",
    "SampleSet",
    "expected_label_rates",
    "load_expectation",
    "DriftRow",
    "drift_rows",
    "write_report",
    "log_report_to_mlflow",
    "sheet_name",
    "TAGGING_EXPERIMENT",
    "RunReport",
    "report_dir_for",
    "samples_uri",
    "thumb_column",
]

log = logging.getLogger(__name__)


def report_dir_for(output: str, run_id: str) -> str:
    from mlc_ray import storage
    from mlc_ray.tagging.state import run_dir

    return storage.join(run_dir(output, run_id), "report")


def thumb_column(thumbs: list[bytes | None]) -> pa.Array:
    return pa.array(thumbs, pa.binary())


def samples_uri(output: str, run_id: str) -> str:
    from mlc_ray import storage
    from mlc_ray.tagging.state import run_dir

    return storage.join(run_dir(output, run_id), "samples.arrow")


class RunReport:
    """Driver side of one tagging run's report: per-shard stats at commit, the merged samples
    (saved beside the run's state, so a resumed run keeps them), and at the end the report files,
    the drift check and the MLflow run."""

    SAVE_EVERY_S = 10.0  # the merged samples are saved at most this often (and at the end)

    def __init__(
        self,
        *,
        output: str,
        run_id: str,
        labels: Sequence[str],
        thresholds: Sequence[float],
        allowed: Sequence[bool],
        expectation: dict | None,
        enabled: bool = True,
    ) -> None:
        from mlc_ray import storage

        self.output, self.run_id = output, run_id
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.allowed = np.asarray(allowed, dtype=bool)
        self.expectation = expectation
        self.enabled = enabled
        self.samples = SampleSet(self.labels, self.thresholds)
        self.samples_uri = samples_uri(output, run_id)
        self.dir = report_dir_for(output, run_id)
        self._saved_at = 0.0
        if enabled:
            try:
                self.samples.load_bytes(storage.read_bytes(self.samples_uri))
                log.info("report: resumed the samples of %d shard(s)", len(self.samples.shards))
            except FileNotFoundError:
                pass
            except (OSError, pa.ArrowInvalid) as exc:
                log.warning("report: %s is damaged (%s); contact sheets start afresh", self.samples_uri, exc)

    def on_commit(self, table: pa.Table, shard_index: int) -> dict:
        """Stats of a committed shard (saved in its counts file); offers its thumbnails."""
        import time

        stats = shard_label_stats(table, self.labels, self.thresholds)
        if self.enabled:
            self.samples.offer(table, shard_index)
            if time.monotonic() - self._saved_at >= self.SAVE_EVERY_S:
                self.save_samples()
        return stats

    def save_samples(self) -> None:
        import time

        from mlc_ray import storage

        storage.write_bytes(self.samples_uri, self.samples.to_bytes())
        self._saved_at = time.monotonic()

    def finish(
        self,
        summary: dict,
        totals: dict,
        *,
        drift_alert: float | None,
        model_name: str,
        model_version: str,
        model_alias: str | None,
        n_shards: int,
        log_to_mlflow: bool = True,
        mlflow_connection: MlflowConnection | None = None,
    ) -> tuple[list[DriftRow], dict | None]:
        """Drift rows always; with the report enabled also the files and the MLflow run (returns the
        report document, with ``index`` and ``mlflow_run_id``)."""
        drift = drift_rows(
            self.labels,
            totals["above"],
            int(totals["ok"]),
            self.expectation,
            allowed=self.allowed,
            alert=drift_alert,
        )
        if not self.enabled:
            return drift, None
        self.save_samples()
        if self.expectation is None:
            note = (
                f"drift: not available (the model bundle has no {LABEL_RATES_FILE}; bundles trained "
                "before it existed carry none)"
            )
        else:
            note = (
                f"drift: each label's rate at its calibrated threshold against its rate on the model's "
                f"validation set ({self.expectation['images']} images); moved = two-proportion test p < "
                f"{DRIFT_P_VALUE} with at least {DRIFT_MIN_COUNT} positives expected or seen"
                + (
                    f"; alert when the ratio leaves [1/{drift_alert:g}, {drift_alert:g}]"
                    if drift_alert
                    else ""
                )
            )
        if len(self.samples.shards) < n_shards:
            note += (
                f". Contact sheets cover {len(self.samples.shards)} of {n_shards} shards (the others were "
                "committed by an attempt that was killed before it saved its samples)"
            )
        doc = write_report(
            self.dir,
            summary={**summary, "_expectation": self.expectation},
            labels=self.labels,
            thresholds=self.thresholds,
            totals=totals,
            samples=self.samples,
            drift=drift,
            drift_note=note,
        )
        doc["index"] = f"{self.dir}/index.html"
        doc["mlflow_run_id"] = (
            log_report_to_mlflow(
                self.dir,
                doc,
                model_name=model_name,
                model_version=model_version,
                model_alias=model_alias,
                connection=mlflow_connection,
            )
            if log_to_mlflow
            else None
        )
        return drift, doc

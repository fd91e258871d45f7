"""The report's files and its MLflow run.

``write_report`` renders ``report.json``, ``histograms.png``, ``contact-<label>.png`` per label and
``index.html`` under ``<output>/_runs/<run_id>/report/``; ``log_report_to_mlflow`` logs them to one
MLflow run per tagging run (experiment ``tagging``), found again on a resume by its run_id tag.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlc_ray.tagging.report_drift import DriftRow
from mlc_ray.tagging.report_samples import SAMPLE_KINDS, SAMPLES_PER_KIND, THUMB_SIDE, SampleSet
from mlc_ray.tagging.report_stats import HIST_BINS

__all__ = ["TAGGING_EXPERIMENT", "MlflowConnection", "write_report", "log_report_to_mlflow", "sheet_name"]

log = logging.getLogger(__name__)

TAGGING_EXPERIMENT = "tagging"
KIND_TITLES = {
    "top": "highest scores",
    "above": "just above the threshold",
    "below": "just below the threshold",
    "random": "random images at or above the threshold",
}


def _contact_sheet(label: str, threshold: float, samples: SampleSet, j: int) -> bytes:
    """One PNG: a row of thumbnails per kind, each captioned with its score."""
    from PIL import Image, ImageDraw

    pad, caption, title_h, row_title = 4, 12, 18, 14
    cell = THUMB_SIDE + pad
    width = pad + SAMPLES_PER_KIND * cell
    rows = len(SAMPLE_KINDS)
    height = title_h + rows * (row_title + THUMB_SIDE + caption + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 3), f"{label}  (threshold {threshold:.3f})", fill=(0, 0, 0))
    y = title_h
    for kind in SAMPLE_KINDS:
        items = samples.get(j, kind)
        draw.text((pad, y), f"{KIND_TITLES[kind]} ({len(items)})", fill=(60, 60, 60))
        y += row_title
        for i, s in enumerate(items):
            x = pad + i * cell
            try:
                thumb = Image.open(io.BytesIO(s.thumb)).convert("RGB")
                sheet.paste(thumb.resize((THUMB_SIDE, THUMB_SIDE)), (x, y))
            except Exception:  # a damaged thumbnail leaves a grey cell, never a failed report
                draw.rectangle((x, y, x + THUMB_SIDE, y + THUMB_SIDE), fill=(200, 200, 200))
            draw.text((x, y + THUMB_SIDE), f"{s.score:.3f}", fill=(0, 0, 0))
        y += THUMB_SIDE + caption + pad
    buf = io.BytesIO()
    # a 256-colour palette (octree keeps the small saturated shapes; median cut lost some): ~1/3 the
    # size. zlib's default level, not optimize=True: 4.0 vs 17.7 ms a sheet for 38 vs 37 KB (measured
    # 2026-12-03 on a 548x394 sheet of photo thumbnails; a run writes one sheet per label)
    sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, "PNG")
    return buf.getvalue()


def _histograms_png(
    labels: Sequence[str], hist: np.ndarray, thresholds: Sequence[float], expectation: dict | None
) -> bytes:
    """One PNG, a panel per label: this run's score histogram (bars, fraction of images, log scale),
    the validation histogram (red steps) when the bundle has one, and the threshold (dashed line).

    Drawn with PIL: a tagging run pays for it once per run, and matplotlib's import and layout were
    most of the report's ~4 s (measured 2026-12-02: report + MLflow 4.0 s → 0.6 s)."""
    from PIL import Image, ImageDraw

    n = len(labels)
    cols = min(4, max(1, n))
    rows = max(1, math.ceil(n / cols))
    pw, ph, pad, title_h, head = 240, 150, 28, 14, 20  # panel size, plot inset, title, figure title
    img = Image.new("RGB", (cols * pw, head + rows * ph), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((6, 4), "score histograms (fraction of images, log scale; dashed: threshold; red: validation)",
              fill=(0, 0, 0))  # fmt: skip
    ref_ok = expectation is not None and expectation.get("hist_bins") == HIST_BINS
    floor = 1e-4  # the log scale's bottom: a fraction below it is drawn at the axis
    for j in range(n):
        x0, y0 = (j % cols) * pw, head + (j // cols) * ph
        left, right, top, bottom = x0 + pad, x0 + pw - 8, y0 + title_h + 4, y0 + ph - 16
        draw.text((left, y0 + 2), str(labels[j])[:32], fill=(0, 0, 0))
        draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
        draw.text((x0 + 2, top), "1", fill=(80, 80, 80))
        draw.text((x0 + 2, bottom - 10), "1e-4", fill=(80, 80, 80))
        for tick in (0.0, 0.5, 1.0):
            tx = left + tick * (right - left)
            draw.text((tx - 6, bottom + 2), f"{tick:g}", fill=(80, 80, 80))

        def y_of(frac: float, top: int = top, bottom: int = bottom) -> float:
            if frac <= floor:
                return float(bottom)
            return bottom - (math.log10(frac) - math.log10(floor)) / -math.log10(floor) * (bottom - top)

        total = max(1, int(hist[j].sum()))
        bw = (right - left) / HIST_BINS
        for b, count in enumerate(hist[j]):
            if count > 0:
                bx = left + b * bw
                draw.rectangle((bx, y_of(count / total), bx + bw - 1, bottom), fill=(72, 120, 208))
        if ref_ok:
            ref = np.asarray(expectation["hist"][j], dtype=np.float64)
            ref = ref / max(1.0, ref.sum())
            points = []
            for b, frac in enumerate(ref):
                yy = y_of(float(frac))
                points += [(left + b * bw, yy), (left + (b + 1) * bw, yy)]
            draw.line(points, fill=(214, 95, 95), width=1)
        tx = left + float(np.clip(thresholds[j], 0.0, 1.0)) * (right - left)
        for yy in range(int(top), int(bottom), 6):  # dashed
            draw.line((tx, yy, tx, min(bottom, yy + 3)), fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")  # zlib's default level (optimize=True: ~4x the time for a few % smaller)
    return buf.getvalue()


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-" if x is None else "inf"
    return format(x, spec)


def _index_html(doc: dict, sheets: dict[str, str]) -> str:
    e = html.escape
    s = doc["summary"]
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>tagging run {e(s['run_id'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}.alert{background:#fdd}.moved{background:#ffe9c0}</style>",
        f"<h1>Tagging run {e(s['run_id'])}</h1>",
        "<table>",
    ]
    for key in (
        "model",
        "model_version",
        "backend",
        "precision",
        "output",
        "images",
        "ok",
        "errors",
        "images_per_s",
        "finished_at",
        "tag_options",
    ):
        parts.append(f"<tr><td>{e(key)}</td><td>{e(str(s.get(key, '')))}</td></tr>")
    parts.append("</table><h2>Errors by code</h2>")
    if doc["errors_by_code"]:
        parts.append("<table><tr><th>code</th><th>images</th></tr>")
        parts += [f"<tr><td>{e(c)}</td><td>{n}</td></tr>" for c, n in doc["errors_by_code"].items()]
        parts.append("</table>")
    else:
        parts.append("<p>none</p>")
    parts.append(f"<h2>Labels</h2><p>{e(doc['drift_note'])}</p>")
    parts.append(
        "<table><tr><th>label</th><th>threshold</th><th>listed</th><th>listed rate</th><th>above threshold</th>"
        "<th>rate</th><th>validation rate</th><th>ratio</th><th>p-value</th><th>drift</th></tr>"
    )
    for row in doc["labels"]:
        d = row["drift"] or {}
        cls = "alert" if d.get("alert") else ("moved" if d.get("status") == "moved" else "")
        parts.append(
            f"<tr class='{cls}'><td><a href='#{e(row['label'])}'>{e(row['label'])}</a></td>"
            f"<td>{row['threshold']:.3f}</td><td>{row['listed']}</td><td>{row['listed_rate']:.4f}</td>"
            f"<td>{row['above']}</td><td>{row['rate']:.4f}</td><td>{_fmt(d.get('expected_rate'), '.4f')}</td>"
            f"<td>{_fmt(d.get('ratio'), '.2f')}</td><td>{_fmt(d.get('p_value'), '.2g')}</td>"
            f"<td>{e(d.get('status', 'not listed'))}{' ALERT' if d.get('alert') else ''}</td></tr>"
        )
    parts.append("</table><h2>Score histograms</h2><img src='histograms.png'>")
    parts.append("<h2>Contact sheets</h2>")
    for label, name in sheets.items():
        parts.append(f"<h3 id='{e(label)}'>{e(label)}</h3><img src='{e(name)}'>")
    return "\n".join(parts) + "\n"


def sheet_name(label: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return f"contact-{safe}.png"


def write_report(
    report_dir: str,
    *,
    summary: dict,
    labels: Sequence[str],
    thresholds: Sequence[float],
    totals: dict,
    samples: SampleSet,
    drift: list[DriftRow],
    drift_note: str,
) -> dict:
    """Write report.json, histograms.png, one contact sheet per label and index.html; returns the doc."""
    from mlc_ray import storage

    images_ok = int(totals["ok"])
    hist = np.asarray(totals["hist"], dtype=np.int64).reshape(len(labels), HIST_BINS)
    by_label = {d.label: d for d in drift}
    sheets: dict[str, str] = {}
    rows = []
    for j, label in enumerate(labels):
        name = sheet_name(label)
        storage.write_bytes(
            storage.join(report_dir, name), _contact_sheet(label, float(thresholds[j]), samples, j)
        )
        sheets[label] = name
        d = by_label.get(label)
        rows.append(
            {
                "label": label,
                "threshold": float(thresholds[j]),
                "listed": int(totals["listed"][j]),
                "listed_rate": int(totals["listed"][j]) / images_ok if images_ok else 0.0,
                "above": int(totals["above"][j]),
                "rate": int(totals["above"][j]) / images_ok if images_ok else 0.0,
                "hist": hist[j].tolist(),
                "drift": d.to_dict() if d else None,
                "contact_sheet": name,
                "samples": {k: [s.uri for s in samples.get(j, k)] for k in SAMPLE_KINDS},
            }
        )
    doc = {
        "summary": summary,
        "errors_by_code": dict(summary.get("errors_by_code", {})),
        "hist_bins": HIST_BINS,
        "labels": rows,
        "drift_note": drift_note,
        "drift_alerts": [d.label for d in drift if d.alert],
        "sampled_shards": len(samples.shards),
    }
    storage.write_bytes(
        storage.join(report_dir, "histograms.png"),
        _histograms_png(labels, hist, thresholds, summary.get("_expectation")),
    )
    doc["summary"] = {k: v for k, v in summary.items() if not k.startswith("_")}
    storage.write_text(
        storage.join(report_dir, "report.json"), json.dumps(doc, indent=2, sort_keys=True) + "\n"
    )
    storage.write_text(storage.join(report_dir, "index.html"), _index_html(doc, sheets))
    return doc


# ------------------------------------------------------------------------------------- MLflow


class MlflowConnection:
    """The tracking client and the ``tagging`` experiment's id, set up in a background thread.

    Importing mlflow and opening its store (a sqlite database is created and migrated on first use)
    takes seconds; a run starts this as soon as it knows it will report (after listing) and the
    connection is ready by the time the last shard is committed. ``get()`` waits for it and raises
    what the connection raised (``log_report_to_mlflow`` turns that into a warning). Nothing else
    may import mlflow while it runs: two threads importing mlflow's protobuf modules at once can
    fail ("Depends on file 'databricks.proto', but it has not been loaded"), so the run's driver
    touches mlflow only after ``get()``."""

    def __init__(self) -> None:
        import threading

        self._client: Any = None
        self._experiment_id: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._connect, name="mlflow-connect", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            import mlflow

            from mlc_ray.train.tracking import resolve_tracking_uri

            client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri())
            exp = client.get_experiment_by_name(TAGGING_EXPERIMENT)
            self._experiment_id = exp.experiment_id if exp else client.create_experiment(TAGGING_EXPERIMENT)
            self._client = client
        except BaseException as exc:  # handed to the caller of get()
            self._error = exc

    def get(self) -> tuple[Any, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._client, str(self._experiment_id)


def log_report_to_mlflow(
    report_dir: str,
    doc: dict,
    *,
    model_name: str,
    model_version: str,
    model_alias: str | None,
    connection: MlflowConnection | None = None,
) -> str | None:
    """Log the report to experiment ``tagging``: one MLflow run per tagging run (found again by its
    ``mlc_ray.run_id`` tag on a resume). Returns the MLflow run id, or None when MLflow failed: the
    rows and the report on disk are the run's record, so a tracking server that is down costs a
    warning, not the job. ``connection``: one started earlier in the run (else one is made here)."""
    from mlc_ray import storage

    s = doc["summary"]
    run_id = s["run_id"]
    try:
        client, exp_id = (connection or MlflowConnection()).get()
        import mlflow  # imported by the connection's thread: never by two threads at once

        found = client.search_runs(
            [exp_id], filter_string=f"tags.`mlc_ray.run_id` = '{run_id}'", max_results=1
        )
        tags = {
            "mlc_ray.run_id": run_id,
            "model_name": model_name,
            "model_version": str(model_version),
            "model_alias": model_alias or "",
            "mlc_ray.output": str(s.get("output", "")),
            "mlc_ray.tag_options": str(s.get("tag_options", "{}")),
            "drift_alerts": ",".join(doc["drift_alerts"]),
        }
        mlrun = found[0] if found else client.create_run(exp_id, run_name=run_id, tags=tags)
        mid = mlrun.info.run_id
        for key, value in tags.items():  # a resumed run: the alerts and options of this attempt
            client.set_tag(mid, key, value)
        metrics = {
            "images": float(s.get("images", 0)),
            "ok": float(s.get("ok", 0)),
            "errors": float(s.get("errors", 0)),
            "error_rate": float(s.get("error_rate", 0.0)),
            "images_per_s": float(s.get("images_per_s", 0.0)),
        }
        for row in doc["labels"]:
            safe = "".join(c if c.isalnum() or c in "-_./ " else "_" for c in row["label"])
            metrics[f"rate.{safe}"] = float(row["rate"])
            metrics[f"listed_rate.{safe}"] = float(row["listed_rate"])
            ratio = (row["drift"] or {}).get("ratio")
            if ratio is not None and math.isfinite(ratio):
                metrics[f"drift_ratio.{safe}"] = float(ratio)
        for code, n in doc["errors_by_code"].items():
            metrics[f"errors.{code}"] = float(n)
        client.log_batch(
            mid, metrics=[mlflow.entities.Metric(k, v, _now_ms(), 0) for k, v in metrics.items()]
        )
        with tempfile.TemporaryDirectory(prefix="mlc_ray-report-") as tmp:
            for page in storage.iter_pages(report_dir):
                for info in page:
                    name = info.uri.rsplit("/", 1)[-1]
                    with open(os.path.join(tmp, name), "wb") as fh:
                        fh.write(storage.read_bytes(info.uri))
            client.log_artifacts(mid, tmp, artifact_path="report")
        client.set_terminated(mid, "FINISHED")
        return mid
    except Exception as exc:  # the tracking server is an outside service: never fail a finished run for it
        log.warning(
            "the report was not logged to MLflow (%s: %s); it is in %s", type(exc).__name__, exc, report_dir
        )
        return None


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)

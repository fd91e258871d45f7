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
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

__all__ = [
    "HIST_BINS",
    "SAMPLE_KINDS",
    "SAMPLES_PER_KIND",
    "LABEL_RATES_FILE",
    "sample_keys",
    "uri_hash01",
    "ThumbnailSampler",
    "shard_label_stats",
    "scores_matrix",
    "SampleSet",
    "expected_label_rates",
    "load_expectation",
    "DriftRow",
    "drift_rows",
    "write_report",
    "log_report_to_mlflow",
    "TAGGING_EXPERIMENT",
]

log = logging.getLogger(__name__)

HIST_BINS = 20  # score buckets of width 0.05 over [0, 1]
SAMPLE_KINDS = ("top", "above", "below", "random")
KIND_TITLES = {
    "top": "highest scores",
    "above": "just above the threshold",
    "below": "just below the threshold",
    "random": "random images at or above the threshold",
}
SAMPLES_PER_KIND = 8  # thumbnails per kind per label: a contact sheet is 4 rows x 8
THUMB_SIDE = 64  # pixels; JPEG quality 80 makes one ~2 KB
LABEL_RATES_FILE = "label_rates.json"
LABEL_RATES_FORMAT = 1
DRIFT_P_VALUE = 0.01  # a label moved when the two-proportion test says p below this
DRIFT_MIN_COUNT = 10  # ... and at least this many positives were expected or seen in the run
TAGGING_EXPERIMENT = "tagging"
THUMB_COLUMN = pa.field("_thumb", pa.binary())


# ------------------------------------------------------------------------------------- selections


def uri_hash01(uris: Sequence[str]) -> np.ndarray:
    """Each URI's 64-bit blake2b hash scaled to [0, 1): a fixed random key per image."""
    out = np.empty(len(uris), dtype=np.float64)
    for i, uri in enumerate(uris):
        out[i] = int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "little") / 2.0**64
    return out


def sample_keys(scores: np.ndarray, thresholds: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """(N, L, 4) keys, one per ``SAMPLE_KINDS``; each selection keeps the smallest, ``inf`` = not a
    candidate. ``top``: -score; ``above``: score - threshold (positives); ``below``: threshold -
    score (negatives); ``random``: the URI's hash (positives)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)[None, :]
    pos = s >= t
    keys = np.empty((*s.shape, len(SAMPLE_KINDS)), dtype=np.float64)
    keys[..., 0] = -s
    keys[..., 1] = np.where(pos, s - t, np.inf)
    keys[..., 2] = np.where(pos, np.inf, t - s)
    keys[..., 3] = np.where(pos, np.asarray(hashes, dtype=np.float64)[:, None], np.inf)
    return keys


def _kth_smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """(..., M) -> (...,): the k-th smallest along the last axis (inf when there are fewer than k)."""
    if keys.shape[-1] < k:
        return np.full(keys.shape[:-1], np.inf)
    return np.partition(keys, k - 1, axis=-1)[..., k - 1]


def make_thumbnail(pixels: np.ndarray, side: int = THUMB_SIDE) -> bytes:
    """(H, W, 3) uint8 -> a small JPEG."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if img.size != (side, side):
        img = img.resize((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


class ThumbnailSampler:
    """Actor-side selection: which rows of a batch get a thumbnail (``_thumb`` column).

    Keeps, per label and kind, the ``k`` smallest keys this actor has seen; a row gets a thumbnail
    when one of its keys beats the current k-th. Cost per batch: one (N, L, 4) key array and a
    partition; a thumbnail only for the few rows that enter (all of them in the first batch).
    """

    def __init__(self, thresholds: Sequence[float], k: int = SAMPLES_PER_KIND) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.k = int(k)
        self.best = np.full((len(self.thresholds), len(SAMPLE_KINDS), 0), np.inf)

    def select(self, scores: np.ndarray, uris: Sequence[str]) -> np.ndarray:
        """(N,) bool: the rows (of the scored images) that enter this actor's selections."""
        if len(uris) == 0:
            return np.zeros(0, dtype=bool)
        keys = sample_keys(scores, self.thresholds, uri_hash01(uris))  # (N, L, 4)
        kth = _kth_smallest(self.best, self.k)  # (L, 4)
        enter = (keys < kth[None]) & np.isfinite(keys)
        merged = np.concatenate([self.best, np.moveaxis(keys, 0, -1)], axis=-1)
        if merged.shape[-1] > self.k:
            merged = np.partition(merged, self.k - 1, axis=-1)[..., : self.k]
        self.best = merged
        return enter.any(axis=(1, 2))

    def thumbnails(self, pixels: np.ndarray, scores: np.ndarray, uris: Sequence[str]) -> list[bytes | None]:
        """A thumbnail for each scored image that enters a selection, else None."""
        chosen = self.select(scores, uris)
        return [make_thumbnail(pixels[i]) if c else None for i, c in enumerate(chosen)]


# ------------------------------------------------------------------------------------- driver side


def scores_matrix(table: pa.Table, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices of the scored rows, their (n, L) scores in model order) from a tag-table batch."""
    col = table.column("scores").combine_chunks()
    lengths = np.asarray(col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(lengths == n_labels)
    flat = col.flatten().field("score").to_numpy(zero_copy_only=False)
    if lengths.sum() != len(rows) * n_labels:  # rows of other lengths: not from this model
        raise ValueError("tag rows with a number of scores other than the model's labels")
    return rows, np.asarray(flat, dtype=np.float64).reshape(len(rows), n_labels)


def shard_label_stats(table: pa.Table, labels: Sequence[str], thresholds: Sequence[float]) -> dict:
    """Per-label counts of one committed shard: ``ok`` images, ``above`` (score >= the calibrated
    threshold, what drift compares), ``listed`` (in the ``labels`` column) and ``hist`` (L x bins)."""
    import pyarrow.compute as pc

    n = len(labels)
    _, scores = scores_matrix(table, n)
    above = (scores >= np.asarray(thresholds, dtype=np.float64)[None, :]).sum(axis=0)
    bins = np.clip((scores * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    hist = np.zeros((n, HIST_BINS), dtype=np.int64)
    for j in range(n):
        hist[j] = np.bincount(bins[:, j], minlength=HIST_BINS)
    listed_names = pc.list_flatten(table.column("labels")).to_pylist()
    index = {name: j for j, name in enumerate(labels)}
    listed = np.bincount([index[x] for x in listed_names], minlength=n) if listed_names else np.zeros(n)
    return {
        "ok": int(scores.shape[0]),
        "above": [int(x) for x in above],
        "listed": [int(x) for x in listed],
        "hist": hist.tolist(),
    }


@dataclass
class _Sample:
    key: float
    uri: str
    score: float
    thumb: bytes


class SampleSet:
    """The driver's merged selections: for each (label, kind) the ``k`` rows with the smallest keys."""

    def __init__(self, labels: Sequence[str], thresholds: Sequence[float], k: int = SAMPLES_PER_KIND) -> None:
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.k = int(k)
        self.items: dict[tuple[int, int], list[_Sample]] = {}
        self.shards: set[int] = set()  # shards whose rows were offered

    def offer(self, table: pa.Table, shard_index: int | None = None) -> None:
        """Merge the rows of ``table`` that carry a ``_thumb`` (scored rows only)."""
        if shard_index is not None:
            self.shards.add(int(shard_index))
        if "_thumb" not in table.column_names:
            return
        thumbs = table.column("_thumb").to_pylist()
        rows, scores = scores_matrix(table, len(self.labels))
        has = np.array([thumbs[r] is not None for r in rows], dtype=bool)
        if not has.any():
            return
        rows, scores = rows[has], scores[has]
        all_uris = table.column("image_uri").to_pylist()
        uris = [all_uris[r] for r in rows]
        keys = sample_keys(scores, self.thresholds, uri_hash01(uris))
        for j in range(len(self.labels)):
            for kind in range(len(SAMPLE_KINDS)):
                col = keys[:, j, kind]
                cand = [
                    _Sample(float(col[i]), uris[i], float(scores[i, j]), thumbs[rows[i]])
                    for i in np.flatnonzero(np.isfinite(col))
                ]
                if not cand:
                    continue
                # a resumed run may offer an image twice: keep it once
                merged = {s.uri: s for s in self.items.get((j, kind), [])}
                for c in cand:
                    if c.uri not in merged or c.key < merged[c.uri].key:
                        merged[c.uri] = c
                self.items[(j, kind)] = sorted(merged.values(), key=lambda s: (s.key, s.uri))[: self.k]

    def get(self, label_index: int, kind: str) -> list[_Sample]:
        return list(self.items.get((label_index, SAMPLE_KINDS.index(kind)), []))

    # Arrow IPC bytes: the merged set is saved after every commit, so a resumed run keeps its samples
    def to_bytes(self) -> bytes:
        rows = [(j, kind, s) for (j, kind), items in self.items.items() for s in items]
        table = pa.table(
            {
                "label": pa.array([j for j, _, _ in rows], pa.int32()),
                "kind": pa.array([kind for _, kind, _ in rows], pa.int8()),
                "key": pa.array([s.key for _, _, s in rows], pa.float64()),
                "uri": pa.array([s.uri for _, _, s in rows], pa.string()),
                "score": pa.array([s.score for _, _, s in rows], pa.float64()),
                "thumb": pa.array([s.thumb for _, _, s in rows], pa.binary()),
            }
        ).replace_schema_metadata(
            {"shards": json.dumps(sorted(self.shards)), "labels": json.dumps(self.labels)}
        )
        sink = io.BytesIO()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()

    def load_bytes(self, data: bytes) -> None:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        meta = table.schema.metadata or {}
        if json.loads(meta.get(b"labels", b"[]")) != self.labels:
            return  # another model's samples: start afresh
        self.shards = set(json.loads(meta.get(b"shards", b"[]")))
        for row in table.to_pylist():
            key = (int(row["label"]), int(row["kind"]))
            self.items.setdefault(key, []).append(_Sample(row["key"], row["uri"], row["score"], row["thumb"]))


# ------------------------------------------------------------------------------------- expectation + drift


def expected_label_rates(scores: np.ndarray, thresholds: Sequence[float], labels: Sequence[str]) -> dict:
    """What training records in ``label_rates.json``: each label's predicted-positive rate on the
    validation set at the calibrated thresholds, and its score histogram (the tagging buckets)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    positives = (s >= t[None, :]).sum(axis=0)
    bins = np.clip((s * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    hist = [np.bincount(bins[:, j], minlength=HIST_BINS).tolist() for j in range(s.shape[1])]
    n = int(s.shape[0])
    return {
        "format_version": LABEL_RATES_FORMAT,
        "source": "validation set, scores at the calibrated thresholds",
        "labels": list(labels),
        "images": n,
        "positives": [int(x) for x in positives],
        "rates": [float(x) / n if n else 0.0 for x in positives],
        "thresholds": [float(x) for x in t],
        "hist_bins": HIST_BINS,
        "hist": hist,
    }


def load_expectation(local_dir: str, labels: Sequence[str]) -> dict | None:
    """The bundle's ``label_rates.json``, or None (older bundles, or one for other labels)."""
    from mlc_ray.bundle import ModelBundle

    bundle = ModelBundle(local_dir)
    data = bundle.label_rates()
    if data is None:
        return None
    if list(data.get("labels", [])) != list(labels) or int(data.get("images", 0)) < 1:
        log.warning("%s: labels differ from the model's or no images: drift not available", LABEL_RATES_FILE)
        return None
    return data


@dataclass
class DriftRow:
    label: str
    expected_rate: float | None  # None: the bundle records no expectation
    expected_positives: int
    expected_images: int
    rate: float
    positives: int
    images: int
    ratio: float | None
    z: float | None
    p_value: float | None
    status: str  # "ok" | "moved" | "too few" | "not available"
    alert: bool = False

    def to_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()
        }


def _two_proportion(x0: int, n0: int, x1: int, n1: int) -> tuple[float, float]:
    """Pooled two-proportion z-test: (z, two-sided p-value)."""
    p = (x0 + x1) / (n0 + n1)
    se = math.sqrt(p * (1 - p) * (1 / n0 + 1 / n1)) if 0 < p < 1 else 0.0
    if se == 0.0:
        return 0.0, 1.0
    z = (x1 / n1 - x0 / n0) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def drift_rows(
    labels: Sequence[str],
    positives: Sequence[int],
    images: int,
    expectation: dict | None,
    *,
    allowed: Sequence[bool] | None = None,
    alert: float | None = None,
    min_count: int = DRIFT_MIN_COUNT,
    p_value: float = DRIFT_P_VALUE,
) -> list[DriftRow]:
    """One row per listed label: this run's rate against the model's validation rate."""
    out = []
    for j, label in enumerate(labels):
        if allowed is not None and not allowed[j]:
            continue
        x1 = int(positives[j])
        rate = x1 / images if images else 0.0
        if expectation is None or images == 0:
            out.append(DriftRow(label, None, 0, 0, rate, x1, images, None, None, None, "not available"))
            continue
        n0, x0 = int(expectation["images"]), int(expectation["positives"][j])
        r0 = x0 / n0
        ratio = rate / r0 if r0 > 0 else (math.inf if x1 else 1.0)
        z, p = _two_proportion(x0, n0, x1, images)
        enough = max(images * r0, x1) >= min_count
        status = ("moved" if p < p_value else "ok") if enough else "too few"
        flag = bool(alert is not None and status == "moved" and not (1.0 / alert <= ratio <= alert))
        out.append(DriftRow(label, r0, x0, n0, rate, x1, images, ratio, z, p, status, flag))
    return out


# ------------------------------------------------------------------------------------- rendering


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
    # a 256-colour palette (octree keeps the small saturated shapes; median cut lost some): ~1/3 the size
    sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _histograms_png(
    labels: Sequence[str], hist: np.ndarray, thresholds: Sequence[float], expectation: dict | None
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    edges = np.linspace(0, 1, HIST_BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    for j, ax in enumerate(axes.flat):
        if j >= n:
            ax.axis("off")
            continue
        total = max(1, int(hist[j].sum()))
        ax.bar(centers, hist[j] / total, width=1 / HIST_BINS, color="#4878d0", label="this run")
        if expectation is not None and expectation.get("hist_bins") == HIST_BINS:
            ref = np.asarray(expectation["hist"][j], dtype=np.float64)
            ax.step(edges[:-1], ref / max(1.0, ref.sum()), where="post", color="#d65f5f", label="validation")
        ax.axvline(float(thresholds[j]), color="black", linestyle="--", linewidth=1)
        if hist[j].any():  # a run without scored images has nothing to put on a log scale
            ax.set_yscale("log")
        ax.set_title(labels[j], fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("score histograms (fraction of images, log scale; dashed: threshold)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
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


def log_report_to_mlflow(
    report_dir: str, doc: dict, *, model_name: str, model_version: str, model_alias: str | None
) -> str | None:
    """Log the report to experiment ``tagging``: one MLflow run per tagging run (found again by its
    ``mlc_ray.run_id`` tag on a resume). Returns the MLflow run id, or None when MLflow failed: the
    rows and the report on disk are the run's record, so a tracking server that is down costs a
    warning, not the job."""
    import mlflow

    from mlc_ray import storage
    from mlc_ray.train.tracking import resolve_tracking_uri

    s = doc["summary"]
    run_id = s["run_id"]
    try:
        mlflow.set_tracking_uri(resolve_tracking_uri())
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(TAGGING_EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(TAGGING_EXPERIMENT)
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


def merge_totals(total: dict | None, part: dict) -> dict:
    """Sum two ``shard_label_stats`` dicts."""
    if total is None:
        return {
            k: (list(v) if k != "hist" else [list(r) for r in v]) if k != "ok" else v for k, v in part.items()
        }
    out = {"ok": total["ok"] + part["ok"]}
    out["above"] = [a + b for a, b in zip(total["above"], part["above"], strict=True)]
    out["listed"] = [a + b for a, b in zip(total["listed"], part["listed"], strict=True)]
    out["hist"] = (np.asarray(total["hist"]) + np.asarray(part["hist"])).tolist()
    return out


def empty_totals(n_labels: int) -> dict:
    return {"ok": 0, "above": [0] * n_labels, "listed": [0] * n_labels, "hist": [[0] * HIST_BINS] * n_labels}


# ------------------------------------------------------------------------------------- the run's report


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
                self.dir, doc, model_name=model_name, model_version=model_version, model_alias=model_alias
            )
            if log_to_mlflow
            else None
        )
        return drift, doc

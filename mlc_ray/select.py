"""The labelling queue: pick the images of a tag table that would teach the model most.

``select_queue(cfg)`` is ``jobs/select_queue.py``. It reads the Parquet tag table with
``pyarrow.dataset`` scans (a few columns, batch by batch; the table is never loaded whole) and
writes a manifest in the project's format (``image``, ``labels`` pre-filled from the prediction,
plus ``reason``, ``score``, ``label`` and provenance columns) that a labelling tool imports and
``jobs/train.py --data`` reads once corrected (``labels.txt`` beside it keeps the vocabulary).

Which rows count: rows without ``error``, optionally of one run (``run``) or model version
(``version``); of those, the **latest row per image** (largest ``tagged_at``), where an image is
its ``source_etag`` (the same bytes under two URIs are one image; a row without an ETag is keyed
by its URI). The reasons an image is picked:

* ``uncertainty``: images whose predicted label set is most likely wrong. Each label's decision is
  measured by its score's distance to the label's calibrated threshold in logits,
  ``d = |logit(s) - logit(t)|`` (so 0.02 from a 0.05 threshold counts as far as 0.2 from 0.5), and
  read as the chance that this decision is wrong, ``p = 1 / (1 + exp(d / T))`` (0.5 on the
  threshold; ``T`` = ``uncertainty_temperature``). With ``uncertainty_rule="label_set"`` (the
  default) an image ranks by the chance that *any* of its decisions is wrong,
  ``1 - prod_l (1 - p_l)``, so two borderline labels rank above one; its ``score`` is that chance
  and its ``label`` the most doubtful of its labels that still has quota (any label whose own ``p``
  is at least half the image's largest). With ``uncertainty_rule="label"`` (the rule before) each
  label ranks its own scores by ``d``, round-robin over labels, and ``score`` is the label's score.
  Thresholds are the ones each row was tagged with: found by the row's ``thresholds_sha256`` in
  the run's report (``_runs/<run_id>/report/report.json``), else in the registered version the
  row names, or given as ``thresholds`` (a thresholds.json, a bundle dir or ``models:/`` URI).
* ``disagreement`` (when a second source is given: another table, run or model version): images
  both sources tagged, ordered by how many labels they list differently, then by the largest
  score difference.
* ``rare_combination``: images whose predicted label combination is rare (at most
  ``rare_fraction`` of the images), rarest first, round-robin over combinations; within a
  combination the images whose label set is most likely wrong first (``label_set`` rule) or a
  seeded sample (``label`` rule).
* ``random``: a seeded uniform sample (share 0 by default; the control a queue is judged against).

The budget is split by ``mix`` (a reason without candidates gives its share to the others); each
reason takes its candidates in order (``uncertainty`` under the ``label_set`` rule: best first over
every label; otherwise round-robin over labels or combinations), and **no label takes more than
``label_quota`` rows** (default: twice its equal share), so a common label cannot fill the queue.
One row per image.

Memory: the scans hold one batch (``batch_size`` rows) at a time; across the table they keep 16
bytes per distinct image (64-bit key hash + ``tagged_at``: which row is the latest), a second
source's 8 + 3 x L bytes per image (key, float16 scores, listed flags), the count of each label
combination, and candidate pools of at most ``budget`` rows per label and reason. Measured peak
(BENCHMARKS.md "Labelling queue"): 1.4 GiB on a 10-million-row table (per-label rule; the
label_set rule measured 6 % more at 1 M rows), more than these structures
explain; the remainder grows with the rows scanned and is not traced yet.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.cli import UserError
from mlc_ray.config import ConfigError

__all__ = [
    "REASONS",
    "QUEUE_COLUMNS",
    "SelectConfig",
    "QueueRow",
    "QueueResult",
    "select_queue",
    "key_hash",
]

log = logging.getLogger(__name__)

REASONS = ("uncertainty", "disagreement", "rare_combination", "random")
UNCERTAINTY_RULES = ("label_set", "label")
QUEUE_COLUMNS = ("image", "labels", "reason", "score", "label", "source_etag", "model_version", "run_id")
DEFAULT_MIX = "uncertainty:0.6,disagreement:0.2,rare_combination:0.2"
_EPS = 1e-6


def _parse_mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition(":")
        name = name.strip()
        if name == "rare":
            name = "rare_combination"
        if name not in REASONS or not sep:
            raise ConfigError(
                f"mix: expected REASON:SHARE[,REASON:SHARE...] with REASON one of {', '.join(REASONS)}, "
                f"got {part!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise ConfigError(f"mix: share of {name} must be a number, got {value!r}") from None
        if not share >= 0 or not math.isfinite(share):
            raise ConfigError(f"mix: share of {name} must be >= 0, got {value!r}")
        out[name] = share
    if not out or sum(out.values()) <= 0:
        raise ConfigError(f"mix: give at least one reason with a share > 0, got {text!r}")
    return out


@dataclass
class SelectConfig:
    """One labelling-queue selection (``jobs/select_queue.py``); YAML keys = field names."""

    table: str | None = None  # tag table root (s3:// or local): what jobs/tag.py --output wrote
    budget: int = 500  # rows in the queue (images to label)
    # the queue manifest (.csv / .jsonl / .parquet), labels.txt beside it; "{date}" = today (UTC), for
    # a scheduled job that keeps each week's queue
    out: str = "queue.csv"
    run: str | None = None  # only rows of this run id (default: every run, latest row per image)
    version: str | None = None  # only rows of this model version
    compare: str | None = (
        None  # a second tag table for disagreement (default: `table`, with compare_run/_version)
    )
    compare_run: str | None = None  # the second source's run id
    compare_version: str | None = None  # the second source's model version
    mix: str = DEFAULT_MIX  # budget share per reason; a reason without candidates passes its share on
    label_quota: int | None = None  # most rows one label may take; None = 2 x budget / number of labels
    rare_fraction: float = 0.02  # a label combination is rare when at most this fraction of images has it
    # uncertainty ranking: "label_set" = images by the chance that any label's decision is wrong;
    # "label" = each label's scores by their logit distance to its threshold (round-robin over labels)
    uncertainty_rule: str = "label_set"
    # logits of distance to the threshold per e-fold of a decision's chance of being wrong (label_set
    # rule): smaller = one very close label outranks several fairly close ones. 1.0 = the logit
    # distance read as is; 0.25-4 measured alike on the demo's tuning pool (BENCHMARKS.md
    # "Labelling queue: is it worth labelling?")
    uncertainty_temperature: float = 1.0
    thresholds: str | None = None  # thresholds.json, bundle dir or models:/ URI (default: found per row)
    seed: int = 0  # the random share's sample
    batch_size: int = 65_536  # rows per scanned batch (the memory of one step)

    def __post_init__(self) -> None:
        if not self.table:
            raise ConfigError("table: give the tag table's root (what jobs/tag.py --output wrote)")
        for name, low in (("budget", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.label_quota is not None and (
            isinstance(self.label_quota, bool)
            or not isinstance(self.label_quota, int)
            or self.label_quota < 1
        ):
            raise ConfigError(f"label_quota: expected an integer >= 1, got {self.label_quota!r}")
        if self.uncertainty_rule not in UNCERTAINTY_RULES:
            raise ConfigError(
                f"uncertainty_rule: expected one of {', '.join(UNCERTAINTY_RULES)}, got {self.uncertainty_rule!r}"
            )
        t = self.uncertainty_temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and t > 0):
            raise ConfigError(f"uncertainty_temperature: expected a number > 0, got {t!r}")
        if not 0.0 < float(self.rare_fraction) <= 1.0:
            raise ConfigError(f"rare_fraction: expected a fraction in (0, 1], got {self.rare_fraction!r}")
        if not self.out or not str(self.out).lower().endswith((".csv", ".jsonl", ".parquet")):
            raise ConfigError(
                f"out: the queue is a manifest file ending in .csv, .jsonl or .parquet, got {self.out!r}"
            )
        self.shares  # noqa: B018 - validates mix

    @property
    def shares(self) -> dict[str, float]:
        return _parse_mix(self.mix)

    @property
    def out_uri(self) -> str:
        from datetime import UTC, datetime

        return self.out.replace("{date}", datetime.now(UTC).strftime("%Y-%m-%d"))

    @property
    def has_compare(self) -> bool:
        return bool(self.compare or self.compare_run or self.compare_version)


@dataclass
class QueueRow:
    key: int  # hash of the image's identity (source_etag, else URI)
    image: str
    labels: list[str]
    reason: str
    score: float  # uncertainty: the chance the label set is wrong ("label_set" rule) or the label's
    # score ("label" rule); disagreement: largest |score difference|;
    # rare_combination: the combination's share of images; random: the image's sample key
    label: str  # the label (or combination) it was picked for
    source_etag: str | None
    model_version: str | None
    run_id: str | None


@dataclass
class QueueResult:
    out: str
    rows: list[QueueRow]
    labels: list[str]
    rows_scanned: int = 0
    images: int = 0  # distinct images (latest row each)
    compared: int = 0  # images both sources tagged
    rare_combinations: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_label: dict[str, int] = field(default_factory=dict)
    label_quota: int = 0
    wall_s: float = 0.0

    def format(self) -> str:
        lines = [
            f"queue      {self.out}: {len(self.rows)} images",
            f"scanned    {self.rows_scanned} rows, {self.images} distinct images (latest row each)"
            + (f", {self.compared} tagged by both sources" if self.compared else ""),
            "by reason  " + (", ".join(f"{k} {v}" for k, v in self.by_reason.items()) or "-"),
            f"by label   (quota {self.label_quota}) "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.by_label.items(), key=lambda kv: -kv[1])) or "-"),
            f"wall       {self.wall_s:.1f} s",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- scans


def key_hash(etags: pa.Array, uris: pa.Array) -> np.ndarray:
    """uint64 identity of each row's image: its ``source_etag``, or its URI when it has none."""
    import pyarrow.compute as pc

    etags = pc.if_else(
        pc.equal(pc.fill_null(etags, ""), ""), pc.binary_join_element_wise("uri:", uris, ""), etags
    )
    return _hash_strings(etags)


_MASK64 = (1 << 64) - 1
_POW_BASE = np.uint64(0x100000001B3)  # FNV's 64-bit prime: an odd multiplier mod 2**64
_POWERS = np.ones(1, dtype=np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the 64 output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_strings(arr: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string, vectorised over Arrow's buffers (no Python string per row):
    a polynomial hash of the bytes mod 2**64 plus the length, through splitmix64's finaliser."""
    global _POWERS
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    if arr.null_count:
        arr = arr.fill_null("")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = (
        np.frombuffer(arr.buffers()[2], dtype=np.uint8)
        if arr.buffers()[2] is not None
        else np.zeros(0, np.uint8)
    )
    start = int(offsets[0])
    rel = offsets - start
    lengths = np.diff(rel)
    nbytes = int(rel[-1])
    longest = int(lengths.max()) if len(lengths) else 0
    if len(_POWERS) < longest:
        with np.errstate(over="ignore"):  # P**0, P**1, ... wrapping mod 2**64
            _POWERS = np.cumprod(np.concatenate([np.ones(1, np.uint64), np.full(longest - 1, _POW_BASE)]))
    h = np.zeros(len(lengths), dtype=np.uint64)
    if nbytes:
        pos = np.arange(nbytes, dtype=np.int64) - np.repeat(rel[:-1], lengths)
        with np.errstate(over="ignore"):
            contrib = (data[start : start + nbytes].astype(np.uint64) + np.uint64(1)) * _POWERS[pos]
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(contrib, rel[:-1][nonempty])
    with np.errstate(over="ignore"):
        return _mix64(h ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


def _seeded(keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform random order of images that depends only on (image, seed)."""
    with np.errstate(over="ignore"):
        return _mix64(keys ^ np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64))


@dataclass
class _Source:
    uri: str
    run: str | None
    version: str | None

    def dataset(self) -> Any:
        import pyarrow.dataset as pads

        from mlc_ray import storage

        fs, path = storage.arrow_filesystem(self.uri)
        try:
            ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        except (FileNotFoundError, OSError) as exc:
            raise UserError(
                f"tag table {self.uri} does not exist or holds no Parquet files ({exc})"
            ) from None
        if not ds.files:
            raise UserError(f"tag table {self.uri} holds no Parquet files (is it jobs/tag.py's --output?)")
        missing = {"image_uri", "source_etag", "labels", "scores", "error", "tagged_at"} - set(
            ds.schema.names
        )
        if missing:
            raise UserError(f"{self.uri} is not a tag table: no column(s) {', '.join(sorted(missing))}")
        return ds

    def filter(self) -> Any:
        import pyarrow.compute as pc

        f = pc.field("error").is_null()
        if self.run:
            f = f & (pc.field("run_id") == self.run)
        if self.version:
            f = f & (pc.field("model_version") == str(self.version))
        return f

    def describe(self) -> str:
        what = [f"run {self.run}"] if self.run else []
        what += [f"version {self.version}"] if self.version else []
        return f"{self.uri}" + (f" ({', '.join(what)})" if what else "")

    def batches(self, columns: Sequence[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        # little read-ahead: memory stays at a few batches (pyarrow's default buffers 16 per file)
        scan = self.dataset().to_batches(
            columns=list(columns),
            filter=self.filter(),
            batch_size=batch_size,
            batch_readahead=2,
            fragment_readahead=1,
        )
        for batch in scan:
            if batch.num_rows:
                yield batch


class _Latest:
    """Which row of each image is the latest: sorted unique key hashes and their largest tagged_at."""

    REDUCE_ROWS = 2_000_000  # rows buffered between merges: bounds the merge's temporary arrays

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.times = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self.rows = 0

    def add(self, keys: np.ndarray, times: np.ndarray) -> None:
        self._pending.append((keys, times))
        self._pending_rows += len(keys)
        self.rows += len(keys)
        if self._pending_rows >= self.REDUCE_ROWS:
            self._reduce()

    def _reduce(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys, *[k for k, _ in self._pending]])
        times = np.concatenate([self.times, *[t for _, t in self._pending]])
        self._pending, self._pending_rows = [], 0
        order = np.lexsort((times, keys))  # by key, then time: the last of each key is its latest
        keys, times = keys[order], times[order]
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = keys[1:] != keys[:-1]
        self.keys, self.times = keys[last], times[last]

    def finish(self) -> _Latest:
        self._reduce()
        return self

    def is_latest(self, keys: np.ndarray, times: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        order = np.argsort(keys)  # sorted queries: numpy's binary search starts from the last hit
        pos = np.empty(len(keys), dtype=np.int64)
        pos[order] = np.searchsorted(self.keys, keys[order])
        pos = np.minimum(pos, len(self.keys) - 1)
        return (self.keys[pos] == keys) & (self.times[pos] == times)


def _times(batch: pa.RecordBatch) -> np.ndarray:
    return np.asarray(batch.column("tagged_at").cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False))


def _keys(batch: pa.RecordBatch) -> np.ndarray:
    return key_hash(batch.column("source_etag"), batch.column("image_uri"))


def _latest(source: _Source, batch_size: int) -> tuple[_Latest, set[tuple[str, str, str, str]]]:
    """[1] one scan of 3 columns: the latest row per image, and every (run, thresholds, model, version)."""
    latest = _Latest()
    provenance: set[tuple[str, str, str, str]] = set()
    cols = [
        "image_uri",
        "source_etag",
        "tagged_at",
        "run_id",
        "thresholds_sha256",
        "model_name",
        "model_version",
    ]
    for batch in source.batches(cols, batch_size):
        latest.add(_keys(batch), _times(batch))
        prov = (
            pa.table(
                {c: batch.column(c) for c in ("run_id", "thresholds_sha256", "model_name", "model_version")}
            )
            .group_by(["run_id", "thresholds_sha256", "model_name", "model_version"])
            .aggregate([])
        )
        provenance.update(tuple(str(v or "") for v in row.values()) for row in prov.to_pylist())
    return latest.finish(), provenance


def _scores(batch: pa.RecordBatch, labels: list[str] | None) -> tuple[list[str], np.ndarray]:
    """(label names, (n, L) float32 scores); every row must carry the same labels in the same order."""
    import pyarrow.compute as pc

    col = batch.column("scores")
    lengths = np.asarray(pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False))
    flat = pc.list_flatten(col)
    if labels is None:
        labels = [str(x) for x in flat.field("label")[: int(lengths[0])].to_pylist()]
    n_labels = len(labels)
    names = pc.index_in(flat.field("label"), value_set=pa.array(labels)).fill_null(-1).to_numpy()
    if (lengths != n_labels).any() or not np.array_equal(
        names.reshape(len(lengths), n_labels), np.broadcast_to(np.arange(n_labels), (len(lengths), n_labels))
    ):
        raise UserError(
            "the selected rows come from models with different labels; pick one model's rows with "
            "--run RUN_ID or --version V"
        )
    scores = np.asarray(flat.field("score").to_numpy(zero_copy_only=False), dtype=np.float32)
    return labels, scores.reshape(len(lengths), n_labels)


def _listed(batch: pa.RecordBatch, labels: list[str]) -> np.ndarray:
    """(n, L) bool: which labels each row lists (its ``labels`` column)."""
    import pyarrow.compute as pc

    col = batch.column("labels")
    out = np.zeros((batch.num_rows, len(labels)), dtype=bool)
    flat = pc.list_flatten(col)
    if len(flat):
        idx = np.asarray(
            pc.index_in(flat, value_set=pa.array(labels)).fill_null(-1).to_numpy(), dtype=np.int64
        )
        rows = np.asarray(pc.list_parent_indices(col).to_numpy(), dtype=np.int64)
        ok = idx >= 0  # a listed label the scores do not carry cannot happen in one model's rows
        out[rows[ok], idx[ok]] = True
    return out


# --------------------------------------------------------------------------------------------- thresholds


def _load_thresholds(uri: str) -> Any:
    """Thresholds from a thresholds.json, a bundle directory or a ``models:/`` URI."""
    from mlc_ray import storage
    from mlc_ray.calibrate import Thresholds

    if uri.startswith("models:/"):
        from mlc_ray.registry import resolve_model

        uri = storage.join(resolve_model(uri).local_dir, "thresholds.json")
    elif not uri.endswith(".json"):
        uri = storage.join(uri, "thresholds.json")
    return Thresholds.load(uri)


def _thresholds_by_sha(
    cfg: SelectConfig, source: _Source, provenance: set[tuple[str, str, str, str]], labels: list[str]
) -> dict[str, np.ndarray]:
    """thresholds_sha256 -> threshold per label (in ``labels`` order) for every sha the rows name."""
    from mlc_ray import storage

    def ordered(names: Sequence[str], values: Sequence[float], where: str) -> np.ndarray:
        index = {n: float(v) for n, v in zip(names, values, strict=True)}
        missing = [name for name in labels if name not in index]
        if missing:
            raise UserError(f"{where}: no threshold for label(s) {', '.join(missing)}")
        return np.array([index[name] for name in labels], dtype=np.float64)

    shas = sorted({sha for _, sha, _, _ in provenance})
    if cfg.thresholds:
        t = _load_thresholds(cfg.thresholds)
        if t.sha256 not in shas:
            log.warning(
                "thresholds %s (sha256 %s) are not the ones the rows were tagged with (%s)",
                cfg.thresholds,
                t.sha256[:12],
                ", ".join(s[:12] for s in shas),
            )
        values = ordered(t.labels, t.values, cfg.thresholds)
        return dict.fromkeys(shas, values)
    out: dict[str, np.ndarray] = {}
    for run_id, sha, model_name, model_version in sorted(provenance):
        if sha in out:
            continue
        report = storage.join(source.uri, "_runs", run_id, "report", "report.json")
        try:
            doc = json.loads(storage.read_text(report))
            rows = doc["labels"]
            out[sha] = ordered([r["label"] for r in rows], [r["threshold"] for r in rows], report)
            continue
        except (FileNotFoundError, KeyError, ValueError):
            pass
        if model_name and model_version and not model_version.startswith("bundle-"):
            try:
                t = _load_thresholds(f"models:/{model_name}/{model_version}")
            except Exception as exc:  # registry down or version deleted: say what to pass instead
                log.warning("thresholds of %s v%s: %s", model_name, model_version, exc)
            else:
                if t.sha256 == sha:
                    out[sha] = ordered(t.labels, t.values, f"models:/{model_name}/{model_version}")
                    continue
    missing = [s for s in shas if s not in out]
    if missing:
        raise UserError(
            f"the thresholds the rows were tagged with (sha256 {', '.join(s[:12] for s in missing)}) are in no "
            "run report of the table nor in a registered version it names; pass --thresholds "
            "(thresholds.json, a bundle directory or models:/NAME/VERSION)"
        )
    return out


def decision_doubt(
    scores: np.ndarray, thresholds: np.ndarray, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How doubtful each thresholded decision is, and each image's whole label set.

    ``scores`` (n, L) and ``thresholds`` (n, L) or (L,). Returns ``distance`` (n, L), the logit
    distance ``|logit(s) - logit(t)|``; ``p_wrong`` (n, L), the chance read from it that the label's
    decision is wrong, ``1 / (1 + exp(distance / temperature))`` (0.5 on the threshold, whatever the
    threshold); and ``log_right`` (n,), ``sum_l log(1 - p_wrong)``: the log of the chance that every
    decision is right, so ``1 - exp(log_right)`` is the chance the label set is wrong. Images rank by
    ``log_right`` (ascending): no rounding to 1.0 when several labels are borderline.
    """
    s = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS)
    t = np.clip(np.asarray(thresholds, dtype=np.float64), _EPS, 1 - _EPS)
    distance = np.abs(np.log(s / (1 - s)) - np.log(t / (1 - t)))
    z = distance / float(temperature)
    p_wrong = np.exp(-np.logaddexp(0.0, z))  # 1 / (1 + e^z), stable for large z
    log_right = -np.logaddexp(0.0, -z).sum(axis=1)  # log(1 - p) = -log(1 + e^-z)
    return distance, p_wrong, log_right


def _row_thresholds(batch: pa.RecordBatch, thresholds: dict[str, np.ndarray]) -> np.ndarray:
    """(n, L) thresholds each row was tagged with (by its ``thresholds_sha256``)."""
    import pyarrow.compute as pc

    shas = pc.dictionary_encode(batch.column("thresholds_sha256"))
    table_t = np.stack([thresholds[str(sha)] for sha in shas.dictionary.to_pylist()])
    return table_t[np.asarray(shas.indices.to_numpy(), dtype=np.int64)]


def _doubtful_labels(p_wrong: np.ndarray, labels: list[str]) -> list[str]:
    """One image's labels it may be counted under (label_set rule), most doubtful first: those
    whose decision's chance of being wrong is at least half the image's largest."""
    order = np.argsort(-p_wrong, kind="stable")
    top = p_wrong[order[0]]
    return [labels[int(j)] for j in order if p_wrong[j] >= 0.5 * top]


# --------------------------------------------------------------------------------------------- pools


class _Pool:
    """The ``cap`` best candidates (smallest ``order`` value) of one reason and label/combination."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.items: list[tuple[float, int, dict]] = []  # (order, key, row)

    def worst(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.cap else math.inf

    def offer(self, order: np.ndarray, keys: np.ndarray, make_row: Any) -> None:
        """Offer a batch's candidates; ``make_row(i)`` builds the row dict of candidate ``i`` lazily."""
        if not len(order):
            return
        take = np.flatnonzero(order < self.worst())
        if len(take) > self.cap:
            take = take[np.argpartition(order[take], self.cap - 1)[: self.cap]]
        if not len(take):
            return
        merged = {key: (o, key, row) for o, key, row in self.items}
        for i in take:
            k = int(keys[i])
            if k not in merged or order[i] < merged[k][0]:
                merged[k] = (float(order[i]), k, make_row(int(i)))
        self.items = sorted(merged.values(), key=lambda x: (x[0], x[1]))[: self.cap]


# --------------------------------------------------------------------------------------------- main


def _row_maker(batch: pa.RecordBatch) -> Any:
    """``make(i, ...)``: the queue row of the batch's row i (only candidates become Python objects)."""

    def value(name: str, i: int) -> Any:
        return batch.column(name)[i].as_py()

    def make(i: int, reason: str, score: float, label: str) -> dict:
        return {
            "image": value("image_uri", i),
            "labels": list(value("labels", i) or []),
            "reason": reason,
            "score": float(score),
            "label": label,
            "source_etag": value("source_etag", i),
            "model_version": value("model_version", i),
            "run_id": value("run_id", i),
        }

    return make


_SCAN_COLUMNS = [
    "image_uri",
    "source_etag",
    "labels",
    "scores",
    "tagged_at",
    "thresholds_sha256",
    "model_version",
    "run_id",
]


def _compare_index(
    source: _Source, labels: list[str], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The second source's latest row per image: sorted keys, float16 scores (n, L), listed flags."""
    latest, _ = _latest(source, batch_size)
    keys, scores, listed = [], [], []
    for batch in source.batches(_SCAN_COLUMNS, batch_size):
        k = _keys(batch)
        win = latest.is_latest(k, _times(batch))
        if not win.any():
            continue
        batch = batch.filter(pa.array(win))
        _, s = _scores(batch, labels)
        keys.append(k[win])
        scores.append(s.astype(np.float16))
        listed.append(_listed(batch, labels))
    if not keys:
        raise UserError(f"second source {source.describe()}: no tagged rows")
    k = np.concatenate(keys)
    order = np.argsort(k, kind="stable")
    return k[order], np.concatenate(scores)[order], np.concatenate(listed)[order]


def select_queue(cfg: SelectConfig) -> QueueResult:
    """Scan the tag table, pick ``cfg.budget`` images by the reasons in ``cfg.mix``, write the queue."""
    import pyarrow.compute as pc

    t0 = time.monotonic()
    source = _Source(cfg.table, cfg.run, cfg.version)
    shares = cfg.shares
    if not cfg.has_compare:
        shares.pop("disagreement", None)
    elif "disagreement" not in shares:
        log.info("a second source is given but the mix has no disagreement share")

    # [1] the latest row per image (3 small columns), and the provenance of the rows
    latest, provenance = _latest(source, cfg.batch_size)
    if not latest.rows:
        raise UserError(
            f"tag table {source.describe()}: no tagged rows (every row has an error, or no row matches)"
        )
    n_images = len(latest.keys)

    # [2] scan scores: uncertainty pools per label, disagreement and random pools, combination counts
    labels: list[str] | None = None
    thresholds: dict[str, np.ndarray] = {}
    uncertain: list[_Pool] = []
    disagree = _Pool(cfg.budget)
    random_pool = _Pool(cfg.budget)
    combos: Counter = Counter()
    compare = None
    compared = 0
    quota = cfg.label_quota
    by_label_set = cfg.uncertainty_rule == "label_set"
    for batch in source.batches(_SCAN_COLUMNS, cfg.batch_size):
        keys = _keys(batch)
        win = latest.is_latest(keys, _times(batch))
        if not win.any():
            continue
        if not win.all():
            batch, keys = batch.filter(pa.array(win)), keys[win]
        labels, scores = _scores(batch, labels)
        n_labels = len(labels)
        if not uncertain:
            thresholds = _thresholds_by_sha(cfg, source, provenance, labels)
            quota = quota or max(1, math.ceil(2 * cfg.budget / n_labels))
            uncertain = [_Pool(cfg.budget) for _ in labels]  # not the quota: labels share images
            if cfg.has_compare:
                other = _Source(cfg.compare or cfg.table, cfg.compare_run, cfg.compare_version)
                compare = _compare_index(other, labels, cfg.batch_size)
        make = _row_maker(batch)
        margin, p_wrong, log_right = decision_doubt(
            scores, _row_thresholds(batch, thresholds), cfg.uncertainty_temperature
        )
        if by_label_set:
            # one pool per image's most doubtful label (its best `budget` images), ranked by the
            # chance the image's whole label set is wrong; the draw merges them, best first
            lead = p_wrong.argmax(axis=1)
            for j, pool in enumerate(uncertain):
                rows = np.flatnonzero(lead == j)
                pool.offer(
                    log_right[rows],
                    keys[rows],
                    lambda i, rows=rows, make=make, lr=log_right, pw=p_wrong, names=labels: {
                        **make(int(rows[i]), "uncertainty", -math.expm1(lr[rows[i]]), ""),
                        "_labels": _doubtful_labels(pw[rows[i]], names),
                    },
                )
        else:
            for j, pool in enumerate(uncertain):
                pool.offer(margin[:, j], keys, lambda i, j=j: make(i, "uncertainty", scores[i, j], labels[j]))  # noqa: B023 - called inside offer()
        if shares.get("random", 0) > 0:
            order = _seeded(keys, cfg.seed).astype(np.float64) / 2.0**64
            random_pool.offer(order, keys, lambda i: make(i, "random", order[i], ""))  # noqa: B023 - called inside offer()
        counted = pc.value_counts(pc.binary_join(batch.column("labels"), "|"))
        combos.update(
            dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True))
        )
        if compare is not None:
            ckeys, cscores, clisted = compare
            pos = np.minimum(np.searchsorted(ckeys, keys), len(ckeys) - 1)
            both = ckeys[pos] == keys
            compared += int(both.sum())
            if both.any():
                rows = np.flatnonzero(both)
                diff = np.abs(scores[rows] - cscores[pos[rows]].astype(np.float32))
                flips = (_listed(batch, labels)[rows] != clisted[pos[rows]]).sum(axis=1)
                priority = flips + diff.max(axis=1)
                worst = diff.argmax(axis=1)
                keep = priority > 0
                rows, priority, worst, dmax = rows[keep], priority[keep], worst[keep], diff.max(axis=1)[keep]
                disagree.offer(
                    -priority,
                    keys[rows],
                    lambda i: make(int(rows[i]), "disagreement", dmax[i], labels[int(worst[i])]),  # noqa: B023 - called inside offer()
                )
    assert labels is not None  # latest.rows > 0 means at least one batch had a latest row

    # [3] rare combinations: a third scan keeps, per rare combination, a seeded sample of its images
    rare_max = max(1, math.floor(cfg.rare_fraction * n_images))
    rare = {c: n for c, n in combos.items() if n <= rare_max}
    rare_pools: dict[str, _Pool] = {}
    if rare and shares.get("rare_combination", 0) > 0:
        # round-robin, rarest first, takes at most `budget` rows: keep the `budget` rarest combinations,
        # each with as many rows as an equal share of the budget (or all it has)
        kept = sorted(rare, key=lambda c: (rare[c], c))[: cfg.budget]
        share = max(1, math.ceil(cfg.budget / len(kept)))
        rare_pools = {c: _Pool(min(share, rare[c])) for c in kept}
        wanted_set = pa.array(kept, pa.string())
        for batch in source.batches(_SCAN_COLUMNS, cfg.batch_size):
            joined_arr = pc.binary_join(batch.column("labels"), "|")
            member = pc.index_in(joined_arr, value_set=wanted_set).fill_null(-1).to_numpy()
            if not (member >= 0).any():
                continue
            keys = _keys(batch)
            hit = (member >= 0) & latest.is_latest(keys, _times(batch))
            if not hit.any():
                continue
            make = _row_maker(batch)
            if by_label_set:  # the combination's images whose label set is most likely wrong first
                _, scores = _scores(batch, labels)
                order = decision_doubt(
                    scores, _row_thresholds(batch, thresholds), cfg.uncertainty_temperature
                )[2]
            else:
                order = _seeded(keys, cfg.seed).astype(np.float64) / 2.0**64
            for m in np.unique(member[hit]):
                c = kept[int(m)]
                idx = np.flatnonzero(hit & (member == m))
                rare_pools[c].offer(
                    order[idx],
                    keys[idx],
                    lambda i, idx=idx, c=c: make(  # noqa: B023 - called inside offer()
                        int(idx[i]), "rare_combination", rare[c] / n_images, c or "(none)"
                    ),
                )

    # [4] fill the budget: each reason its share, round-robin over labels, a quota per label
    assert quota is not None
    candidates: dict[str, list[list[tuple[float, int, dict]]]] = {
        # label_set: one list, best first over every label (the quota still caps each label);
        # label: a list per label, taken round-robin
        "uncertainty": [sorted((x for p in uncertain for x in p.items), key=lambda x: (x[0], x[1]))]
        if by_label_set
        else [p.items for p in uncertain],
        "disagreement": [disagree.items],
        "rare_combination": [rare_pools[c].items for c in sorted(rare_pools, key=lambda c: (rare[c], c))],
        "random": [random_pool.items],
    }
    order_of_reasons = [r for r in REASONS if shares.get(r, 0) > 0]
    total_share = sum(shares[r] for r in order_of_reasons)
    wanted = {r: int(cfg.budget * shares[r] / total_share) for r in order_of_reasons}
    if order_of_reasons:
        wanted[order_of_reasons[0]] += cfg.budget - sum(wanted.values())
    picked: dict[int, dict] = {}
    per_label: Counter = Counter()

    def quota_label(row: dict) -> tuple[bool, str | None]:
        """(whether the row fits the quota, the label it counts under). A label_set row counts under
        the most doubtful of its doubtful labels (``_labels``) that has room."""
        if "_labels" in row:
            for lab in row["_labels"]:
                if per_label[lab] < quota:
                    return True, lab
            return False, None
        lab = row["label"] if row["reason"] in ("uncertainty", "disagreement") else None
        return lab is None or per_label[lab] < quota, lab

    def draw(reason: str, limit: int) -> int:
        """Round-robin over the reason's lists (labels / combinations): each turn takes the next
        usable candidate of every list, best first, so a small budget gets the best of all lists."""
        lists = candidates[reason]
        cursors = [0] * len(lists)
        taken = 0
        while taken < limit and len(picked) < cfg.budget:
            turn = []
            for li, items in enumerate(lists):
                while cursors[li] < len(items):
                    order, key, row = items[cursors[li]]
                    if key in picked or not quota_label(row)[0]:
                        cursors[li] += 1
                        continue
                    turn.append((order, li))
                    break
            if not turn:
                break
            for _, li in sorted(turn):
                order, key, row = lists[li][cursors[li]]
                cursors[li] += 1
                fits, lab = quota_label(row)
                if key in picked or not fits:
                    continue  # taken or filled earlier in this turn
                if "_labels" in row:
                    row = {k: v for k, v in row.items() if k != "_labels"} | {"label": lab}
                picked[key] = row
                if lab is not None:
                    per_label[lab] += 1
                taken += 1
                if taken >= limit or len(picked) >= cfg.budget:
                    break
        return taken

    for reason in order_of_reasons:
        draw(reason, wanted[reason])
    for reason in order_of_reasons:  # what a reason could not fill goes to the others
        if len(picked) < cfg.budget:
            draw(reason, cfg.budget - len(picked))

    rows = [QueueRow(key=k, **r) for k, r in picked.items()]
    out = cfg.out_uri
    _write_queue(out, rows, labels)
    result = QueueResult(
        out=out,
        rows=rows,
        labels=labels,
        rows_scanned=latest.rows,
        images=n_images,
        compared=compared,
        rare_combinations=len(rare),
        by_reason=dict(Counter(r.reason for r in rows)),
        by_label=dict(per_label),
        label_quota=quota,
        wall_s=round(time.monotonic() - t0, 2),
    )
    log.info("labelling queue: %d images -> %s", len(rows), out)
    return result


def _write_queue(out: str, rows: list[QueueRow], labels: list[str]) -> None:
    """The queue manifest (atomic) and labels.txt beside it (the model's vocabulary, in its order)."""
    import pyarrow.parquet as pq

    from mlc_ray import storage

    ext = out.lower().rsplit(".", 1)[-1]
    records = [
        {
            "image": r.image,
            "labels": "|".join(r.labels),
            "reason": r.reason,
            "score": round(r.score, 6),
            "label": r.label,
            "source_etag": r.source_etag or "",
            "model_version": r.model_version or "",
            "run_id": r.run_id or "",
        }
        for r in rows
    ]
    if ext == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(QUEUE_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        storage.write_text(out, buf.getvalue())
    elif ext == "jsonl":
        storage.write_text(
            out,
            "".join(
                json.dumps({**r, "labels": r["labels"].split("|") if r["labels"] else []}) + "\n"
                for r in records
            ),
        )
    else:
        table = pa.Table.from_pylist(
            [{**r, "labels": r["labels"].split("|") if r["labels"] else []} for r in records],
            schema=pa.schema(
                [
                    pa.field(
                        c,
                        pa.list_(pa.string())
                        if c == "labels"
                        else pa.float64()
                        if c == "score"
                        else pa.string(),
                    )
                    for c in QUEUE_COLUMNS
                ]
            ),
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(out, sink.getvalue().to_pybytes())
    parent = out.rsplit("/", 1)[0] if "/" in out else "."
    storage.write_text(storage.join(parent, "labels.txt"), "".join(f"{label}\n" for label in labels))

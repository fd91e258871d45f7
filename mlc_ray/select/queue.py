"""``select_queue``: the scans ([1] latest rows, [2] scores into candidate pools, [3] rare
combinations) and the draw ([4] each reason its share, a quota per label), then the queue written.
The rules it applies are in the package docstring (``mlc_ray/select/__init__.py``)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from mlc_ray.errors import UserError
from mlc_ray.select.config import QUEUE_COLUMNS, REASONS, QueueResult, QueueRow, SelectConfig
from mlc_ray.select.doubt import decision_doubt, doubtful_labels, row_thresholds, thresholds_by_sha
from mlc_ray.select.keys import seeded_order
from mlc_ray.select.scan import (
    SCAN_COLUMNS,
    Source,
    batch_keys,
    batch_scores,
    batch_times,
    compare_index,
    latest_rows,
    listed_labels,
)

__all__ = ["select_queue", "write_queue"]

log = logging.getLogger(__name__)


class Pool:
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


def row_maker(batch: pa.RecordBatch) -> Any:
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


def select_queue(cfg: SelectConfig) -> QueueResult:
    """Scan the tag table, pick ``cfg.budget`` images by the reasons in ``cfg.mix``, write the queue."""
    import pyarrow.compute as pc

    t0 = time.monotonic()
    source = Source(cfg.table, cfg.run, cfg.version)
    shares = cfg.shares
    if not cfg.has_compare:
        shares.pop("disagreement", None)
    elif "disagreement" not in shares:
        log.info("a second source is given but the mix has no disagreement share")

    # [1] the latest row per image (3 small columns), and the provenance of the rows
    latest, provenance = latest_rows(source, cfg.batch_size)
    if not latest.rows:
        raise UserError(
            f"tag table {source.describe()}: no tagged rows (every row has an error, or no row matches)"
        )
    n_images = len(latest.keys)

    # [2] scan scores: uncertainty pools per label, disagreement and random pools, combination counts
    labels: list[str] | None = None
    thresholds: dict[str, np.ndarray] = {}
    uncertain: list[Pool] = []
    disagree = Pool(cfg.budget)
    random_pool = Pool(cfg.budget)
    combos: Counter = Counter()
    compare = None
    compared = 0
    quota = cfg.label_quota
    by_label_set = cfg.uncertainty_rule == "label_set"
    for batch in source.batches(SCAN_COLUMNS, cfg.batch_size):
        keys = batch_keys(batch)
        win = latest.is_latest(keys, batch_times(batch))
        if not win.any():
            continue
        if not win.all():
            batch, keys = batch.filter(pa.array(win)), keys[win]
        labels, scores = batch_scores(batch, labels)
        n_labels = len(labels)
        if not uncertain:
            thresholds = thresholds_by_sha(cfg, source, provenance, labels)
            quota = quota or max(1, math.ceil(2 * cfg.budget / n_labels))
            uncertain = [Pool(cfg.budget) for _ in labels]  # not the quota: labels share images
            if cfg.has_compare:
                other = Source(cfg.compare or cfg.table, cfg.compare_run, cfg.compare_version)
                compare = compare_index(other, labels, cfg.batch_size)
        make = row_maker(batch)
        margin, p_wrong, log_right = decision_doubt(
            scores, row_thresholds(batch, thresholds), cfg.uncertainty_temperature
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
                        "_labels": doubtful_labels(pw[rows[i]], names),
                    },
                )
        else:
            for j, pool in enumerate(uncertain):
                pool.offer(margin[:, j], keys, lambda i, j=j: make(i, "uncertainty", scores[i, j], labels[j]))  # noqa: B023 - called inside offer()
        if shares.get("random", 0) > 0:
            order = seeded_order(keys, cfg.seed).astype(np.float64) / 2.0**64
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
                flips = (listed_labels(batch, labels)[rows] != clisted[pos[rows]]).sum(axis=1)
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
    rare_pools: dict[str, Pool] = {}
    if rare and shares.get("rare_combination", 0) > 0:
        # round-robin, rarest first, takes at most `budget` rows: keep the `budget` rarest combinations,
        # each with as many rows as an equal share of the budget (or all it has)
        kept = sorted(rare, key=lambda c: (rare[c], c))[: cfg.budget]
        share = max(1, math.ceil(cfg.budget / len(kept)))
        rare_pools = {c: Pool(min(share, rare[c])) for c in kept}
        wanted_set = pa.array(kept, pa.string())
        for batch in source.batches(SCAN_COLUMNS, cfg.batch_size):
            joined_arr = pc.binary_join(batch.column("labels"), "|")
            member = pc.index_in(joined_arr, value_set=wanted_set).fill_null(-1).to_numpy()
            if not (member >= 0).any():
                continue
            keys = batch_keys(batch)
            hit = (member >= 0) & latest.is_latest(keys, batch_times(batch))
            if not hit.any():
                continue
            make = row_maker(batch)
            if by_label_set:  # the combination's images whose label set is most likely wrong first
                _, scores = batch_scores(batch, labels)
                order = decision_doubt(
                    scores, row_thresholds(batch, thresholds), cfg.uncertainty_temperature
                )[2]
            else:
                order = seeded_order(keys, cfg.seed).astype(np.float64) / 2.0**64
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
    write_queue(out, rows, labels)
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


def write_queue(out: str, rows: list[QueueRow], labels: list[str]) -> None:
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

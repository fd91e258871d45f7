"""train.tracking.per_label_table: the CSV reads back with the csv module, whatever the label text."""

from __future__ import annotations

import csv
import io

import numpy as np

from mlc_ray.metrics import compute_metrics
from mlc_ray.train.tracking import per_label_table


def test_csv_round_trips_awkward_labels_and_markdown_shows_them_plain() -> None:
    labels = ["plain", "with,comma", 'with"quote', "two\nlines", "no positives"]
    rng = np.random.default_rng(0)
    scores = rng.random((40, len(labels)))
    targets = (rng.random((40, len(labels))) < 0.4).astype(np.uint8)
    targets[:, -1] = 0
    m05 = compute_metrics(scores, targets, 0.5, labels=labels)
    mcal = compute_metrics(scores, targets, 0.3, labels=labels)
    text, md = per_label_table(m05, mcal, np.full(len(labels), 0.3), labels)

    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["label"] for r in rows] == labels
    assert [int(r["support"]) for r in rows] == targets.sum(axis=0).tolist()
    assert rows[-1]["ap"] == ""  # no positives: AP undefined, an empty cell (n/a in the markdown)
    assert float(rows[0]["f1@cal"]) == round(float(mcal["per_label_f1"][0]), 4)
    assert '| with"quote |' in md and "| n/a |" in md

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

Modules: ``config`` (``SelectConfig``, the result types), ``scan`` (reading the table), ``keys`` (image
identity), ``doubt`` (thresholds and how doubtful a decision is), ``queue`` (``select_queue``: the
scans and the draw, and writing the queue).
"""

from __future__ import annotations

from mlc_ray.select.config import QUEUE_COLUMNS, REASONS, QueueResult, QueueRow, SelectConfig
from mlc_ray.select.doubt import decision_doubt
from mlc_ray.select.keys import key_hash
from mlc_ray.select.queue import select_queue

__all__ = [
    "QUEUE_COLUMNS",
    "REASONS",
    "QueueResult",
    "QueueRow",
    "SelectConfig",
    "decision_doubt",
    "key_hash",
    "select_queue",
]

"""Shadow comparison for promotion: what the challenger would do to unlabelled production images.

``jobs/promote.py --shadow s3://bucket/incoming/ --shadow-sample N`` runs this after the labelled
evaluation: a deterministic random sample of N images under the prefix (or manifest) is tagged
by the champion and by the candidate **through ``run_tagging``**, the bulk tagging pipeline of
``jobs/tag.py`` (same Ray Data stages, same scoring path, same thresholds and tag-table rows), into
one tag table with one run per model. Then, per label:

* both models' positive rates (the share of sampled images that list the label), their counts,
  the **relative rate change** ``(candidate - champion) / champion`` (``inf`` when the champion
  never lists it),
* agreement: **Cohen's kappa** of the two yes/no columns and the **Jaccard** index of the two
  positive sets,

and a contact sheet of the images where the two disagree most (most labels listed differently,
then the largest score difference), captioned with both predictions.

With ``max_rate_change`` R, a label whose relative change exceeds R, and which either model lists
at least ``min_count`` times in the sample (so 1 -> 2 of 500 is noise, not a change), **holds the
promotion**: the decision becomes a refusal (exit 3, the champion stays) unless ``force``. The
figures go into the promotion report (``report_lines``) and the versions' audit tags
(``audit_tags``: ``promotion.shadow*``); the report files (``shadow.json``, ``report.txt``, the
contact sheet) are logged to an MLflow run in experiment ``promotion`` (``promotion.shadow.report``
names it), and stay under ``output`` when one is given (the two runs' tag table too, which
``jobs/select_queue.py --run A --compare-run B`` can mine).

The sample: every key under the input is hashed with the seed (blake2b of ``seed:uri``) and the N
smallest hashes are kept while the listing streams by (a bounded heap, N keys in memory): a uniform
sample that depends only on the seed and the set of keys, never on the listing order.

Modules: ``config`` (``ShadowConfig``), ``sample`` (the seeded sample), ``report`` (the figures and the
hold rule), ``run`` (``run_shadow``: tagging both models, the contact sheet, MLflow), ``gate``
(``shadow_gate`` for ``registry.promote``).
"""

from __future__ import annotations

from mlc_ray.shadow.config import PROMOTION_EXPERIMENT, ShadowConfig
from mlc_ray.shadow.gate import shadow_gate
from mlc_ray.shadow.report import ShadowLabel, ShadowReport, cohen_kappa
from mlc_ray.shadow.run import run_shadow
from mlc_ray.shadow.sample import sample_input

__all__ = [
    "PROMOTION_EXPERIMENT",
    "ShadowConfig",
    "ShadowLabel",
    "ShadowReport",
    "cohen_kappa",
    "run_shadow",
    "sample_input",
    "shadow_gate",
]

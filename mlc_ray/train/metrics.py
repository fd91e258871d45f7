"""Kept so ``mlc_ray.train.metrics`` imports keep working: the metrics live in ``mlc_ray.metrics``.

They moved below ``train/`` because evaluation, promotion and the export's int8 gate use them too
(``export/`` must not import ``train/``). New code imports ``mlc_ray.metrics``.
"""

from mlc_ray.metrics import (  # noqa: F401
    PER_LABEL_KEYS,
    SCALAR_KEYS,
    average_precision,
    combination_accuracy,
    compute_metrics,
    format_metrics_table,
    jsonable_metrics,
    scalar_metrics,
)

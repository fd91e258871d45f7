"""mlc_ray.metrics (the scikit-learn wrapper) against scikit-learn on the same inputs (to 1e-6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_fscore_support

from mlc_ray.metrics import (
    average_precision,
    combination_accuracy,
    compute_metrics,
    format_metrics_table,
    jsonable_metrics,
    scalar_metrics,
)

TOL = 1e-6


def _random_case(
    seed: int, n: int = 300, n_labels: int = 9, ties: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Random scores correlated with random targets; column 0 has no positives, column 1 all positives
    except in the first tenth of the rows, which have no label at all."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, n_labels)) < rng.uniform(0.05, 0.5, n_labels)).astype(np.uint8)
    targets[:, 0] = 0
    targets[:, 1] = 1
    targets[: n // 10] = 0  # samples with no true label at all
    scores = np.clip(0.35 * targets + rng.normal(0.35, 0.25, (n, n_labels)), 0.0, 1.0)
    if ties:
        scores = np.round(scores, 1)  # many equal scores, exactly at the 0.5 threshold too
    return scores, targets


def _sklearn_reference(scores: np.ndarray, targets: np.ndarray, thresholds) -> dict:
    pred = (scores >= np.broadcast_to(thresholds, (scores.shape[1],))[None, :]).astype(np.uint8)
    ref = {}
    for avg in ("micro", "macro", "samples"):
        p, r, f, _ = precision_recall_fscore_support(targets, pred, average=avg, zero_division=0)
        ref.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    p, r, f, support = precision_recall_fscore_support(targets, pred, average=None, zero_division=0)
    ref.update(per_label_precision=p, per_label_recall=r, per_label_f1=f, per_label_support=support)
    ap = np.array(
        [
            average_precision_score(targets[:, j], scores[:, j]) if targets[:, j].any() else np.nan
            for j in range(targets.shape[1])
        ]
    )
    ref["per_label_ap"] = ap
    ref["mAP"] = float(np.nanmean(ap))
    ref["subset_accuracy"] = accuracy_score(targets, pred)
    return ref


@pytest.mark.parametrize(
    ("seed", "ties", "thresholds"),
    [(0, False, 0.5), (1, True, 0.5), (2, False, "per_label"), (3, True, "per_label"), (4, False, 0.0)],
)
def test_compute_metrics_matches_sklearn(seed: int, ties: bool, thresholds) -> None:
    scores, targets = _random_case(seed, ties=ties)
    if thresholds == "per_label":
        thresholds = np.random.default_rng(seed).uniform(0.2, 0.8, scores.shape[1]).round(1)
    got = compute_metrics(scores, targets, thresholds=thresholds)
    ref = _sklearn_reference(scores, targets, thresholds)
    for key, value in ref.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(got[key], value, atol=TOL, rtol=0, equal_nan=True, err_msg=key)
        else:
            assert got[key] == pytest.approx(value, abs=TOL), key
    assert math.isnan(got["per_label_ap"][0])  # no positives: undefined
    assert got["n_samples"] == scores.shape[0] and got["n_labels"] == scores.shape[1]


def test_average_precision_ties_and_tiny_cases() -> None:
    cases = [
        (np.array([0.5, 0.5, 0.5, 0.5]), np.array([1, 0, 1, 0])),  # one big tie
        (np.array([0.9, 0.8, 0.8, 0.1]), np.array([0, 1, 0, 1])),
        (np.array([0.3]), np.array([1])),
        (np.array([0.3, 0.9, 0.3]), np.array([1, 1, 1])),  # all positives: AP 1
        (np.array([0.2, 0.7, 0.7, 0.7, 0.1, 0.9]), np.array([1, 0, 1, 1, 0, 0])),
    ]
    for s, y in cases:
        got = average_precision(s[:, None], y[:, None])[0]
        assert got == pytest.approx(average_precision_score(y, s), abs=TOL)


def test_combination_and_subset_accuracy_by_hand() -> None:
    # labels: cat, dog, other; rows 0-2 hold cat+dog
    targets = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]])
    scores = np.array(
        [
            [0.9, 0.8, 0.1],  # exact
            [0.9, 0.2, 0.1],  # misses dog
            [0.9, 0.8, 0.7],  # exact (cat+dog+other)
            [0.9, 0.1, 0.1],  # exact
            [0.1, 0.6, 0.9],  # extra dog
        ]
    )
    assert combination_accuracy(scores, targets, 0.5, [0, 1]) == pytest.approx(2 / 3)
    assert combination_accuracy(scores, targets, [0.5, 0.5, 0.8], [0, 1]) == pytest.approx(1 / 3)
    assert math.isnan(combination_accuracy(np.zeros((2, 3)), np.array([[1, 0, 0], [0, 1, 0]]), 0.5, [0, 1]))
    assert compute_metrics(scores, targets)["subset_accuracy"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="label indices"):
        combination_accuracy(scores, targets, 0.5, [3])


def test_bad_inputs_are_explained() -> None:
    scores, targets = _random_case(0, n=20, n_labels=3)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        compute_metrics(scores[:, :2], targets)
    bad = scores.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="row 4"):
        compute_metrics(bad, targets)
    with pytest.raises(ValueError, match="0/1"):
        compute_metrics(scores, targets * 2)
    with pytest.raises(ValueError, match="one per label"):
        compute_metrics(scores, targets, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="label names"):
        compute_metrics(scores, targets, labels=["a", "b"])


def test_table_and_json_forms() -> None:
    scores, targets = _random_case(5, n=50, n_labels=3)
    targets[:, 1] = 1
    labels = ["never", "always", "sometimes"]
    metrics = compute_metrics(scores, targets, labels=labels)
    table = format_metrics_table(metrics, labels)
    lines = table.splitlines()
    assert lines[2].startswith("never") and "n/a" in lines[2]  # AP undefined without positives
    assert any(line.startswith("macro avg") and f"{metrics['macro_f1']:6.4f}" in line for line in lines)
    assert f"mAP {metrics['mAP']:6.4f}" in table
    js = jsonable_metrics(metrics)
    assert js["per_label_ap"]["never"] is None and js["per_label_ap"]["always"] == pytest.approx(1.0)
    assert js["per_label_support"]["always"] == 50
    import json

    json.dumps(js, allow_nan=False)  # strict JSON
    scalars = scalar_metrics(metrics, prefix="val_")
    assert scalars["val_macro_f1"] == metrics["macro_f1"] and "val_per_label_f1" not in scalars

"""The promotion gate as a pure function of two evaluations (no MLflow, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from mlc_ray.cli import UserError
from mlc_ray.evaluation import EvalResult
from mlc_ray.registry import promotion_gate


def _eval(macro_f1: float, per_label_f1: dict[str, float], **metrics: float) -> EvalResult:
    return EvalResult(
        metrics={"macro_f1": macro_f1, **metrics},
        per_label_f1=per_label_f1,
        scores=np.zeros((0, len(per_label_f1))),
        targets=np.zeros((0, len(per_label_f1)), dtype=np.uint8),
        labels=list(per_label_f1),
    )


CHAMP = _eval(0.70, {"cat": 0.80, "dog": 0.60}, mAP=0.75)


def test_better_candidate_without_label_drops_is_promoted() -> None:
    verdict = promotion_gate(_eval(0.75, {"cat": 0.85, "dog": 0.65}), CHAMP)
    assert verdict.promoted
    assert (verdict.candidate_value, verdict.champion_value) == (0.75, 0.70)
    assert verdict.label_drops == {}
    assert verdict.reason == (
        "macro_f1 0.7500 >= champion 0.7000 + 0.0000 and no label drops more than 0.030"
    )


def test_lower_metric_is_refused_and_min_delta_counts() -> None:
    assert not promotion_gate(_eval(0.69, {"cat": 0.8, "dog": 0.6}), CHAMP).promoted
    equal = _eval(0.70, {"cat": 0.8, "dog": 0.6})
    assert promotion_gate(equal, CHAMP).promoted  # ties win: >= champion + 0
    verdict = promotion_gate(equal, CHAMP, min_delta=0.01)
    assert not verdict.promoted
    assert verdict.reason == "macro_f1 0.7000 < champion 0.7000 + min delta 0.0100"


def test_one_label_dropping_too_far_refuses_even_a_better_average() -> None:
    cand = _eval(0.80, {"cat": 0.99, "dog": 0.55})  # dog -0.05
    verdict = promotion_gate(cand, CHAMP, max_label_drop=0.03)
    assert not verdict.promoted
    assert verdict.label_drops == pytest.approx({"dog": 0.05})
    assert verdict.reason == "F1 of 1 label(s) drops by more than 0.030 (worst: 'dog' -0.050)"
    assert promotion_gate(cand, CHAMP, max_label_drop=0.05).promoted  # a drop equal to the limit passes
    missing = promotion_gate(_eval(0.9, {"cat": 0.9}), CHAMP)  # a label the candidate lacks: F1 0
    assert not missing.promoted and missing.label_drops == pytest.approx({"dog": 0.60})


def test_other_metric_and_unknown_metric() -> None:
    cand = _eval(0.60, {"cat": 0.8, "dog": 0.6}, mAP=0.80)
    assert promotion_gate(cand, CHAMP, metric="mAP").promoted
    assert not promotion_gate(cand, CHAMP).promoted
    with pytest.raises(UserError, match="unknown metric 'nope'"):
        promotion_gate(cand, CHAMP, metric="nope")


def test_thresholds_fit_note_says_in_sample_only_where_the_bundle_says_so(tmp_path) -> None:
    import json

    from mlc_ray.registry.promotion import thresholds_fit_note

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert thresholds_fit_note(str(bundle), "v3", "macro_f1") == ""  # no metrics.json
    fitted = {"rows": "validation", "count": 300, "scores": "single-view"}
    (bundle / "metrics.json").write_text(
        json.dumps({"thresholds_fitted_on": fitted, "calibrated": {"macro_f1": 0.92741}})
    )
    assert thresholds_fit_note(str(bundle), "v3", "macro_f1") == (
        "v3's were fitted on these rows (fitted on all 300 validation rows): its macro_f1 here is "
        "in-sample (cross-fitted on them at training: 0.9274); pass --eval-data with rows no version "
        "was fitted on for a held-out comparison"
    )
    for other in ({"rows": "given"}, "fitted on all 300 validation rows", None):  # not fitted on val rows
        (bundle / "metrics.json").write_text(json.dumps({"thresholds_fitted_on": other}))
        assert thresholds_fit_note(str(bundle), "v3", "macro_f1") == ""
    # the field decides; the line for people in "measured_on" is read only for a bundle written before
    # the field existed
    prose = {"thresholds.json": "fitted on all 300 validation rows, single-view scores"}
    (bundle / "metrics.json").write_text(
        json.dumps({"measured_on": prose, "thresholds_fitted_on": {"rows": "given"}})
    )
    assert thresholds_fit_note(str(bundle), "v3", "macro_f1") == ""
    (bundle / "metrics.json").write_text(json.dumps({"measured_on": prose}))
    assert thresholds_fit_note(str(bundle), "v3", "macro_f1").startswith(
        "v3's were fitted on these rows (fitted on all 300 validation rows): its macro_f1 here is in-sample;"
    )
    (bundle / "metrics.json").write_text(json.dumps({"measured_on": {"thresholds.json": "given (0.5)"}}))
    assert thresholds_fit_note(str(bundle), "v3", "macro_f1") == ""

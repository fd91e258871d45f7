"""Per-label threshold calibration: each method's rule, degenerate labels, thresholds.json integrity."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score

from mlc_ray.calibrate import Thresholds, calibrate_thresholds, parse_method


def _random_problem(seed: int = 0, n: int = 400, n_labels: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Scores that carry signal but are miscalibrated differently per label (some too low, some too high)."""
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.05, 0.5, n_labels)
    targets = (rng.random((n, n_labels)) < rates).astype(np.uint8)
    logits = 2.0 * targets - 1.0 + rng.normal(0, 1.0, (n, n_labels)) + np.linspace(-2.0, 1.5, n_labels)
    return 1.0 / (1.0 + np.exp(-logits)), targets


LABELS5 = [f"l{i}" for i in range(5)]


def test_roc_closest_matches_hand_computed_roc() -> None:
    # 5 positives, 5 negatives. Walking the threshold down (predict score >= t):
    #   t     TP FP  (FPR, TPR)    distance^2 to (0, 1)
    #   0.90   1  0  (0.0, 0.2)    0.64
    #   0.80   2  0  (0.0, 0.4)    0.36
    #   0.70   2  1  (0.2, 0.4)    0.40
    #   0.60   3  1  (0.2, 0.6)    0.20
    #   0.55   4  1  (0.2, 0.8)    0.08   <- nearest
    #   0.50   4  2  (0.4, 0.8)    0.20
    #   0.40   5  2  (0.4, 1.0)    0.16
    #   0.30   5  3  (0.6, 1.0)    0.36  ... further away below
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1])[:, None]
    targets = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0])[:, None]
    th = calibrate_thresholds(scores, targets, ["x"], method="roc_closest")
    assert th.values == [0.55]
    assert th.method == "roc_closest"
    assert th.support == [{"positives": 5, "negatives": 5}]
    pred = th.apply(scores)[:, 0]
    assert pred.sum() == 5 and pred[targets[:, 0] == 1].sum() == 4  # TPR 0.8, FPR 0.2


def test_f1_max_beats_half_and_reproduces_its_f1() -> None:
    scores, targets = _random_problem()
    th = calibrate_thresholds(scores, targets, LABELS5, method="f1_max")
    assert not th.fallback_labels
    pred = th.apply(scores)
    for j in range(5):
        f1_cal = f1_score(targets[:, j], pred[:, j])
        f1_half = f1_score(targets[:, j], scores[:, j] >= 0.5, zero_division=0)
        assert f1_cal >= f1_half
        # exhaustive check: no cut at any observed score does better
        best = max(
            f1_score(targets[:, j], scores[:, j] >= s, zero_division=0) for s in np.unique(scores[:, j])
        )
        assert f1_cal == pytest.approx(best, abs=1e-12)
    # the miscalibrated labels really gain (otherwise the test proves nothing)
    macro_half = f1_score(targets, scores >= 0.5, average="macro", zero_division=0)
    assert f1_score(targets, pred, average="macro") > macro_half + 0.05


def test_f1_max_threshold_is_midpoint_between_distinct_scores() -> None:
    scores = np.array([0.9, 0.7, 0.7, 0.2, 0.1])[:, None]
    targets = np.array([1, 1, 1, 0, 0])[:, None]
    th = calibrate_thresholds(scores, targets, ["x"], method="f1_max")
    assert th.values == [pytest.approx(0.45)]  # between the lowest positive 0.7 and the highest negative 0.2
    assert th.apply(scores)[:, 0].tolist() == [True, True, True, False, False]


def _ulp_noise(value: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n float32 scores of ``value`` a few float32 steps apart: what a model that scores every image
    alike gives, and what a backend that rounds differently from torch moves."""
    steps = rng.integers(-4, 5, n).astype(np.float32)
    return (np.float32(value) + steps * np.spacing(np.float32(value))).astype(np.float64)


@pytest.mark.parametrize("method", ["f1_max", "precision_at:0.3", "roc_closest"])
def test_a_collapsed_model_keeps_the_fallback_not_a_threshold_inside_float_rounding(method: str) -> None:
    # a collapsed model: each label's scores differ only by float32 rounding (seen: a 3-epoch
    # MobileNetV3-Small, every score 0.48121 +- 3e-8; f1_max put the threshold on the lowest, so the
    # validation set was 100% positive and tagging, scoring 1e-8 lower on some images, 28%)
    rng = np.random.default_rng(0)
    n = 80
    targets = (rng.random((n, 2)) < 0.35).astype(np.uint8)
    scores = np.stack([_ulp_noise(0.48121, n, rng), rng.random(n)], axis=1)
    th = calibrate_thresholds(scores, targets, ["collapsed", "ok"], method=method, fallback=0.5)
    assert th.fallback_labels["collapsed"].startswith("constant scores"), th.fallback_labels
    assert th.values[0] == 0.5
    assert "ok" not in th.fallback_labels


def test_scores_within_float_rounding_of_each_other_are_one_score_to_the_threshold() -> None:
    # two clear positives, then a cluster of 8 images scored alike (+- a few float32 steps) whose
    # positives happen to sit on its upper steps, then clear negatives: a cut inside the cluster would
    # follow the rounding, and tagging (ONNX / ncnn score ~1e-8 away from torch) would not reproduce it
    rng = np.random.default_rng(4)
    cluster = np.sort(_ulp_noise(0.6, 8, rng))[::-1]
    scores = np.r_[0.95, 0.9, cluster, 0.2, 0.15, 0.1][:, None]
    targets = np.r_[1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0][:, None]
    assert np.ptp(cluster) > 0  # the cluster really has several float values (else nothing is tested)
    for method in ("f1_max", "precision_at:0.6"):
        th = calibrate_thresholds(scores, targets, ["x"], method=method)
        t = th.values[0]
        assert not cluster.min() < t <= cluster.max(), (method, t, cluster)
        moved = scores + rng.choice([-1, 1], scores.shape) * 6e-8  # another backend's rounding
        assert np.array_equal(th.apply(moved), th.apply(scores)), method


def test_f1_max_survives_float32_scores_and_json_round_trip(tmp_path) -> None:
    scores, targets = _random_problem(seed=3)
    scores32 = scores.astype(np.float32)
    th = calibrate_thresholds(scores32, targets, LABELS5, method="f1_max")
    path = tmp_path / "thresholds.json"
    th.save(str(path))
    loaded = Thresholds.load(str(path))
    assert np.array_equal(loaded.apply(scores32), th.apply(scores32))


def test_precision_at_reaches_the_target_where_reachable() -> None:
    scores, targets = _random_problem(seed=1, n=600)
    th = calibrate_thresholds(scores, targets, LABELS5, method="precision_at:0.9")
    assert th.method == "precision_at:0.9"
    pred = th.apply(scores)
    checked = 0
    for j, label in enumerate(LABELS5):
        if label in th.fallback_labels:
            assert "unreachable" in th.fallback_labels[label]
            assert th.values[j] == 0.5
            continue
        checked += 1
        assert precision_score(targets[:, j], pred[:, j]) >= 0.9
        # lowest such threshold: the next lower observed score would break the target
        lower = scores[:, j][scores[:, j] < th.values[j]]
        if lower.size:
            assert precision_score(targets[:, j], scores[:, j] >= lower.max()) < 0.9
    assert checked >= 3


def test_precision_at_unreachable_keeps_fallback_and_reports() -> None:
    # the top-scored sample is a negative and positives are 1 in 3 below it: precision never reaches 0.9
    scores = np.array([0.99, 0.8, 0.7, 0.6, 0.5, 0.4])[:, None]
    targets = np.array([0, 1, 0, 0, 1, 0])[:, None]
    th = calibrate_thresholds(scores, targets, ["x"], method="precision_at:0.9", fallback=0.3)
    assert th.values == [0.3]
    assert th.fallback_labels["x"].startswith("precision 0.9 unreachable")


def test_fixed_sets_every_label() -> None:
    scores, targets = _random_problem()
    th = calibrate_thresholds(scores, targets, LABELS5, method="fixed:0.3")
    assert th.values == [0.3] * 5 and th.method == "fixed:0.3"


@pytest.mark.parametrize("method", ["roc_closest", "f1_max", "precision_at:0.9", "fixed:0.4"])
def test_degenerate_labels_keep_fallback(method: str) -> None:
    rng = np.random.default_rng(0)
    n = 50
    targets = np.zeros((n, 4), dtype=np.uint8)
    targets[:, 1] = 1  # all positives
    targets[::2, 2] = 1  # constant scores below
    targets[::3, 3] = 1  # a normal label
    scores = rng.random((n, 4))
    scores[:, 2] = 0.42
    th = calibrate_thresholds(scores, targets, ["none", "all", "flat", "ok"], method=method, fallback=0.6)
    assert len(th.values) == 4 and all(np.isfinite(th.values))
    if method.startswith("fixed"):
        assert th.values == [0.4] * 4
        return
    assert th.fallback_labels["none"] == "no positives"
    assert th.fallback_labels["all"] == "no negatives"
    assert th.fallback_labels["flat"] == "constant scores"
    assert th.values[:3] == [0.6, 0.6, 0.6]
    assert th.support[1] == {"positives": n, "negatives": 0}


def test_method_strings_are_parsed_with_clear_errors() -> None:
    assert parse_method("precision_at:0.95") == ("precision_at", 0.95)
    assert parse_method("fixed:0.5") == ("fixed", 0.5)
    assert parse_method("roc_closest") == ("roc_closest", None)
    with pytest.raises(ValueError, match="unknown calibration method 'f1max'"):
        parse_method("f1max")
    with pytest.raises(ValueError, match="needs a value"):
        parse_method("precision_at")
    with pytest.raises(ValueError, match="not a number"):
        parse_method("fixed:abc")
    with pytest.raises(ValueError, match=r"precision must be in \(0, 1\]"):
        parse_method("precision_at:1.5")
    with pytest.raises(ValueError, match="takes no"):
        parse_method("f1_max:3")


def test_input_shape_and_value_errors() -> None:
    scores, targets = _random_problem(n=20)
    with pytest.raises(ValueError, match="5 columns but 4 labels"):
        calibrate_thresholds(scores, targets, LABELS5[:4])
    bad = scores.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="row 3, label 'l2'"):
        calibrate_thresholds(bad, targets, LABELS5)


def test_json_round_trip_and_stable_sha(tmp_path) -> None:
    scores, targets = _random_problem(seed=7)
    a = calibrate_thresholds(scores, targets, LABELS5, method="f1_max")
    b = calibrate_thresholds(scores.copy(), targets.copy(), LABELS5, method="f1_max")
    assert a.to_json() == b.to_json()  # byte-identical for the same scores
    doc = json.loads(a.to_json())
    assert doc["sha256"] == a.sha256 and len(a.sha256) == 64
    assert list(doc) == sorted(doc)  # canonical key order
    path = tmp_path / "sub" / "thresholds.json"
    path.parent.mkdir()
    a.save(str(path))
    loaded = Thresholds.load(str(path))
    assert loaded == a
    assert loaded.to_json() == path.read_text()
    # different content -> different sha
    c = calibrate_thresholds(scores, targets, LABELS5, method="roc_closest")
    assert c.sha256 != a.sha256
    d = Thresholds(labels=a.labels, values=[*a.values[:-1], a.values[-1] + 1e-9], method=a.method)
    assert d.sha256 != Thresholds(labels=a.labels, values=a.values, method=a.method).sha256


def test_sha256_pinned_for_a_fixed_example() -> None:
    # Pins the canonical form: a change here changes every thresholds_sha256 in tag tables.
    th = Thresholds(
        labels=["cat", "dog"],
        values=[0.25, 0.75],
        method="fixed:0.5",
        support=[{"positives": 1, "negatives": 2}, {"positives": 3, "negatives": 0}],
        fallback_labels={"dog": "no negatives"},
    )
    canonical = (
        '{"fallback_labels":{"dog":"no negatives"},"format_version":1,"labels":["cat","dog"],'
        '"method":"fixed:0.5","support":[{"negatives":2,"positives":1},{"negatives":0,"positives":3}],'
        '"thresholds":[0.25,0.75]}'
    )
    import hashlib

    assert th.sha256 == hashlib.sha256(canonical.encode()).hexdigest()


def test_tampered_file_is_rejected(tmp_path) -> None:
    scores, targets = _random_problem()
    th = calibrate_thresholds(scores, targets, LABELS5)
    path = tmp_path / "thresholds.json"
    th.save(str(path))
    doc = json.loads(path.read_text())
    doc["thresholds"][0] = 0.01
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"thresholds\.json: sha256 mismatch"):
        Thresholds.load(str(path))
    del doc["sha256"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no 'sha256'"):
        Thresholds.load(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Thresholds.load(str(path))


def test_apply_and_constructor_validation() -> None:
    th = Thresholds(labels=["a", "b"], values=[0.5, 0.2], method="fixed")
    out = th.apply(np.array([[0.5, 0.1], [0.4, 0.2]], dtype=np.float32))
    assert out.dtype == bool and out.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="do not match 2 labels"):
        th.apply(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="duplicate labels"):
        Thresholds(labels=["a", "a"], values=[0.5, 0.5], method="fixed")
    with pytest.raises(ValueError, match="3 values for 2 labels"):
        Thresholds(labels=["a", "b"], values=[0.5, 0.5, 0.5], method="fixed")


def test_f1_max_on_demo_data_beats_half_on_held_out_split(demo_data: str) -> None:
    """Real scores, no network training: a logistic regression on 8x8 thumbnails of the demo images.

    Fit on the train split, calibrate f1_max on one half of the validation split, measure macro-F1 on
    the other half: calibrated thresholds must do at least as well there as the 0.5 cut.
    """
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    from mlc_ray import storage
    from mlc_ray.data.manifest import load_manifest, split_train_val

    manifest = load_manifest(demo_data)
    train, val = split_train_val(manifest, val_fraction=0.4, seed=0)

    def features(m) -> np.ndarray:
        out = []
        for uri in m.images:
            img = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB").resize((8, 8))
            out.append(np.asarray(img, dtype=np.float32).ravel() / 255.0)
        return np.stack(out)

    x_train, y_train = features(train), np.asarray(train.multi_hot())
    x_val, y_val = features(val), np.asarray(val.multi_hot())
    scores = np.zeros(y_val.shape, dtype=np.float64)
    for j in range(y_val.shape[1]):
        if y_train[:, j].min() == y_train[:, j].max():
            scores[:, j] = float(y_train[0, j])
            continue
        clf = LogisticRegression(C=0.05, max_iter=500).fit(x_train, y_train[:, j])
        scores[:, j] = clf.predict_proba(x_val)[:, 1]
    fit, held = np.arange(len(val)) % 2 == 0, np.arange(len(val)) % 2 == 1
    th = calibrate_thresholds(scores[fit], y_val[fit], list(val.vocabulary), method="f1_max")
    macro_cal = f1_score(y_val[held], th.apply(scores[held]), average="macro", zero_division=0)
    macro_half = f1_score(y_val[held], scores[held] >= 0.5, average="macro", zero_division=0)
    assert macro_cal >= macro_half, (macro_cal, macro_half)
    assert macro_cal > 0.3  # the scores carry signal: this is not a comparison of two zeros


# ---------------------------------------------------------------------------------------------
# cross-fitting: calibrated figures from rows the thresholds were not fitted on


def test_cross_fit_judges_each_row_by_thresholds_fitted_without_it() -> None:
    from mlc_ray.calibrate import cross_fit_thresholds

    rng = np.random.default_rng(5)
    targets = (rng.random((300, 4)) < 0.3).astype(np.uint8)
    scores = np.clip(targets * 0.3 + rng.random((300, 4)) * 0.7, 0, 1)
    labels = ["a", "b", "c", "d"]
    fit = cross_fit_thresholds(scores, targets, labels, "f1_max", folds=5, seed=1)
    assert fit.folds == 5 and fit.row_thresholds.shape == scores.shape
    assert fit.thresholds.values == calibrate_thresholds(scores, targets, labels, "f1_max").values
    assert sorted(np.bincount(fit.fold_of_row).tolist()) == [60] * 5
    for f in range(5):
        held = fit.fold_of_row == f
        others = calibrate_thresholds(scores[~held], targets[~held], labels, "f1_max")
        np.testing.assert_array_equal(fit.row_thresholds[held], np.tile(others.as_array(), (held.sum(), 1)))


def test_cross_fitted_f1_on_noise_is_not_the_in_sample_optimum() -> None:
    """Scores that carry no signal: thresholds fitted on the same rows report an F1 well above what
    they achieve on rows they were not fitted on; cross-fitting reports the latter."""
    from mlc_ray.calibrate import cross_fit_thresholds
    from mlc_ray.train.metrics import compute_metrics

    rng = np.random.default_rng(0)
    targets = (rng.random((200, 6)) < 0.15).astype(np.uint8)
    scores = rng.random((200, 6))
    labels = [f"l{i}" for i in range(6)]
    fit = cross_fit_thresholds(scores, targets, labels, "f1_max", folds=5, seed=0)
    in_sample = compute_metrics(scores, targets, fit.thresholds.as_array())["macro_f1"]
    crossed = compute_metrics(scores, targets, fit.row_thresholds)["macro_f1"]
    assert crossed < in_sample - 0.02, (crossed, in_sample)


def test_cross_fit_rejects_too_few_rows_or_folds() -> None:
    from mlc_ray.calibrate import cross_fit_thresholds

    with pytest.raises(ValueError, match="folds"):
        cross_fit_thresholds(np.array([[0.2], [0.8]]), np.array([[0], [1]]), ["a"], folds=1)
    fit = cross_fit_thresholds(np.array([[0.2], [0.8], [0.6]]), np.array([[0], [1], [1]]), ["a"], folds=5)
    assert fit.folds == 3

"""Hard-sample selection: each rule picks what it should, caps and replay hold, reasons are recorded."""

from __future__ import annotations

import numpy as np
import pytest

from mlc_ray.calibrate import Thresholds
from mlc_ray.train.mining import HardSampleMiner, MiningConfig, combination_keys

LABELS = ["cat", "dog", "other"]


def _off(**kw) -> MiningConfig:
    """A config with every rule off; tests turn on the one they check."""
    base = dict(
        strategy="top_k",
        top_k=0,
        include_misclassified=False,
        rare_combination_max_frequency=0.0,
        replay_fraction=0.0,
    )
    base.update(kw)
    return MiningConfig(**base)


def _data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = np.zeros((n, 3), dtype=np.uint8)
    kind = rng.choice(3, size=n, p=[0.45, 0.45, 0.10])
    targets[np.arange(n), kind] = 1
    targets[:4, :2] = 1  # 4 rare cat+dog samples
    targets[:4, 2] = 0
    scores = np.clip(targets * 0.7 + rng.normal(0.15, 0.15, targets.shape), 0, 1)
    return scores, targets


def _reasons_of(mined, i: int) -> list[str]:
    pos = np.searchsorted(mined.indices, i)
    return mined.reasons[pos] if pos < len(mined) and mined.indices[pos] == i else []


def test_top_k_picks_lowest_positives_and_highest_negatives() -> None:
    scores, targets = _data()
    mined = HardSampleMiner(_off(top_k=5)).select(scores, targets, 0.5, LABELS)
    for j, label in enumerate(LABELS):
        pos = np.flatnonzero(targets[:, j] == 1)
        neg = np.flatnonzero(targets[:, j] == 0)
        want_pos = set(pos[np.argsort(scores[pos, j], kind="stable")[:5]].tolist())
        want_neg = set(neg[np.argsort(-scores[neg, j], kind="stable")[:5]].tolist())
        got_pos = {
            int(i) for i, r in zip(mined.indices, mined.reasons, strict=True) if f"hard_positive:{label}" in r
        }
        got_neg = {
            int(i) for i, r in zip(mined.indices, mined.reasons, strict=True) if f"hard_negative:{label}" in r
        }
        assert got_pos == want_pos
        assert got_neg == want_neg
    assert np.all(np.diff(mined.indices) > 0)
    assert len(mined.reasons) == len(mined.indices) and all(mined.reasons)


def test_band_strategy_picks_not_confidently_right() -> None:
    scores = np.array([[0.95], [0.6], [0.3], [0.05], [0.5]])
    targets = np.array([[1], [1], [0], [0], [0]])
    mined = HardSampleMiner(_off(strategy="band", band_low=0.2, band_high=0.8)).select(
        scores, targets, 0.5, ["x"]
    )
    assert mined.indices.tolist() == [1, 2, 4]
    assert mined.reasons == [["hard_positive:x"], ["hard_negative:x"], ["hard_negative:x"]]


def test_per_label_cap_keeps_the_hardest() -> None:
    scores, targets = _data(n=300)
    mined = HardSampleMiner(_off(strategy="band", band_low=0.0, band_high=1.0, per_label_cap=7)).select(
        scores, targets, 0.5, LABELS
    )
    for j, label in enumerate(LABELS):
        picked = [
            int(i)
            for i, r in zip(mined.indices, mined.reasons, strict=True)
            if f"hard_positive:{label}" in r or f"hard_negative:{label}" in r
        ]
        assert len(picked) == 7
        miss = np.abs(scores[:, j] - targets[:, j])
        # nothing left out is harder than the easiest one kept
        left_out = np.setdiff1d(np.arange(len(scores)), picked)
        assert miss[left_out].max() <= miss[picked].min()


def test_misclassified_at_current_thresholds() -> None:
    scores = np.array([[0.9, 0.1], [0.4, 0.1], [0.9, 0.35], [0.2, 0.2]])
    targets = np.array([[1, 0], [1, 0], [1, 0], [0, 0]])
    th = Thresholds(labels=["a", "b"], values=[0.5, 0.3], method="fixed")
    mined = HardSampleMiner(_off(include_misclassified=True)).select(scores, targets, th, ["a", "b"])
    assert mined.indices.tolist() == [1, 2]  # a below its threshold; b above its 0.3 threshold
    assert mined.reasons == [["misclassified"], ["misclassified"]]
    # the same call with a scalar threshold of 0.5 no longer flags row 2
    mined = HardSampleMiner(_off(include_misclassified=True)).select(scores, targets, 0.5, ["a", "b"])
    assert mined.indices.tolist() == [1]


def test_rare_combination_fraction_and_count() -> None:
    scores, targets = _data()
    keys = combination_keys(targets, LABELS)
    assert keys[0] == "cat+dog" and combination_keys(np.zeros((1, 3)), LABELS) == ["(none)"]
    mined = HardSampleMiner(_off(rare_combination_max_frequency=0.03)).select(scores, targets, 0.5, LABELS)
    assert mined.indices.tolist() == [0, 1, 2, 3]
    assert all(r == ["rare_combination:cat+dog"] for r in mined.reasons)
    by_count = HardSampleMiner(_off(rare_combination_max_frequency=5)).select(scores, targets, 0.5, LABELS)
    assert by_count.indices.tolist() == [0, 1, 2, 3]  # 4 < 5 members
    none = HardSampleMiner(_off(rare_combination_max_frequency=4)).select(scores, targets, 0.5, LABELS)
    assert len(none) == 0  # "rarer than": 4 members is not rarer than 4


def test_replay_fraction_is_seeded_and_only_takes_easy_samples() -> None:
    scores, targets = _data()
    cfg = _off(rare_combination_max_frequency=0.03, replay_fraction=0.25, seed=3)
    a = HardSampleMiner(cfg).select(scores, targets, 0.5, LABELS)
    b = HardSampleMiner(cfg).select(scores, targets, 0.5, LABELS)
    assert a.indices.tolist() == b.indices.tolist() and a.reasons == b.reasons
    replay = [int(i) for i, r in zip(a.indices, a.reasons, strict=True) if r == ["replay"]]
    assert len(replay) == round(0.25 * (200 - 4))
    assert not set(replay) & {0, 1, 2, 3}
    c = HardSampleMiner(_off(rare_combination_max_frequency=0.03, replay_fraction=0.25, seed=4)).select(
        scores, targets, 0.5, LABELS
    )
    assert c.indices.tolist() != a.indices.tolist()
    assert a.reason_counts() == {"rare_combination": 4, "replay": 49}


def test_all_rules_together_record_every_reason() -> None:
    scores, targets = _data()
    mined = HardSampleMiner(
        MiningConfig(top_k=3, rare_combination_max_frequency=0.03, replay_fraction=0.1)
    ).select(scores, targets, 0.5, LABELS)
    # sample 0 is a rare combination; if it is also a hard example it says so too
    assert "rare_combination:cat+dog" in _reasons_of(mined, 0)
    kinds = mined.reason_counts()
    assert {"rare_combination", "hard_positive", "hard_negative", "replay"} <= set(kinds)
    for r in mined.reasons:
        assert len(r) == len(set(r))
        assert ("replay" in r) == (r == ["replay"])  # replay only for samples no rule picked


def test_shape_and_nan_errors() -> None:
    miner = HardSampleMiner(MiningConfig())
    with pytest.raises(ValueError, match="do not agree"):
        miner.select(np.zeros((3, 2)), np.zeros((3, 3)), 0.5, LABELS)
    bad = np.zeros((3, 3))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        miner.select(bad, np.zeros((3, 3)), 0.5, LABELS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "random"}, "mining.strategy"),
        ({"top_k": -1}, "mining.top_k"),
        ({"band_high": 1.5}, "band_low/band_high"),
        ({"per_label_cap": 0}, "per_label_cap"),
        ({"replay_fraction": 1.2}, "replay_fraction"),
        ({"fine_tune_epochs": 0}, "fine_tune_epochs"),
        ({"fine_tune_lr": 0.0}, "fine_tune_lr"),
        ({"tta": "5crop"}, "mining.tta"),
        ({"rare_combination_max_frequency": -0.1}, "rare_combination_max_frequency"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MiningConfig(**kwargs)


def test_mining_report_tables() -> None:
    from mlc_ray.train.mining_report import mining_report

    targets = np.array([[1, 0], [0, 1], [1, 1], [1, 1], [0, 0], [1, 0]])
    base = np.array([[0.9, 0.1], [0.2, 0.8], [0.9, 0.3], [0.4, 0.9], [0.1, 0.1], [0.7, 0.2]])
    fine = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.7], [0.6, 0.9], [0.1, 0.6], [0.7, 0.2]])
    report = mining_report(["cat", "dog"], targets, base, fine, n_combinations=3)
    assert [r["combination"] for r in report.combination_rows] == ["(none)", "dog", "cat"]  # count 1,1,2
    both = mining_report(["cat", "dog"], targets, base, fine, n_combinations=10).combination("cat+dog")
    assert both == {"combination": "cat+dog", "count": 2, "acc_base": 0.0, "acc_fine_tuned": 1.0}
    rows = {r["label"]: r for r in report.label_rows}
    assert rows["cat"]["f1_base"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))  # TP 3, FN 1
    assert rows["cat"]["f1_fine_tuned"] == 1.0
    assert rows["dog"]["f1_fine_tuned"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))  # TP 3, FP 1
    assert report.max_label_f1_drop() == pytest.approx(0.0)
    # the exact set cat+dog (count 2) is not among the 3 rarest sets, but as a co-occurring pair it is
    assert report.pair_rows == [{"pair": "cat+dog", "count": 2, "acc_base": 0.0, "acc_fine_tuned": 1.0}]
    md = report.to_markdown()
    assert "| (none) | 1 |" in md and "threshold 0.5" in md
    assert "| cat+dog | 2 | 0.0000 | 1.0000 | +1.0000 |" in md
    csv_lines = report.to_csv().splitlines()
    assert csv_lines[0].startswith("kind,name,count") and len(csv_lines) == 1 + 2 + 3 + 1
    assert csv_lines[-1].startswith("pair,cat+dog,2,")


def test_mining_report_with_the_random_subset_control() -> None:
    from mlc_ray.train.mining_report import mining_report

    targets = np.array([[1, 0], [0, 1], [1, 1], [1, 1], [0, 0], [1, 0]])
    base = np.array([[0.9, 0.1], [0.2, 0.8], [0.9, 0.3], [0.4, 0.9], [0.1, 0.1], [0.7, 0.2]])
    fine = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.7], [0.6, 0.9], [0.1, 0.6], [0.7, 0.2]])
    control = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.6, 0.9], [0.1, 0.1], [0.7, 0.2]])
    report = mining_report(
        ["cat", "dog"], targets, base, fine, control_scores=control, n_combinations=10, data_note="Held out. "
    )
    assert report.has_control
    rows = {r["label"]: r for r in report.label_rows}
    assert rows["cat"]["f1_control"] == 1.0
    assert rows["dog"]["f1_control"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))  # TP 2, FN 1
    both = report.combination("cat+dog")
    assert (both["acc_base"], both["acc_fine_tuned"], both["acc_control"]) == (0.0, 1.0, 0.5)
    md = report.to_markdown()
    assert md.startswith("Held out. ") and "F1 random" in md and "mined − random" in md
    assert "| cat+dog | 2 | 0.0000 | 1.0000 | 0.5000 | +0.5000 |" in md
    assert report.to_csv().splitlines()[0].endswith("random_f1_or_acc,base_ap,mined_ap,random_ap")


def test_report_csv_quotes_names_with_commas_and_quotes() -> None:
    import csv
    import io

    from mlc_ray.train.mining_report import mining_report

    labels = ['cat, "big"', "dog"]
    targets = np.array([[1, 0], [0, 1], [1, 1], [1, 1], [0, 0], [1, 0]])
    base = np.array([[0.9, 0.1], [0.2, 0.8], [0.9, 0.3], [0.4, 0.9], [0.1, 0.1], [0.7, 0.2]])
    fine = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.7], [0.6, 0.9], [0.1, 0.6], [0.7, 0.2]])
    for control in (None, fine):
        report = mining_report(labels, targets, base, fine, control_scores=control, n_combinations=10)
        rows = list(csv.reader(io.StringIO(report.to_csv())))
        assert {len(r) for r in rows} == {len(rows[0])}  # every row as wide as the header
        names = {(r[0], r[1]) for r in rows[1:]}
        assert ("label", 'cat, "big"') in names and ("combination", 'cat, "big"+dog') in names
        label_row = next(r for r in rows if r[:2] == ["label", "dog"])
        assert float(label_row[4]) == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))  # fine-tuned dog F1


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_mined_manifest_loads_back_with_its_reasons(tmp_path, suffix: str) -> None:
    import pyarrow.csv as pacsv

    from mlc_ray.data.manifest import Manifest, load_manifest
    from mlc_ray.train.mining import MinedSet, write_mined_manifest

    vocabulary = ['a,"b"', "c"]
    manifest = Manifest(
        images=[str(tmp_path / f"im,{i}.png") for i in range(4)],
        labels=[['a,"b"'], ["c"], ['a,"b"', "c"], []],
        splits=[None] * 4,
        vocabulary=vocabulary,
    )
    mined = MinedSet(indices=np.array([1, 2]), reasons=[["hard_positive:c"], ["misclassified", "replay"]])
    uri = write_mined_manifest(manifest, mined, str(tmp_path / f"mined{suffix}"))
    back = load_manifest(uri)
    assert back.images == manifest.images[1:3]
    assert back.labels == [["c"], ['a,"b"', "c"]]
    assert back.vocabulary == vocabulary
    if suffix == ".csv":
        table = pacsv.read_csv(uri)
        assert table.column("reason").to_pylist() == ["hard_positive:c", "misclassified;replay"]


def test_mining_that_picks_the_whole_split_says_its_control_is_no_control() -> None:
    from mlc_ray.train.mining_pipeline import whole_split_note

    # seen: a 4-epoch base whose scores were constant mined 240 of 240 training images, and the
    # report compared two fine-tunes on the same 240 images as "mined vs random"
    note = whole_split_note(240, 240)
    assert note is not None and "240 of 240" in note and "noise" in note
    assert whole_split_note(239, 240) is None

"""The labelling queue (mlc_ray.select, jobs/select_queue.py) on small tag tables written by the real writer.

No Ray: tables are built with ``tag_rows`` + ``TagTableWriter`` (the tagging pipeline's own schema
and commit), scores chosen so the expected queue can be computed by hand or by brute force.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mlc_ray.calibrate import Thresholds
from mlc_ray.select import SelectConfig, select_queue
from mlc_ray.tagging.table import Provenance, TagTableWriter, tag_rows

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "red"]
THRESHOLDS = Thresholds(labels=LABELS, values=[0.5, 0.3, 0.7], method="fixed")
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def write_run(
    root: Path,
    run_id: str,
    scores: np.ndarray,
    *,
    uris: list[str] | None = None,
    etags: list[str | None] | None = None,
    version: str = "1",
    when: datetime = T0,
    thresholds: Thresholds = THRESHOLDS,
    report: bool = True,
    file_rows: int = 50,
) -> list[str]:
    """One run's rows (predicted = score >= threshold) in files of ``file_rows``; its report.json."""
    n = len(scores)
    uris = uris or [f"s3://photos/{run_id}-{i:04d}.jpg" for i in range(n)]
    etags = etags or [f"etag-{u}" for u in uris]
    prov = Provenance(
        model_name="tagger",
        model_version=version,
        model_alias=None,
        thresholds_sha256=thresholds.sha256,
        backend="onnxruntime",
        precision="fp32",
        run_id=run_id,
    )
    writer = TagTableWriter(str(root), when.strftime("%Y-%m-%d"), run_id)
    t = np.asarray(thresholds.values, dtype=np.float32)[None, :]
    for shard, start in enumerate(range(0, n, file_rows)):
        part = slice(start, start + file_rows)
        s = np.asarray(scores[part], dtype=np.float32)
        table = tag_rows(
            image_uris=uris[part],
            source_etags=etags[part],
            label_names=LABELS,
            scores=s,
            predicted=s >= t,
            ok_rows=np.arange(len(s)),
            widths=[10] * len(s),
            heights=[10] * len(s),
            errors=[None] * len(s),
            provenance=prov,
            tagged_at=when,
        )
        writer.commit(table, shard, f"{shard:012d}")
    if report:
        rdir = root / "_runs" / run_id / "report"
        rdir.mkdir(parents=True, exist_ok=True)
        rows = [{"label": n_, "threshold": v} for n_, v in zip(LABELS, thresholds.values, strict=True)]
        (rdir / "report.json").write_text(json.dumps({"labels": rows}))
    return uris


def confident(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scores far from every threshold (each label either ~0.02 or ~0.98)."""
    return np.where(rng.random((n, len(LABELS))) < 0.3, 0.98, 0.02)


def read_queue(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_label_rule_picks_the_scores_nearest_each_threshold_in_logits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = confident(rng, 120)
    # four planted near-threshold images per label, at known distances
    planted = {}
    for j, t in enumerate(THRESHOLDS.values):
        for k, d in enumerate((0.01, 0.02, 0.03, 0.04)):
            i = 10 * j + k
            scores[i, j] = t + (d if k % 2 else -d)
            planted[i] = LABELS[j]
    uris = write_run(tmp_path / "t", "r1", scores)
    out = tmp_path / "q.csv"
    res = select_queue(
        SelectConfig(
            table=str(tmp_path / "t"), budget=12, out=str(out), mix="uncertainty:1", uncertainty_rule="label"
        )
    )
    rows = read_queue(out)
    assert len(rows) == 12 == len(res.rows)
    assert {r["image"] for r in rows} == {uris[i] for i in planted}
    for r in rows:
        i = uris.index(r["image"])
        assert r["reason"] == "uncertainty" and r["label"] == planted[i]
        assert abs(float(r["score"]) - scores[i, LABELS.index(planted[i])]) < 1e-6
        listed = [lab for lab, s, t in zip(LABELS, scores[i], THRESHOLDS.values, strict=True) if s >= t]
        assert r["labels"] == "|".join(listed)  # pre-filled from the prediction


def at_logit_distance(threshold: float, distance: float) -> float:
    """The score whose logit is ``distance`` above the threshold's (below when negative)."""
    return float(1 / (1 + np.exp(-(np.log(threshold / (1 - threshold)) + distance))))


def test_decision_doubt_is_the_chance_a_thresholded_decision_is_wrong() -> None:
    from mlc_ray.select import decision_doubt

    t = np.array([0.05, 0.5, 0.7])
    on = decision_doubt(t[None, :], t)[1]
    assert np.allclose(on, 0.5)  # on its threshold a decision is a coin flip, whatever the threshold
    # the same logit distance above or below any threshold is the same doubt
    scores = np.array([[at_logit_distance(x, d) for x in t] for d in (1.0, -1.0)])
    distance, p_wrong, log_right = decision_doubt(scores, t)
    assert np.allclose(distance, 1.0) and np.allclose(p_wrong, 1 / (1 + np.e))
    assert np.allclose(1 - np.exp(log_right), 1 - (1 - 1 / (1 + np.e)) ** 3)  # any of 3 decisions wrong
    # the temperature scales the distance: 2 logits at T=2 is 1 logit at T=1
    far = np.array([[at_logit_distance(x, 2.0) for x in t]])
    assert np.allclose(decision_doubt(far, t, 2.0)[1], 1 / (1 + np.e))
    # confident decisions: log_right stays finite and ordered where 1 - p rounds to 1.0
    sure = np.array([[0.999999, 0.000001, 0.99], [0.999999, 0.000001, 0.999999]])
    lr = decision_doubt(sure, t)[2]
    assert np.all(np.isfinite(lr)) and lr[0] < lr[1] < 0


def test_label_set_rule_ranks_several_borderline_labels_above_one(tmp_path: Path) -> None:
    # image A: one label 0.3 logits from its threshold; image B: two labels 0.6 logits away (each
    # farther than A's); image C: one label 0.6 away. Chance the set is wrong (T=1):
    # A 1/(1+e^0.3) = 0.426, B 1 - (1 - 1/(1+e^0.6))^2 = 0.583, C 0.354: B, A, C
    rng = np.random.default_rng(9)
    scores = confident(rng, 60)
    t = THRESHOLDS.values
    a, b, c = 11, 23, 37
    scores[a, 0] = at_logit_distance(t[0], 0.3)
    scores[b, 1] = at_logit_distance(t[1], -0.6)
    scores[b, 2] = at_logit_distance(t[2], 0.6)
    scores[c, 2] = at_logit_distance(t[2], -0.6)
    uris = write_run(tmp_path / "t", "r1", scores)
    out = tmp_path / "q.csv"
    cfg = dict(table=str(tmp_path / "t"), out=str(out), mix="uncertainty:1")
    res = select_queue(SelectConfig(**cfg, budget=3))
    assert [r.image for r in res.rows] == [uris[b], uris[a], uris[c]]
    rows = read_queue(out)
    for row, i in zip(rows, (b, a), strict=False):  # the chance the set is wrong: any of 3 decisions
        logit = np.log(scores[i] / (1 - scores[i])) - np.log(np.array(t) / (1 - np.array(t)))
        assert abs(float(row["score"]) - (1 - np.prod(1 - 1 / (1 + np.exp(np.abs(logit)))))) < 1e-5
    assert rows[0]["reason"] == "uncertainty" and rows[0]["label"] in ("dog", "red")
    assert rows[1]["label"] == "cat" and rows[2]["label"] == "red"
    listed = [lab for lab, s_, t_ in zip(LABELS, scores[b], t, strict=True) if s_ >= t_]
    assert rows[0]["labels"] == "|".join(listed)  # pre-filled from the prediction
    # the per-label rule takes A first (nearest one threshold); a small temperature makes the set
    # rule lean the same way (one very close label outweighs two fairly close ones)
    old = select_queue(SelectConfig(**cfg, budget=1, uncertainty_rule="label"))
    assert [r.image for r in old.rows] == [uris[a]]
    cold = select_queue(SelectConfig(**cfg, budget=1, uncertainty_temperature=0.1))
    assert [r.image for r in cold.rows] == [uris[a]]


def test_label_set_rule_counts_an_image_under_a_doubtful_label_with_room(tmp_path: Path) -> None:
    # 12 images borderline on "cat" only and 12 borderline on "cat" (nearer) and "dog": with a quota
    # of 4 the "cat"+"dog" images fill "cat", then count under "dog"; "cat"-only ones stop at the quota
    scores = np.full(
        (100, 3), 0.02
    )  # the same doubt elsewhere: the order is the planted one  # the same doubt elsewhere: the order is the planted one
    both, cat_only = range(0, 12), range(50, 62)
    for k, i in enumerate(both):
        scores[i, 0] = at_logit_distance(0.5, 0.05 + 0.01 * k)
        scores[i, 1] = at_logit_distance(0.3, -(0.2 + 0.01 * k))
    for k, i in enumerate(cat_only):
        scores[i, 0] = at_logit_distance(0.5, -(0.1 + 0.01 * k))
    uris = write_run(tmp_path / "t", "r1", scores)
    res = select_queue(
        SelectConfig(
            table=str(tmp_path / "t"),
            budget=10,
            out=str(tmp_path / "q.csv"),
            mix="uncertainty:1",
            label_quota=4,
        )
    )
    by_label = {lab: [r.image for r in res.rows if r.label == lab] for lab in LABELS}
    assert len(by_label["cat"]) == 4 and len(by_label["dog"]) == 4, by_label
    assert set(by_label["cat"] + by_label["dog"]) == {uris[i] for i in both[:8]}
    assert len(res.rows) == 8  # "red" is doubtful on none of the rest: no image may count under it


def test_queue_is_a_manifest_train_accepts(tmp_path: Path) -> None:
    from mlc_ray.data.manifest import load_manifest

    rng = np.random.default_rng(1)
    scores = rng.random((80, 3))
    write_run(tmp_path / "t", "r1", scores)
    out = tmp_path / "queue" / "queue.csv"
    select_queue(SelectConfig(table=str(tmp_path / "t"), budget=20, out=str(out)))
    manifest = load_manifest(str(out))
    assert len(manifest) == 20
    assert manifest.vocabulary == LABELS  # labels.txt beside the queue: the model's order
    assert (out.parent / "labels.txt").read_text().split() == LABELS
    assert manifest.multi_hot().shape == (20, 3)


def test_latest_row_per_image_and_one_row_per_source_etag(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 60
    uris = [f"s3://photos/{i:03d}.jpg" for i in range(n)]
    old = confident(rng, n)
    old[0, 0] = 0.5  # uncertain in the old run only: its newer row is confident, so never picked
    new = confident(rng, n)
    new[0, 0] = 0.98
    new[1, 0] = 0.501  # the newest row of image 1 is the most uncertain of all
    # image 2 is image 1's bytes under another URI (same ETag): the queue holds one of them
    etags = [f"e{i}" for i in range(n)]
    etags[2] = "e1"
    new[2] = new[1]
    write_run(tmp_path / "t", "old", old, uris=uris, etags=etags, when=T0)
    write_run(tmp_path / "t", "new", new, uris=uris, etags=etags, when=T0 + timedelta(days=1))
    out = tmp_path / "q.csv"
    top = select_queue(SelectConfig(table=str(tmp_path / "t"), budget=1, out=str(out), mix="uncertainty:1"))
    assert top.rows[0].image in (uris[1], uris[2]) and top.rows[0].run_id == "new"  # not image 0's old 0.5
    res = select_queue(SelectConfig(table=str(tmp_path / "t"), budget=5, out=str(out), mix="uncertainty:1"))
    rows = read_queue(out)
    images = [r["image"] for r in rows]
    assert len({r["source_etag"] for r in rows}) == len(rows) == 5
    assert sum(u in images for u in (uris[1], uris[2])) == 1
    assert all(r["run_id"] == "new" for r in rows)
    assert res.images == n - 1 and res.rows_scanned == 2 * n
    # one run only: the old run's uncertain image is back
    out_old = tmp_path / "q_old.csv"
    select_queue(
        SelectConfig(table=str(tmp_path / "t"), budget=5, out=str(out_old), mix="uncertainty:1", run="old")
    )
    assert uris[0] in [r["image"] for r in read_queue(out_old)]


def test_a_common_label_cannot_take_the_whole_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    scores = confident(rng, 200)
    scores[:100, 0] = 0.5 + rng.uniform(-0.005, 0.005, 100)  # 100 images on the edge for "cat"
    scores[100:110, 1] = 0.3 + rng.uniform(-0.05, 0.05, 10)  # fewer and less uncertain for the others
    scores[110:120, 2] = 0.7 + rng.uniform(-0.05, 0.05, 10)
    write_run(tmp_path / "t", "r1", scores)
    out = tmp_path / "q.csv"
    res = select_queue(SelectConfig(table=str(tmp_path / "t"), budget=15, out=str(out), mix="uncertainty:1"))
    assert res.label_quota == 10  # 2 x 15 / 3 labels
    counts = {lab: sum(r.label == lab for r in res.rows) for lab in LABELS}
    assert counts["cat"] <= 10 and counts["dog"] >= 2 and counts["red"] >= 2, counts
    assert len(res.rows) == 15
    res2 = select_queue(
        SelectConfig(table=str(tmp_path / "t"), budget=15, out=str(out), mix="uncertainty:1", label_quota=3)
    )
    counts2 = {lab: sum(r.label == lab for r in res2.rows) for lab in LABELS}
    assert max(counts2.values()) <= 3 and len(res2.rows) == 9, counts2
    # the quota holds across reasons: "cat" also flips between two versions on 20 images
    flipped = scores.copy()
    flipped[120:140, 0] = 1 - flipped[120:140, 0]
    uris = [f"s3://photos/r1-{i:04d}.jpg" for i in range(200)]
    write_run(tmp_path / "t", "r2", flipped, uris=uris, version="2", when=T0 + timedelta(days=1))
    res3 = select_queue(
        SelectConfig(
            table=str(tmp_path / "t"),
            budget=15,
            out=str(out),
            version="2",
            compare_version="1",
            mix="uncertainty:0.5,disagreement:0.5",
            label_quota=3,
        )
    )
    assert sum(r.label == "cat" for r in res3.rows) == 3, [(r.reason, r.label) for r in res3.rows]


def test_disagreement_between_two_runs_comes_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n = 100
    uris = [f"s3://photos/{i:03d}.jpg" for i in range(n)]
    a = confident(rng, n)
    b = a.copy()
    flipped = [5, 17, 42]
    for i in flipped:
        b[i, 1] = 0.98 if a[i, 1] < 0.5 else 0.02  # "dog" flips between the two versions
    b[60, 2] = np.clip(a[60, 2] + 0.1, 0, 1)  # a small score change, no flip: after the flips
    write_run(tmp_path / "t", "v1run", a, uris=uris, version="1")
    write_run(tmp_path / "t", "v2run", b, uris=uris, version="2", when=T0 + timedelta(days=1))
    out = tmp_path / "q.csv"
    res = select_queue(
        SelectConfig(
            table=str(tmp_path / "t"),
            budget=4,
            out=str(out),
            version="2",
            compare_version="1",
            mix="disagreement:1",
        )
    )
    rows = read_queue(out)
    assert [r["image"] for r in rows[:3]] and {r["image"] for r in rows[:3]} == {uris[i] for i in flipped}
    assert all(r["reason"] == "disagreement" and r["label"] == "dog" for r in rows[:3])
    assert rows[3]["image"] == uris[60] and rows[3]["label"] == "red"
    assert res.compared == n
    # without a second source there is no disagreement share: the mix falls back to the others
    res_none = select_queue(SelectConfig(table=str(tmp_path / "t"), budget=4, out=str(out), version="2"))
    assert "disagreement" not in res_none.by_reason


def test_rare_combinations_are_picked_rarest_first(tmp_path: Path) -> None:
    n = 200
    scores = np.full((n, 3), 0.02)
    scores[:150, 0] = 0.98  # "cat" alone: common
    scores[150:195, 1] = 0.98  # "dog" alone: common
    scores[195:198, [0, 2]] = 0.98  # cat|red: 3 images
    scores[198:200, [0, 1, 2]] = 0.98  # cat|dog|red: 2 images (rarest)
    uris = write_run(tmp_path / "t", "r1", scores)
    out = tmp_path / "q.csv"
    res = select_queue(
        SelectConfig(table=str(tmp_path / "t"), budget=5, out=str(out), mix="rare_combination:1")
    )
    assert {r.image for r in res.rows} == set(uris[195:200])
    assert res.rare_combinations == 2  # at most 2% of 200 images: 4
    by_combo = {r.label for r in res.rows}
    assert by_combo == {"cat|red", "cat|dog|red"}


def test_rare_combination_takes_its_most_doubtful_images_first(tmp_path: Path) -> None:
    n = 200
    scores = np.full((n, 3), 0.02)
    scores[:150, 0] = 0.98
    scores[150:196, 1] = 0.98
    scores[196:200, [0, 2]] = 0.98  # cat|red: 4 images (2% of 200: rare)
    scores[198, 1] = at_logit_distance(0.3, -0.2)  # one of them nearly lists "dog" too
    uris = write_run(tmp_path / "t", "r1", scores)
    cfg = dict(table=str(tmp_path / "t"), budget=1, out=str(tmp_path / "q.csv"), mix="rare_combination:1")
    for seed in (0, 1, 2):
        res = select_queue(SelectConfig(**cfg, seed=seed))
        assert [(r.image, r.reason, r.label) for r in res.rows] == [
            (uris[198], "rare_combination", "cat|red")
        ]
        assert abs(res.rows[0].score - 4 / n) < 1e-9  # the combination's share of images


def test_streaming_batches_give_the_same_queue(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    write_run(tmp_path / "t", "r1", rng.random((300, 3)), file_rows=37)
    write_run(tmp_path / "t", "r2", rng.random((300, 3)), file_rows=41, when=T0 + timedelta(hours=1))
    cfg = dict(table=str(tmp_path / "t"), budget=40, mix="uncertainty:0.5,rare_combination:0.3,random:0.2")
    big = select_queue(SelectConfig(**cfg, out=str(tmp_path / "a.csv")))
    small = select_queue(SelectConfig(**cfg, out=str(tmp_path / "b.csv"), batch_size=7))
    assert [(r.image, r.reason) for r in big.rows] == [(r.image, r.reason) for r in small.rows]
    assert big.by_reason["random"] == 8


def test_random_share_is_deterministic_per_seed(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    write_run(tmp_path / "t", "r1", rng.random((200, 3)))
    pick = {
        seed: [
            r.image
            for r in select_queue(
                SelectConfig(
                    table=str(tmp_path / "t"),
                    budget=10,
                    out=str(tmp_path / "q.csv"),
                    mix="random:1",
                    seed=seed,
                )
            ).rows
        ]
        for seed in (0, 0, 1)
    }
    again = [
        r.image
        for r in select_queue(
            SelectConfig(
                table=str(tmp_path / "t"), budget=10, out=str(tmp_path / "q.csv"), mix="random:1", seed=0
            )
        ).rows
    ]
    assert pick[0] == again and pick[0] != pick[1]


def test_thresholds_come_from_the_flag_when_no_report(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the registry fallback opens the default MLflow store here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    scores = np.full((50, 3), 0.02)
    scores[7, 1] = 0.31
    write_run(tmp_path / "t", "r1", scores, report=False)
    with pytest.raises(Exception, match="--thresholds"):
        select_queue(SelectConfig(table=str(tmp_path / "t"), budget=1, out=str(tmp_path / "q.csv")))
    THRESHOLDS.save(str(tmp_path / "thresholds.json"))
    res = select_queue(
        SelectConfig(
            table=str(tmp_path / "t"),
            budget=1,
            out=str(tmp_path / "q.csv"),
            mix="uncertainty:1",
            thresholds=str(tmp_path / "thresholds.json"),
        )
    )
    assert res.rows[0].image.endswith("r1-0007.jpg") and res.rows[0].label == "dog"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--table", "{tmp}/nothing"], "does not exist"),
        (["--table", "{tmp}/t", "--budget", "0"], "budget: expected an integer >= 1"),
        (["--table", "{tmp}/t", "--mix", "vibes:1"], "mix: expected REASON:SHARE"),
        (["--table", "{tmp}/t", "--out", "{tmp}/q.txt"], "out: the queue is a manifest file"),
        (["--table", "{tmp}/t", "--rare-fraction", "2"], "rare_fraction"),
        (["--table", "{tmp}/t", "--uncertainty-rule", "vibes"], "uncertainty_rule: expected one of"),
        (["--table", "{tmp}/t", "--uncertainty-temperature", "0"], "uncertainty_temperature: expected"),
        (["--budget", "3"], "table: give the tag table"),
    ],
)
def test_job_errors_are_one_line(tmp_path: Path, argv: list[str], message: str, capsys) -> None:
    import importlib.util

    write_run(tmp_path / "t", "r1", np.full((5, 3), 0.5))
    spec = importlib.util.spec_from_file_location("select_job", REPO / "jobs" / "select_queue.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    code = job.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_no_job_script_shadows_a_standard_module() -> None:
    """`python jobs/X.py` puts jobs/ first on sys.path: a jobs/select.py would replace the standard
    `select` module that subprocess (and Ray, torch) import, and break every job."""
    names = {p.stem for p in (REPO / "jobs").glob("*.py")}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


def test_job_runs_as_a_script(tmp_path: Path) -> None:
    write_run(tmp_path / "t", "r1", np.random.default_rng(7).random((30, 3)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "select_queue.py"), "--table", str(tmp_path / "t"), "--budget", "4",
         "--out", str(tmp_path / "q.csv")],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "queue" in proc.stdout and len(read_queue(tmp_path / "q.csv")) == 4


def test_out_may_name_the_date(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    write_run(tmp_path / "t", "r1", np.random.default_rng(8).random((20, 3)))
    res = select_queue(SelectConfig(table=str(tmp_path / "t"), budget=3, out=str(tmp_path / "q-{date}.csv")))
    expected = tmp_path / f"q-{datetime.now(UTC):%Y-%m-%d}.csv"
    assert res.out == str(expected) and len(read_queue(expected)) == 3


def test_image_keys_hash_equal_strings_equally_and_distinct_ones_apart() -> None:
    import pyarrow as pa

    from mlc_ray.select import key_hash

    uris = pa.array([f"s3://photos/{i:07d}.jpg" for i in range(200_000)])
    etags = pa.array([None if i % 3 else f"{i:032x}" for i in range(200_000)])
    keys = key_hash(etags, uris)
    assert len(np.unique(keys)) == 200_000
    assert np.array_equal(key_hash(etags.slice(17), uris.slice(17)), keys[17:])  # Arrow offsets
    again = key_hash(pa.array(["", None, "e", "e"]), pa.array(["a", "b", "c", "d"]))
    assert again[2] == again[3] and again[0] != again[1]  # no ETag: the URI decides


def test_the_budget_fills_when_every_label_ranks_the_same_images_first(tmp_path: Path) -> None:
    # an untrained model: near-identical scores and one threshold, so every label's nearest images
    # are the same ones (a pool per label capped at the quota, 7 here, leaves the queue at 7)
    scores = np.full((41, 3), 0.45) + np.linspace(0, 0.01, 41)[:, None]
    same = Thresholds(labels=LABELS, values=[0.5, 0.5, 0.5], method="fixed")
    write_run(tmp_path / "t", "r1", scores, thresholds=same)
    res = select_queue(SelectConfig(table=str(tmp_path / "t"), budget=10, out=str(tmp_path / "q.csv")))
    assert len(res.rows) == 10 == len({r.image for r in res.rows})

"""Tag-time options, the report's in-pipeline selections and counts, the drift test, progress lines."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest

from mlc_ray.cli import UserError
from mlc_ray.config import ConfigError
from mlc_ray.progress import ProgressLine, format_eta
from mlc_ray.tagging.config import TagConfig
from mlc_ray.tagging.options import TagOptions
from mlc_ray.tagging.report import (
    SAMPLE_KINDS,
    SampleSet,
    ThumbnailSampler,
    drift_rows,
    expected_label_rates,
    sample_keys,
    shard_label_stats,
    uri_hash01,
)
from mlc_ray.tagging.state import default_run_id, row_affecting_settings
from mlc_ray.tagging.summary import TagSummary
from mlc_ray.tagging.table import Provenance, tag_rows

LABELS = ["cat", "dog", "car", "tree"]
THR = np.array([0.5, 0.4, 0.6, 0.5])


def test_options_select_min_score_top_k_and_subsets() -> None:
    scores = np.array([[0.9, 0.45, 0.7, 0.55], [0.3, 0.2, 0.1, 0.0]])
    allowed = np.ones(4, dtype=bool)
    plain = TagOptions().select(scores, THR, allowed)
    assert plain.tolist() == [[True, True, True, True], [False, False, False, False]]
    # min-score: a label needs max(threshold, S)
    assert TagOptions(min_score=0.6).select(scores, THR, allowed)[0].tolist() == [True, False, True, False]
    # top-k: highest scores first
    assert TagOptions(top_k=2).select(scores, THR, allowed)[0].tolist() == [True, False, True, False]
    opts = TagOptions(labels="cat,dog,tree", exclude_labels=["tree"])
    mask = opts.allowed_mask(LABELS)
    assert mask.tolist() == [True, True, False, False]
    assert opts.select(scores, THR, mask)[0].tolist() == [True, True, False, False]
    # top-k counts only listable labels: the excluded 'car' (0.7) does not take a slot
    both = TagOptions(top_k=1, exclude_labels="cat")
    assert both.select(scores, THR, both.allowed_mask(LABELS))[0].tolist() == [False, False, True, False]


def test_options_validation_and_unknown_labels() -> None:
    with pytest.raises(ConfigError, match="min_score"):
        TagOptions(min_score=1.5)
    with pytest.raises(ConfigError, match="top_k"):
        TagConfig(top_k=0)
    with pytest.raises(UserError, match=r"--labels: 'kat', 'dgo' not in the model's labels"):
        TagOptions(labels="cat,kat,dgo").check(LABELS)
    with pytest.raises(UserError, match="--exclude-labels: 'bus'"):
        TagOptions(exclude_labels="bus").check(LABELS)
    with pytest.raises(UserError, match="leave no label"):
        TagOptions(labels="cat", exclude_labels="cat").check(LABELS)
    TagOptions(labels="cat , dog").check(LABELS)  # spaces around names are fine


def test_options_are_part_of_the_run_identity_and_the_rows() -> None:
    def run_id(options: TagOptions | None = None) -> str:
        settings = row_affecting_settings(
            model_pinned="models:/m/3", thresholds_sha256="t", backend="onnxruntime", precision="fp32",
            preprocess={"image_size": 96}, input_uri="s3://b/in", output_uri="s3://b/out",
            tag_options=None if options is None else options.to_dict(),
        )  # fmt: skip
        return default_run_id(settings)

    base = run_id()
    assert base == run_id(TagOptions())  # no option given: the same run as before options existed
    a, b = run_id(TagOptions(top_k=3)), run_id(TagOptions(top_k=2))
    assert len({base, a, b}) == 3
    opts = TagOptions(min_score=0.3, labels="dog,cat")
    assert json.loads(opts.to_json()) == {"min_score": 0.3, "labels": ["dog", "cat"]}
    assert TagOptions.from_dict(json.loads(opts.to_json())) == opts
    prov = Provenance(
        model_name="m", model_version="3", model_alias=None, thresholds_sha256="x", backend="onnxruntime",
        precision="fp32", run_id="r1", tag_options=opts.to_json(),
    )  # fmt: skip
    table = _rows(np.array([[0.9, 0.1, 0.7, 0.2]]), prov=prov)
    assert table.column("tag_options").to_pylist() == [opts.to_json()]


def _rows(scores: np.ndarray, *, uris=None, prov=None, errors=None, options=TagOptions()) -> pa.Table:
    n = len(scores) + (len(errors) if errors else 0)
    uris = uris or [f"s3://b/{i}.jpg" for i in range(n)]
    prov = prov or Provenance(
        model_name="m", model_version="1", model_alias=None, thresholds_sha256="x", backend="onnxruntime",
        precision="fp32", run_id="r",
    )  # fmt: skip
    ok = list(range(len(scores)))
    return tag_rows(
        image_uris=uris,
        source_etags=[None] * n,
        label_names=LABELS,
        scores=scores,
        predicted=options.select(scores, THR, options.allowed_mask(LABELS)),
        ok_rows=ok,
        widths=[10] * n,
        heights=[10] * n,
        errors=[None] * len(scores) + list(errors or []),
        provenance=prov,
    )


def test_shard_stats_count_threshold_hits_listed_labels_and_buckets() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (200, 4)).astype(np.float32)
    opts = TagOptions(top_k=1)
    table = _rows(scores, errors=["undecodable: x", "unreadable: y"], options=opts)
    stats = shard_label_stats(table, LABELS, THR)
    assert stats["ok"] == 200
    s32 = scores.astype(np.float64)
    assert stats["above"] == (s32 >= THR).sum(axis=0).tolist()
    assert sum(stats["listed"]) == int(((s32 >= THR).any(axis=1)).sum())  # top-1: one label per hit row
    hist = np.asarray(stats["hist"])
    assert hist.shape == (4, 20) and hist.sum(axis=1).tolist() == [200] * 4
    assert hist[0, 0] == int((s32[:, 0] < 0.05).sum())


def test_actor_selection_is_a_superset_of_the_global_one() -> None:
    """Two actors each see half the images; the driver merges what they thumbnailed; the result must
    equal the exact selection over all images (top, nearest above/below, hash sample)."""
    rng = np.random.default_rng(1)
    n = 300
    scores = rng.uniform(0, 1, (n, 4))
    uris = [f"s3://b/img-{i}.jpg" for i in range(n)]
    pixels = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    thumbs: list[bytes | None] = [None] * n
    actors = [ThumbnailSampler(THR, k=5), ThumbnailSampler(THR, k=5)]
    for start in range(0, n, 20):  # batches of 20, alternating actors
        sl = slice(start, start + 20)
        made = actors[(start // 20) % 2].thumbnails(pixels[sl], scores[sl], uris[sl])
        thumbs[sl] = made
    assert sum(t is not None for t in thumbs) < n  # not every image got a thumbnail
    merged = SampleSet(LABELS, THR, k=5)
    table = _rows(scores.astype(np.float32), uris=uris).append_column("_thumb", pa.array(thumbs, pa.binary()))
    for start in range(0, n, 50):  # committed shard by shard
        merged.offer(table.slice(start, 50), start // 50)
    keys = sample_keys(scores.astype(np.float32).astype(np.float64), THR, uri_hash01(uris))
    for j in range(len(LABELS)):
        for k, kind in enumerate(SAMPLE_KINDS):
            col = keys[:, j, k]
            finite = np.flatnonzero(np.isfinite(col))
            want = sorted(finite, key=lambda i: (col[i], uris[i]))[:5]
            assert [s.uri for s in merged.get(j, kind)] == [uris[i] for i in want], (LABELS[j], kind)
    # the merged set survives a save/load (a resumed run keeps its samples)
    again = SampleSet(LABELS, THR, k=5)
    again.load_bytes(merged.to_bytes())
    assert again.shards == {0, 1, 2, 3, 4, 5}
    assert [s.uri for s in again.get(2, "below")] == [s.uri for s in merged.get(2, "below")]


def test_drift_flags_a_label_whose_rate_moved() -> None:
    rng = np.random.default_rng(2)
    val = rng.uniform(0, 1, (400, 4))
    exp = expected_label_rates(val, THR, LABELS)
    assert exp["images"] == 400 and exp["positives"] == (val >= THR).sum(axis=0).tolist()
    same = (rng.uniform(0, 1, (2000, 4)) >= THR).sum(axis=0)
    rows = drift_rows(LABELS, same, 2000, exp, alert=2.0)
    assert [r.status for r in rows] == ["ok"] * 4 and not any(r.alert for r in rows)
    moved = same.copy()
    moved[1] = 20  # 'dog' went from ~60 % to 1 %
    rows = drift_rows(LABELS, moved, 2000, exp, alert=2.0)
    dog = rows[1]
    assert dog.status == "moved" and dog.alert and dog.ratio < 0.05 and dog.p_value < 1e-6
    assert [r.label for r in rows if r.alert] == ["dog"]
    # a significant move inside the band is listed as moved, without an alert
    mild = same.copy()
    mild[0] = int(same[0] * 0.7)
    rows = drift_rows(LABELS, mild, 2000, exp, alert=2.0)
    assert rows[0].status == "moved" and not rows[0].alert
    # too few images to tell: never an alert
    tiny = drift_rows(LABELS, [0, 0, 0, 0], 5, exp, alert=2.0)
    assert {r.status for r in tiny} == {"too few"} and not any(r.alert for r in tiny)
    # no expectation (an older bundle): not available; labels outside --labels are left out
    na = drift_rows(LABELS, moved, 2000, None, allowed=[True, False, True, True], alert=2.0)
    assert [r.label for r in na] == ["cat", "car", "tree"] and {r.status for r in na} == {"not available"}


def test_summary_table_heads_the_moved_labels_with_a_drift_row() -> None:
    rng = np.random.default_rng(2)
    exp = expected_label_rates(rng.uniform(0, 1, (400, 4)), THR, LABELS)
    moved = (rng.uniform(0, 1, (2000, 4)) >= THR).sum(axis=0)
    moved[1] = 20
    rows = [asdict(r) for r in drift_rows(LABELS, moved, 2000, exp, alert=2.0) if r.status != "ok"]
    summary = TagSummary("r1", "out", "2026-12-06", "models:/m/1", "1", "onnxruntime", "fp32",
                         timings_s={"Ray start": 4.4}, drift_available=True, drift=rows)  # fmt: skip
    lines = summary.format().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  dog "))
    # the moved label sits under a "drift" row, not under the row before it (it was under "time")
    assert lines[at - 1].startswith("drift ") and "1 label(s) moved" in lines[at - 1], lines
    assert "ALERT" in lines[at] and lines[at - 2].startswith("time ")
    # nothing moved: one row that says so
    calm = TagSummary(
        "r1", "out", "2026-12-06", "models:/m/1", "1", "onnxruntime", "fp32", drift_available=True
    )
    assert [line.split(None, 1) for line in calm.format().splitlines() if line.startswith("drift")] == [
        ["drift", "no label moved"]
    ]


def test_progress_line_every_n_seconds(caplog, monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("mlc_ray.progress.time.monotonic", lambda: clock[0])
    progress = ProgressLine("tagging", 1000, every_s=30)
    caplog.set_level(logging.INFO, logger="mlc_ray.progress")
    progress.update(100, 2)
    clock[0] += 10
    progress.update(100)
    assert progress.lines == 0
    clock[0] += 30
    progress.update(200, 1)  # 400 done in 40 s
    assert progress.lines == 1
    assert "tagging: 400/1000 images (40%), 10.0 images/s, ETA 1m00s, 3 errors" in caplog.text
    assert format_eta(7300) == "2h01m" and format_eta(None) == "?" and format_eta(5) == "5s"


def test_histogram_panels_draw_the_scores_and_the_threshold() -> None:
    """The PNG shows each label's histogram where its scores are and the threshold where it is."""
    import io

    from PIL import Image

    from mlc_ray.tagging.report_render import _histograms_png
    from mlc_ray.tagging.report_stats import HIST_BINS

    hist = np.zeros((2, HIST_BINS), dtype=np.int64)
    hist[0, 0] = 90  # label a: every score in the lowest bin
    hist[1, -1] = 90  # label b: every score in the highest bin
    img = np.asarray(
        Image.open(io.BytesIO(_histograms_png(["a", "b"], hist, [0.25, 0.75], None))).convert("RGB")
    )
    blue = (img[..., 2] > 150) & (img[..., 0] < 120)  # the bars' colour
    panel_w = img.shape[1] // 2
    cols_a = np.flatnonzero(blue[:, :panel_w].any(axis=0))
    cols_b = np.flatnonzero(blue[:, panel_w:].any(axis=0))
    assert cols_a.size and cols_b.size
    assert cols_a.max() < panel_w * 0.3  # a's bar on the left of its panel
    assert cols_b.min() > panel_w * 0.7  # b's bar on the right of its panel
    # the dashed threshold line: dark pixels in a column at 25 % of a's plot, not at 75 %
    dark = img.sum(axis=2) < 100
    plot = slice(40, img.shape[0] - 30)

    def dark_rows(x: int) -> int:
        return int(dark[plot, x - 1 : x + 2].any(axis=1).sum())

    left, right = 28, panel_w - 8
    assert dark_rows(int(left + 0.25 * (right - left))) > 10
    assert dark_rows(int(left + 0.75 * (right - left))) < 5


def test_mlflow_connection_error_is_a_warning_not_a_failed_run(tmp_path, caplog, monkeypatch) -> None:
    """The report's MLflow connection runs in the background; its failure reaches the caller as a
    warning and no run id, never as an exception of the finished tagging run."""
    from mlflow.exceptions import MlflowException  # before the connection's thread imports mlflow

    from mlc_ray.tagging.report_render import MlflowConnection, log_report_to_mlflow

    (tmp_path / "report").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus-scheme://nowhere")
    conn = MlflowConnection()
    with pytest.raises(MlflowException):
        conn.get()
    doc = {"summary": {"run_id": "r1"}, "labels": [], "errors_by_code": {}, "drift_alerts": []}
    with caplog.at_level(logging.WARNING):
        got = log_report_to_mlflow(
            str(tmp_path / "report"),
            doc,
            model_name="m",
            model_version="1",
            model_alias=None,
            connection=conn,
        )
    assert got is None
    assert "not logged to MLflow" in caplog.text

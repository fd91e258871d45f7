"""The shadow comparison's parts that need no Ray or MLflow: the sample, the figures, the hold rule."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from mlc_ray.shadow import ShadowConfig, ShadowLabel, ShadowReport, cohen_kappa, sample_input

pytestmark = pytest.mark.timeout(60)


def _images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = root / f"sub{i % 3}" / f"{i:04d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not decoded here")
        out.append(str(path))
    return out


def test_sample_is_deterministic_for_a_seed_and_independent_of_listing_order(tmp_path: Path) -> None:
    uris = _images(tmp_path / "in", 300)
    a, listed = sample_input(str(tmp_path / "in"), 40, seed=7)
    b, _ = sample_input(str(tmp_path / "in"), 40, seed=7)
    assert listed == 300 and len(a) == 40 and len(set(a)) == 40 and set(a) <= set(uris)
    assert a == b
    # the same keys in another order (a shuffled manifest): the same sample
    shuffled = list(uris)
    random.Random(0).shuffle(shuffled)
    manifest = tmp_path / "shuffled.csv"
    manifest.write_text("image,labels\n" + "".join(f"{u},\n" for u in shuffled))
    c, _ = sample_input(str(manifest), 40, seed=7)
    assert c == a
    other, _ = sample_input(str(tmp_path / "in"), 40, seed=8)
    assert set(other) != set(a)
    # a bigger sample of the same seed contains the smaller one (bottom-k of one hash order)
    bigger, _ = sample_input(str(tmp_path / "in"), 80, seed=7)
    assert set(a) <= set(bigger)
    everything, _ = sample_input(str(tmp_path / "in"), 1000, seed=7)
    assert sorted(everything) == sorted(uris)


def test_sample_of_a_missing_prefix_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sample_input(str(tmp_path / "nothing"), 5)


def test_cohen_kappa_matches_scikit_learn() -> None:
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.random(50) < rng.random()
        b = np.where(rng.random(50) < 0.8, a, ~a)
        if a.all() == b.all() and (a == b).all() and (a.all() or not a.any()):
            continue
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    same = np.zeros(10, dtype=bool)
    assert cohen_kappa(same, same) is None  # both constant and equal: undefined


def _label(champion: int, candidate: int, images: int = 500) -> ShadowLabel:
    return ShadowLabel("x", champion, candidate, images, None, None, judged=False, held=False)


def test_relative_change_and_its_edges() -> None:
    assert _label(100, 50).change == pytest.approx(-0.5)
    assert _label(40, 60).change == pytest.approx(0.5)
    assert math.isinf(_label(0, 3).change)
    assert _label(0, 0).change == 0.0
    assert _label(100, 0).to_dict()["change"] == -1.0 and _label(0, 5).to_dict()["change"] is None


def test_report_lines_and_tags_name_the_held_label() -> None:
    report = ShadowReport(
        input="s3://b/in/",
        sample=500,
        seed=0,
        listed=9000,
        images=498,
        errors=2,
        champion="models:/m/1",
        candidate="models:/m/2",
        max_rate_change=0.5,
        min_count=10,
        labels=[
            ShadowLabel("cat", 100, 98, 498, 0.97, 0.95, judged=True, held=False),
            ShadowLabel("dog", 120, 0, 498, 0.0, 0.0, judged=True, held=True),
        ],
    )
    assert report.held and report.verdict() == "held"
    text = "\n".join(report.report_lines())
    assert "dog" in text and "HELD" in text and "-100.0%" in text and "498 of 9000" in text
    tags = report.audit_tags()
    assert tags["promotion.shadow.verdict"] == "held" and "'dog'" in tags["promotion.shadow"]
    assert all(len(v) < 5000 for v in tags.values())
    assert set(report.history()) == {"promotion.shadow"}
    report.force = True
    assert report.verdict() == "held, overridden by --force"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input": ""}, "--shadow: give a prefix"),
        ({"input": "x", "sample": 0}, "--shadow-sample"),
        ({"input": "x", "max_rate_change": -1.0}, "--max-rate-change"),
        ({"input": "x", "min_count": 0}, "--shadow-min-count"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    from mlc_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        ShadowConfig(**kwargs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--force"], "need --shadow URI"),
        (["--max-rate-change", "0.5"], "need --shadow URI"),
        (["--shadow", "{tmp}/nothing"], "does not exist"),
        (["--shadow", "{tmp}", "--shadow-sample", "0"], "--shadow-sample"),
        (["--shadow", "{tmp}", "--max-rate-change", "0"], "--max-rate-change"),
        (["--shadow", "{tmp}", "--rollback"], "rollback"),
    ],
)
def test_promote_shadow_flags_are_checked_before_the_registry(
    tmp_path: Path, argv: list[str], message: str, capsys, monkeypatch
) -> None:
    import importlib.util

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: not contacted
    _images(tmp_path, 3)
    spec = importlib.util.spec_from_file_location(
        "promote_job", Path(__file__).parents[2] / "jobs" / "promote.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    code = job.main(["--name", "m", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err

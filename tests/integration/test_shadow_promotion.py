"""jobs/promote.py --shadow against a real MLflow server and a local Ray: held, passed, forced.

The colour bundles of test_registry.py (ONNX graphs of known behaviour, no training): the champion
reads each colour channel; a challenger that "drops" blue has the same graph with a blue threshold
no score reaches; an equivalent challenger is the same bundle again. The labelled gate is opened
(--min-delta -1 --max-label-drop 1) so the shadow comparison is what decides. One story, in order.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import COLOR_LABELS as LABELS
from tests.helpers import GOOD, REPO_ROOT, MlflowServer, build_color_bundle, make_color_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

NAME = "shadow-test"
SAMPLE = 60


def _promote_job():
    spec = importlib.util.spec_from_file_location("promote_job", REPO_ROOT / "jobs" / "promote.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _aliases() -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_registered_model(NAME).aliases)


def _tags(version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(NAME, version).tags


@pytest.fixture(scope="module")
def incoming(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Unlabelled images (their manifest is never read): 90 colour JPEGs and one broken file."""
    root = tmp_path_factory.mktemp("incoming")
    make_color_data(root, n=90, seed=1)
    (root / "manifest.csv").unlink()
    return str(root)


@pytest.fixture(scope="module")
def versions(mlflow_server: MlflowServer, color_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mlc_ray.calibrate import Thresholds
    from mlc_ray.registry import register_bundle

    root = tmp_path_factory.mktemp("shadow-bundles")
    out = {}
    for key in ("champion", "drops_blue", "equivalent"):
        bundle = build_color_bundle(root / key, GOOD, tag=key)
        if key == "drops_blue":
            Thresholds(
                labels=list(LABELS),
                values=[0.5, 0.5, 0.99999],
                method="fixed",
                support=[0] * 3,
                fallback_labels=[],
            ).save(str(bundle / "thresholds.json"))
        mv = register_bundle(bundle, NAME, command_line=f"test {key}", tags={"manifest_uri": color_data})
        out[key] = str(mv.version)
    return out


def run_promote(args: list[str], eval_data: str, capsys) -> tuple[int, str]:
    code = _promote_job().main(["--name", NAME, "--eval-data", eval_data, *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def shadow_args(incoming: str, tmp: Path, *extra: str) -> list[str]:
    return [
        "--min-delta",
        "-1",
        "--max-label-drop",
        "1",
        "--shadow",
        incoming,
        "--shadow-sample",
        str(SAMPLE),
        "--max-rate-change",
        "0.5",
        "--shadow-output",
        str(tmp),
        *extra,
    ]


def test_first_promotion_skips_the_shadow(
    versions, color_data, incoming, tmp_path, ray_local, capsys
) -> None:
    code, out = run_promote(
        ["--candidate", versions["champion"], *shadow_args(incoming, tmp_path)], color_data, capsys
    )
    assert code == 0, out
    assert "shadow     skipped: no champion" in out
    assert _aliases()["champion"] == versions["champion"]
    assert _tags(versions["champion"])["promotion.shadow"].startswith("skipped")


def test_a_challenger_that_drops_a_label_is_held(
    versions, color_data, incoming, tmp_path, ray_local, capsys
) -> None:
    code, out = run_promote(
        ["--candidate", versions["drops_blue"], *shadow_args(incoming, tmp_path)], color_data, capsys
    )
    assert code == 3, out
    assert _aliases()["champion"] == versions["champion"]  # unchanged
    assert "REFUSED: shadow:" in out and "'blue'" in out and "HELD" in out
    tags = _tags(versions["drops_blue"])
    assert tags["promotion.decision"] == "refused" and tags["promotion.shadow.verdict"] == "held"
    figures = {row["label"]: row for row in json.loads(tags["promotion.shadow.labels"])}
    assert figures["blue"]["candidate_count"] == 0 and figures["blue"]["champion_count"] >= 10
    assert figures["blue"]["held"] and figures["blue"]["change"] == -1.0
    assert figures["red"]["kappa"] == 1.0 and not figures["red"]["held"]
    assert tags["promotion.shadow.report"].startswith("runs:/")
    champ_tags = _tags(versions["champion"])
    assert champ_tags["promotion.shadow.verdict"] == "held"  # the audit tags are on both versions
    log_entry = json.loads(tags[max(k for k in tags if k.startswith("promotion.log."))])
    assert log_entry["promotion.shadow"].startswith("held")
    # the report: both runs of the sample in one tag table, and the contact sheet
    report = json.loads((tmp_path / "report" / "shadow.json").read_text())
    assert report["images"] == SAMPLE - report["errors"] and report["listed"] == 91
    assert set(report["runs"]) == {"champion", "candidate"}
    assert (tmp_path / "report" / "contact-disagreements.png").stat().st_size > 1000
    assert report["most_disagreeing"] and all(r["labels_differ"] >= 1 for r in report["most_disagreeing"])


def test_the_sample_is_the_same_for_the_same_seed(
    versions, color_data, incoming, tmp_path, ray_local, capsys
) -> None:
    code, _ = run_promote(
        ["--candidate", versions["drops_blue"], "--dry-run", *shadow_args(incoming, tmp_path / "a")],
        color_data,
        capsys,
    )
    code2, _ = run_promote(
        ["--candidate", versions["drops_blue"], "--dry-run", *shadow_args(incoming, tmp_path / "b")],
        color_data,
        capsys,
    )
    assert code == code2 == 3
    a = (tmp_path / "a" / "sample.csv").read_text()
    assert a == (tmp_path / "b" / "sample.csv").read_text() and len(a.splitlines()) == SAMPLE + 1


def test_an_equivalent_challenger_passes(versions, color_data, incoming, tmp_path, ray_local, capsys) -> None:
    code, out = run_promote(
        ["--candidate", versions["equivalent"], *shadow_args(incoming, tmp_path)], color_data, capsys
    )
    assert code == 0, out
    assert _aliases()["champion"] == versions["equivalent"]
    tags = _tags(versions["equivalent"])
    assert tags["promotion.decision"] == "promoted" and tags["promotion.shadow.verdict"] == "pass"
    figures = json.loads(tags["promotion.shadow.labels"])
    assert all(row["change"] == 0.0 and row["kappa"] == 1.0 for row in figures), figures


def test_force_promotes_a_held_challenger_and_says_so(
    versions, color_data, incoming, tmp_path, ray_local, capsys
) -> None:
    code, out = run_promote(
        ["--candidate", versions["drops_blue"], *shadow_args(incoming, tmp_path, "--force")],
        color_data,
        capsys,
    )
    assert code == 0, out
    assert _aliases()["champion"] == versions["drops_blue"]
    tags = _tags(versions["drops_blue"])
    assert tags["promotion.shadow.verdict"] == "held, overridden by --force"
    assert "overridden by --force" in tags["promotion.reason"]

"""jobs/promote.py end to end against a real MLflow server: the gate, the audit trail, rollback, integrity.

The sequence is one story on one registered model: a mediocre first model becomes champion, a
worse challenger is refused, a better one is promoted, rollback restores the previous champion, and
a version whose stored artifact was altered after registration is refused. The story's steps run in
order whatever order the tests run in (``Story``): each test can run alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import BAD, GOOD, MEDIOCRE, MlflowServer, build_color_bundle, load_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAME = "promo-test"


def _aliases() -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_registered_model(NAME).aliases)


def _tags(version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(NAME, version).tags


@pytest.fixture(scope="module")
def versions(
    mlflow_server: MlflowServer, color_data: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Register mediocre (v1), bad (v2), good (v3) and a good copy to tamper with (v4), in that order."""
    from mlc_ray.registry import register_bundle

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for key, weights in (("mediocre", MEDIOCRE), ("bad", BAD), ("good", GOOD), ("tampered", GOOD)):
        bundle = build_color_bundle(root / key, weights, tag=key)
        # manifest_uri is what training records: promotion's default evaluation data.
        mv = register_bundle(bundle, NAME, command_line=f"test {key}", tags={"manifest_uri": color_data})
        out[key] = str(mv.version)
    return out


def run_promote(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = load_job("promote").main(["--name", NAME, *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


class Story:
    """The promotion story on one registered model, replayed in order up to the step a test asks for.

    Each step runs jobs/promote.py once (in story order, whatever order the tests run in) and keeps
    what it printed plus the aliases and the tags right after it, so a test asserts on its own step
    even when it runs alone (the earlier steps run first) or after a later step (its record stays).
    """

    STEPS = ("first", "worse", "better", "label_drop", "rollback")

    def __init__(self, versions: dict[str, str], color_data: str) -> None:
        self.versions, self.color_data = versions, color_data
        self.done: dict[str, dict] = {}

    def _promote(self, args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
        code, out = run_promote(args, capsys)
        return {
            "code": code,
            "out": out,
            "aliases": _aliases(),
            "tags": {k: _tags(v) for k, v in self.versions.items()},
        }

    def _run(self, step: str, capsys: pytest.CaptureFixture[str]) -> dict:
        v, data = self.versions, self.color_data
        if step == "first":
            return self._promote(["--candidate", v["mediocre"], "--eval-data", data], capsys)
        if step == "worse":
            return self._promote(["--candidate", v["bad"], "--eval-data", data], capsys)
        if step == "better":
            # The newest registration (the tamper copy) holds @challenger; point it at the good version.
            from mlflow import MlflowClient

            MlflowClient().set_registered_model_alias(NAME, "challenger", v["good"])
            # --candidate defaults to challenger; --eval-data to the val rows of its training manifest.
            return self._promote([], capsys)
        if step == "label_drop":
            # Against the good champion, the mediocre model loses a whole label: refused on the metric
            # and on the per-label limit; with --min-delta -1 only the per-label limit can refuse it.
            return self._promote(
                ["--candidate", v["mediocre"], "--eval-data", data, "--min-delta", "-1"], capsys
            )
        assert step == "rollback"
        first = self._promote(["--rollback"], capsys)
        first["again"] = self._promote(["--rollback"], capsys)  # rolling back again swaps back
        return first

    def at(self, step: str, capsys: pytest.CaptureFixture[str]) -> dict:
        for earlier in self.STEPS[: self.STEPS.index(step) + 1]:
            if earlier not in self.done:
                self.done[earlier] = self._run(earlier, capsys)
        return self.done[step]


@pytest.fixture(scope="module")
def story(versions: dict, color_data: str) -> Story:
    return Story(versions, color_data)


def test_first_promotion_is_allowed_and_says_so(story: Story, versions: dict, capsys) -> None:
    step = story.at("first", capsys)
    assert step["code"] == 0, step["out"]
    assert "first promotion" in step["out"] and "PROMOTED" in step["out"]
    assert step["aliases"]["champion"] == versions["mediocre"]
    tags = step["tags"]["mediocre"]
    assert tags["promotion.decision"] == "promoted" and tags["promotion.role"] == "candidate"


def test_a_wrong_eval_data_is_an_error_even_for_the_champion_itself(story: Story, tmp_path, capsys) -> None:
    story.at("first", capsys)  # some version is champion (whichever step ran last)
    champion = _aliases()["champion"]
    missing = str(tmp_path / "held-out" / "manifest.csv")
    code, out = run_promote(["--candidate", champion, "--eval-data", missing], capsys)
    # nothing to promote, but the typo must not pass as "already the champion; nothing to do"
    assert code == 2 and missing in out and "already the champion" not in out, out
    assert _aliases()["champion"] == champion


def test_dry_run_changes_nothing(versions: dict, color_data: str, capsys) -> None:
    before_aliases, before_tags = _aliases(), _tags(versions["good"])
    code, out = run_promote(["--candidate", versions["good"], "--eval-data", color_data, "--dry-run"], capsys)
    assert code == 0 and "dry run" in out, out
    assert _aliases() == before_aliases and _tags(versions["good"]) == before_tags


def test_worse_challenger_is_refused_with_audit_tags(story: Story, versions: dict, capsys) -> None:
    step = story.at("worse", capsys)
    code, out = step["code"], step["out"]
    assert code == 3, out
    assert "REFUSED" in out and "macro_f1" in out
    assert step["aliases"]["champion"] == versions["mediocre"]
    cand, champ = step["tags"]["bad"], step["tags"]["mediocre"]
    for tags, role in ((cand, "candidate"), (champ, "champion")):
        assert tags["promotion.decision"] == "refused"
        assert tags["promotion.role"] == role
        assert tags["promotion.candidate_version"] == versions["bad"]
        assert tags["promotion.champion_version"] == versions["mediocre"]
        assert float(tags["promotion.candidate_value"]) < float(tags["promotion.champion_value"])
        assert tags["promotion.at"].endswith("Z")
        assert any(k.startswith("promotion.log.") for k in tags)


def test_better_challenger_is_promoted_and_previous_kept(
    story: Story, versions: dict, color_data: str, capsys
) -> None:
    step = story.at("better", capsys)
    code, out = step["code"], step["out"]
    assert code == 0, out
    aliases = step["aliases"]
    assert aliases["champion"] == versions["good"]
    assert aliases["previous-champion"] == versions["mediocre"]
    assert "challenger" not in aliases  # the promoted version is no longer waiting for evaluation
    tags = step["tags"]["good"]
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.eval_data"] == f"{color_data} [auto]" and "24 images" in out
    assert float(tags["promotion.candidate_value"]) > float(tags["promotion.champion_value"])


def test_label_drop_gate(story: Story, versions: dict, capsys) -> None:
    step = story.at("label_drop", capsys)
    assert step["code"] == 3, step["out"]
    assert "blue" in step["out"] and "drops by more than 0.030" in step["out"]
    assert step["aliases"]["champion"] == versions["good"]


def test_rollback_restores_previous_champion(story: Story, versions: dict, capsys) -> None:
    step = story.at("rollback", capsys)
    assert step["code"] == 0, step["out"]
    aliases = step["aliases"]
    assert aliases["champion"] == versions["mediocre"]
    assert aliases["previous-champion"] == versions["good"]
    assert step["tags"]["mediocre"]["promotion.decision"] == "rolled-back"
    # Rolling back again swaps back.
    again = step["again"]
    assert again["code"] == 0 and again["aliases"]["champion"] == versions["good"]


def test_tampered_artifact_is_refused(
    versions: dict, color_data: str, mlflow_server: MlflowServer, capsys
) -> None:
    from mlflow import MlflowClient

    model_id = MlflowClient().get_model_version(NAME, versions["tampered"]).source.split("/")[-1]
    stored = list(Path(mlflow_server.artifact_root).rglob(f"{model_id}/**/artifacts/model.onnx"))
    assert len(stored) == 1, stored
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight: still loads, silently different
    stored[0].write_bytes(bytes(data))

    before = _aliases()
    code, out = run_promote(["--candidate", versions["tampered"], "--eval-data", color_data], capsys)
    assert code == 4, out
    assert "model.onnx does not match its sha256 tag" in out
    assert _aliases() == before
    tags = _tags(versions["tampered"])
    assert tags["promotion.decision"] == "refused" and "integrity" in tags["promotion.reason"]


def test_unknown_model_is_a_user_error(mlflow_server: MlflowServer, capsys) -> None:
    code = load_job("promote").main(["--name", "no-such-model", "--eval-data", "x.csv"])
    err = capsys.readouterr().err
    assert code == 2 and "no registered model 'no-such-model'" in err


# ---- held-out evidence: the evaluation data a version records, and refusing its training images

HELD_OUT = "promo-held-out"


@pytest.fixture(scope="module")
def held_out(mlflow_server: MlflowServer, color_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A version registered as training registers one: its val rows and its training images recorded."""
    from mlc_ray.data.manifest import load_manifest
    from mlc_ray.registry import TrainingEvidence, register_bundle

    full = load_manifest(color_data)
    train = full.subset([i for i, s in enumerate(full.splits) if s == "train"])
    val = full.subset([i for i, s in enumerate(full.splits) if s == "val"])
    bundle = build_color_bundle(tmp_path_factory.mktemp("held-out") / "good", GOOD)
    mv = register_bundle(
        bundle,
        HELD_OUT,
        command_line="test held-out",
        evidence=TrainingEvidence(val_manifest=val, train_manifest=train),
    )
    return {"version": str(mv.version), "train": train, "val": val}


def _promote_held_out(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = load_job("promote").main(["--name", HELD_OUT, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version_records_its_val_rows_and_promotion_defaults_to_them(held_out: dict, capsys) -> None:
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version(HELD_OUT, held_out["version"]).tags
    assert tags["eval_data_uri"].startswith("runs:/") and tags["eval_data_uri"].endswith("/val_manifest.csv")
    assert tags["eval_data_sha256"] == held_out["val"].sha256
    assert tags["train_images_uri"].endswith("/train_images.csv")
    code, out, err = _promote_held_out(["--candidate", held_out["version"], "--dry-run"], capsys)
    assert code == 0, out + err
    assert f"{len(held_out['val'])} images" in out
    assert f"0 of {len(held_out['val'])} evaluation images are training images" in out


def test_eval_data_with_training_images_is_refused_naming_the_count(
    held_out: dict, color_data: str, capsys
) -> None:
    # every row of the training manifest: 24 of its 48 images are training images (same URI)
    args = ["--candidate", held_out["version"], "--eval-data", color_data, "--split", "all", "--dry-run"]
    code, out, err = _promote_held_out(args, capsys)
    assert code == 2, out + err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "24 of 48 evaluation images are training images" in err and "24 same URI" in err
    assert "--allow-train-overlap" in err


def test_training_images_under_other_names_are_found_by_content(
    held_out: dict, tmp_path: Path, capsys
) -> None:
    import shutil

    from mlc_ray.data.manifest import Manifest

    train, val = held_out["train"], held_out["val"]
    copies = []
    for k, uri in enumerate(train.images[:10]):
        copies.append(str(tmp_path / f"renamed-{k}.jpg"))
        shutil.copyfile(uri, copies[-1])
    manifest = Manifest(
        images=[*copies, *val.images[:6]],
        labels=[*train.labels[:10], *val.labels[:6]],
        splits=[None] * 16,
        vocabulary=list(val.vocabulary),
    )
    eval_uri = manifest.write(str(tmp_path / "eval.csv"))
    base = ["--candidate", held_out["version"], "--eval-data", eval_uri, "--dry-run"]
    code, out, err = _promote_held_out(base, capsys)
    assert code == 2, out + err
    assert "10 of 16 evaluation images are training images" in err and "10 same content" in err

    code, out, err = _promote_held_out([*base, "--allow-train-overlap"], capsys)
    assert code == 0, out + err
    assert "10 of 16 evaluation images are training images" in out
    assert "NOT a held-out comparison" in out


def test_no_recorded_eval_data_and_no_split_column_is_refused(
    mlflow_server: MlflowServer, held_out: dict, tmp_path: Path, capsys
) -> None:
    """A version registered without evidence falls back to its training manifest only if that has a
    split column: all the rows of a split-less manifest may have been trained on."""
    import dataclasses

    from mlc_ray.registry import register_bundle

    train = held_out["train"]
    no_split = dataclasses.replace(train, splits=[None] * len(train)).write(
        str(tmp_path / "ns" / "train.csv")
    )
    bundle = build_color_bundle(tmp_path / "legacy", GOOD)
    mv = register_bundle(bundle, HELD_OUT, command_line="test legacy", tags={"manifest_uri": no_split})
    code, out, err = _promote_held_out(["--candidate", str(mv.version), "--dry-run"], capsys)
    assert code == 2, out + err
    assert "no split column" in err and "--eval-data" in err

"""``jobs/promote.py --history NAME``: every decision about @champion, newest first, from the audit tags.

Its own registered model on the session's MLflow server (shared with test_registry.py), so it does
not depend on test_promote.py or on test order: promote (first) -> refuse -> promote -> rollback,
then the history must list exactly those four, newest first, each with when, who, the versions
before and after, the decision and its evidence.
"""

from __future__ import annotations

import getpass
import re

import pytest

from tests.helpers import BAD, GOOD, MEDIOCRE, MlflowServer, build_color_bundle, load_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAME = "history-test"
WHEN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  ")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = load_job("promote").main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_history_after_promote_refuse_promote_rollback(
    mlflow_server: MlflowServer, color_data: str, tmp_path_factory: pytest.TempPathFactory, capsys
) -> None:
    from mlc_ray.registry import register_bundle

    root = tmp_path_factory.mktemp("history-bundles")
    v = {}
    for key, weights in (("mediocre", MEDIOCRE), ("bad", BAD), ("good", GOOD)):
        bundle = build_color_bundle(root / key, weights, tag=key)
        v[key] = str(register_bundle(bundle, NAME, command_line=f"test {key}").version)
    code, out, _ = _run(["--history", NAME], capsys)
    assert code == 0 and "no promotion or rollback recorded" in out

    steps = [
        (["--candidate", v["mediocre"], "--eval-data", color_data], 0),
        (["--candidate", v["bad"], "--eval-data", color_data], 3),
        (["--candidate", v["good"], "--eval-data", color_data], 0),
        (["--rollback"], 0),
    ]
    for args, expected in steps:
        code, out, err = _run(["--name", NAME, *args], capsys)
        assert code == expected, out + err

    code, out, err = _run(["--history", NAME], capsys)
    assert code == 0, err
    head, *lines = out.strip().splitlines()
    assert head == f"champion history of '{NAME}', newest first (4 decisions)"
    assert len(lines) == 4, out  # each event is tagged on two versions: listed once
    for line in lines:
        assert WHEN.match(line), line
        assert f"{getpass.getuser()} (local)" in line  # who: no MLflow user here, so the OS user
    rollback, promote_good, refuse_bad, first = lines
    assert "rollback" in rollback and "rolled-back" in rollback
    assert f"champion v{v['good']} -> v{v['mediocre']}" in rollback
    assert "promoted" in promote_good and f"champion v{v['mediocre']} -> v{v['good']}" in promote_good
    assert re.search(r"macro_f1 1\.0+ vs champion 0\.\d+", promote_good), promote_good
    assert f"on {color_data} [auto]" in promote_good
    assert "refused" in refuse_bad and f"champion stays v{v['mediocre']}, v{v['bad']} refused" in refuse_bad
    assert "< champion" in refuse_bad  # the reason: the metric fell short
    assert f"champion (none) -> v{v['mediocre']}" in first and "first promotion" in first


def test_history_of_an_unknown_model_is_a_user_error(mlflow_server: MlflowServer, capsys) -> None:
    code, _, err = _run(["--history", "no-such-model"], capsys)
    assert code == 2 and "error: no registered model 'no-such-model'" in err


def test_promote_needs_a_name_or_history(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        load_job("promote").main([])
    assert info.value.code == 2 and "--name is required" in capsys.readouterr().err

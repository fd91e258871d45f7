"""The champion history from the promotion.log.* audit records, on a real MLflow (sqlite) registry.

The decisions are PromotionDecision records written the way promote()/rollback() write them
(``write_audit``); evaluation is not involved (tests/integration/test_alias_history.py runs the
jobs end to end). Events of the same second keep their order, and an event tagged on two versions,
or copied along with a version's tags, is one entry.
"""

from __future__ import annotations

import pytest

from mlc_ray.alias_history import alias_history, format_history
from mlc_ray.registry import PromotionDecision, write_audit

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


@pytest.fixture
def versions(mlflow_sqlite: str) -> list[str]:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model("hist")
    with mlflow.start_run() as run:
        mlflow.log_text("x", "model/f.txt")
    return [
        str(client.create_model_version("hist", f"runs:/{run.info.run_id}/model", run.info.run_id).version)
        for _ in range(3)
    ]


def _decide(**kw) -> None:
    decision = PromotionDecision(name="hist", metric="macro_f1", eval_data="m.csv [auto]", **kw)
    write_audit(decision, {"candidate": kw["candidate_version"], "champion": kw["champion_version"]})


def test_history_lists_each_event_once_newest_first(versions: list[str], monkeypatch) -> None:
    from mlflow import MlflowClient

    v1, v2, v3 = versions
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "mlc-promotion")
    # Four events within about a second: the order comes from each record's sequence number.
    _decide(action="promote", promoted=True, reason="first promotion", candidate_version=v1,
            champion_version=None, candidate_value=0.5)  # fmt: skip
    _decide(action="promote", promoted=False, reason="macro_f1 0.1 < champion", candidate_version=v2,
            champion_version=v1, candidate_value=0.1, champion_value=0.5)  # fmt: skip
    _decide(action="promote", promoted=True, reason="better", candidate_version=v3,
            champion_version=v1, candidate_value=0.9, champion_value=0.5)  # fmt: skip
    _decide(action="rollback", promoted=True, reason="rolled back", candidate_version=v1, champion_version=v3)
    # A version copied with another's tags (copy_model_version) carries its records along.
    client = MlflowClient()
    for key, value in client.get_model_version("hist", v3).tags.items():
        if key.startswith("promotion.log."):
            client.set_model_version_tag("hist", v2, key, value)

    moves = alias_history("hist")
    assert [(m.action, m.decision) for m in moves] == [
        ("rollback", "rolled-back"),
        ("promote", "promoted"),
        ("promote", "refused"),
        ("promote", "promoted"),
    ]
    assert [(m.champion_before, m.champion_after) for m in moves] == [
        (v3, v1),
        (v1, v3),
        (v1, v1),
        (None, v1),
    ]
    assert all(m.by == "mlc-promotion" and m.at.endswith("Z") for m in moves)
    text = format_history("hist", moves)
    lines = text.splitlines()
    assert lines[0] == "champion history of 'hist', newest first (4 decisions)"
    assert (
        f"champion v{v1} -> v{v3}; macro_f1 0.900000 vs champion 0.500000 on m.csv [auto]: better" in lines[2]
    )
    assert f"champion stays v{v1}, v{v2} refused" in lines[3]
    assert f"champion (none) -> v{v1}" in lines[4]


def test_no_records_and_unknown_model(mlflow_sqlite: str) -> None:
    from mlflow import MlflowClient

    from mlc_ray.registry import ModelNotFoundError

    MlflowClient().create_registered_model("empty")
    assert "no promotion or rollback recorded" in format_history("empty", alias_history("empty"))
    with pytest.raises(ModelNotFoundError, match="no registered model 'nope'"):
        alias_history("nope")

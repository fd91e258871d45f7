"""The registry locked down: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1.

The identities are created the way mlflow/README.md says (``jobs/registry_users.py`` as the
admin): training may only write the staging model, promotion is the only identity with EDIT on
the production model (where ``@champion`` lives), tagging only reads, and a client without
credentials gets 401 for everything. A refusal by the server reaches the user of a job as one
``error:`` line and exit code 2. The module starts its own server and identities, so it does not
depend on any other test module or on test order.
"""

from __future__ import annotations

import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BAD, GOOD, AuthServer, build_color_bundle, identity, load_job

# 600 s: the module fixtures start a server and register three versions (about a minute each on a
# busy 2-CPU machine).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NAME = "locked-tagger"
STAGING = f"{NAME}-staging"
ROLE_ENV = {
    "training": "MLC_RAY_TRAINING_PASSWORD",
    "promotion": "MLC_RAY_PROMOTION_PASSWORD",
    "tagging": "MLC_RAY_TAGGING_PASSWORD",
}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    import mlflow

    server = AuthServer(tmp_path_factory.mktemp("mlflow-auth"))
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(key, None)
    mlflow.set_tracking_uri(server.uri)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"] or "")
    server.server.stop()


@pytest.fixture(scope="module")
def identities(auth_server: AuthServer) -> dict[str, tuple[str, str]]:
    """The three job identities, created by jobs/registry_users.py as the admin; role -> (user, password)."""
    passwords = {role: f"{role}-{secrets.token_hex(12)}" for role in ROLE_ENV}
    env = {ROLE_ENV[role]: pw for role, pw in passwords.items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with identity(*auth_server.admin):
            code = load_job("registry_users").main(["--model", NAME])
            assert code == 0
            # Again: idempotent (users exist, passwords re-set, grants re-applied).
            assert load_job("registry_users").main(["--model", NAME]) == 0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    users = {"training": "mlc-training", "promotion": "mlc-promotion", "tagging": "mlc-tagging"}
    return {role: (users[role], passwords[role]) for role in ROLE_ENV}


@pytest.fixture(scope="module")
def staged(
    identities: dict[str, tuple[str, str]], color_data: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """As training: bad, good2 and good versions in the staging model (good, the last, is @challenger)."""
    from mlc_ray.registry import register_bundle

    root = tmp_path_factory.mktemp("auth-bundles")
    out = {}
    with identity(*identities["training"]):
        for key, weights in (("bad", BAD), ("good2", GOOD), ("good", GOOD)):
            bundle = build_color_bundle(root / key, weights, tag=key)
            mv = register_bundle(
                bundle, STAGING, command_line=f"test {key}", tags={"manifest_uri": color_data}
            )
            out[key] = str(mv.version)
    return out


@pytest.fixture(scope="module")
def promoted(identities: dict, staged: dict, color_data: str) -> dict:
    """As promotion: jobs/promote.py takes the staging @challenger into the production model."""
    from mlflow import MlflowClient

    with identity(*identities["promotion"]):
        code = load_job("promote").main(
            ["--name", NAME, "--candidate", f"models:/{STAGING}@challenger", "--eval-data", color_data]
        )
        champion = MlflowClient().get_model_version_by_alias(NAME, "champion")
    return {"code": code, "champion": champion}


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _http_status(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    import base64

    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------------------------------- tests


def test_unauthenticated_client_gets_nothing(auth_server: AuthServer, promoted: dict, capsys) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    api = f"{auth_server.uri}/api/2.0/mlflow"
    for path in (
        "/registered-models/search",
        f"/registered-models/get?name={NAME}",
        "/experiments/search?max_results=10",
    ):
        status, body = _http_status(api + path)
        assert status == 401, (path, status)
        assert NAME.encode() not in body
    status, body = _http_status(f"{api}/registered-models/get?name={NAME}", ("mlc-tagging", "wrong-password"))
    assert status == 401 and NAME.encode() not in body
    with identity(None, None):
        with pytest.raises(MlflowException) as info:
            MlflowClient().get_registered_model(NAME)
        assert info.value.error_code == "UNAUTHENTICATED"
        # A job without credentials: one clear line, exit 2.
        code = load_job("promote").main(["--history", NAME])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "did not authenticate" in line and "MLFLOW_TRACKING_USERNAME unset" in line


def test_promotion_copies_the_staging_winner_and_moves_champion(
    identities: dict, staged: dict, promoted: dict
) -> None:
    from mlflow import MlflowClient

    assert promoted["code"] == 0
    champion = promoted["champion"]
    assert champion.name == NAME
    tags = champion.tags
    assert tags["promoted_from"] == f"models:/{STAGING}/{staged['good']}"
    assert tags["promotion.decision"] == "promoted" and tags["promotion.by"] == "mlc-promotion"
    assert any(k.startswith("sha256.") for k in tags)  # the copy carries the staging version's checks
    with identity(*identities["tagging"]):
        from mlc_ray.registry import resolve_model

        resolved = resolve_model(
            f"models:/{NAME}@champion",
            cache_dir=Path(os.environ.get("TMPDIR", "/tmp")) / f"auth-{secrets.token_hex(4)}",
        )
        assert resolved.version == champion.version and Path(resolved.local_dir, "model.onnx").is_file()
        staging_tags = MlflowClient().get_model_version(STAGING, staged["good"]).tags
    assert staging_tags["promotion.decision"] == "promoted"  # audit on the staging version too


def test_training_cannot_write_the_production_model(identities: dict, staged: dict, promoted: dict) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    version = promoted["champion"].version
    with identity(*identities["training"]):
        client = MlflowClient()
        attempts = {
            "move @champion": lambda: client.set_registered_model_alias(NAME, "champion", version),
            "change a version tag": lambda: client.set_model_version_tag(
                NAME, version, "sha256.model.onnx", "0" * 64
            ),
            "copy a version in": lambda: client.copy_model_version(
                f"models:/{STAGING}/{staged['bad']}", NAME
            ),
        }
        for what, attempt in attempts.items():
            with pytest.raises(MlflowException) as info:
                attempt()
            assert "403" in str(info.value) or info.value.error_code == "PERMISSION_DENIED", what
    with identity(*identities["tagging"]):
        assert MlflowClient().get_model_version_by_alias(NAME, "champion").version == version
        assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1


def test_tagging_cannot_move_champion_or_change_tags(
    identities: dict, staged: dict, promoted: dict, color_data: str, capsys
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    champion = promoted["champion"]
    before_tags = dict(champion.tags)
    with identity(*identities["tagging"]):
        client = MlflowClient()
        for attempt in (
            lambda: client.set_registered_model_alias(NAME, "champion", champion.version),
            lambda: client.delete_registered_model_alias(NAME, "champion"),
            lambda: client.set_model_version_tag(NAME, champion.version, "sha256.model.onnx", "0" * 64),
            lambda: client.delete_model_version_tag(NAME, champion.version, "promoted_from"),
        ):
            with pytest.raises(MlflowException) as info:
                attempt()
            assert info.value.error_code == "PERMISSION_DENIED"
        # The job run as tagging: a candidate that passes the gate (as good as the champion) cannot be
        # copied in, and a refused one cannot even be recorded; each ends in one error line, exit 2.
        capsys.readouterr()
        for candidate in (staged["good2"], staged["bad"]):
            code = load_job("promote").main(
                ["--name", NAME, "--candidate", f"models:/{STAGING}/{candidate}", "--eval-data", color_data]
            )
            out = capsys.readouterr()
            assert code == 2, out
            line = _one_error_line(out.err)
            assert "refused this operation for user 'mlc-tagging'" in line and "PERMISSION_DENIED" in line
        # Reading is what tagging is for: the history is readable.
        assert load_job("promote").main(["--history", NAME]) == 0
        assert "mlc-promotion" in capsys.readouterr().out
        after = MlflowClient().get_model_version(NAME, champion.version)
        assert MlflowClient().get_model_version_by_alias(NAME, "champion").version == champion.version
        assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1
    assert after.tags == before_tags


def test_promotion_refuses_a_worse_staging_version_and_can_roll_back(
    identities: dict, staged: dict, promoted: dict, color_data: str, capsys
) -> None:
    from mlflow import MlflowClient

    champion = promoted["champion"].version
    with identity(*identities["promotion"]):
        code = load_job("promote").main(
            ["--name", NAME, "--candidate", f"models:/{STAGING}/{staged['bad']}", "--eval-data", color_data]
        )
        assert code == 3, capsys.readouterr()
        assert MlflowClient().get_model_version_by_alias(NAME, "champion").version == champion
        bad_tags = MlflowClient().get_model_version(STAGING, staged["bad"]).tags
        assert bad_tags["promotion.decision"] == "refused"  # recorded where the candidate lives
        # The same winner again is already the champion: no second copy.
        code = load_job("promote").main(
            ["--name", NAME, "--candidate", f"models:/{STAGING}@challenger", "--eval-data", color_data]
        )
        out = capsys.readouterr().out
        assert code == 0 and "already the champion" in out, out
        versions = MlflowClient().search_model_versions(f"name='{NAME}'")
        assert len(versions) == 1

"""The production MLflow server files in mlflow/: valid compose, the right server flags, no secrets.

Docker does not run here, so this checks what can be checked without it: the compose file parses,
the server uses PostgreSQL + proxied S3 artifacts, every credential is an env-file reference, the
env example covers every variable the compose file requires, and the folder holds no .py file
(it would shadow ``import mlflow`` when run from the repository root).
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MLFLOW_DIR = REPO_ROOT / "mlflow"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|ROOT_USER|_USER$", re.IGNORECASE)
ENV_REF = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((MLFLOW_DIR / "docker-compose.yml").read_text())


def test_server_uses_postgres_and_proxied_s3_artifacts(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    command = services["mlflow"]["entrypoint"]
    assert "mlflow server" in command
    assert re.search(r"--backend-store-uri \S*postgresql://", command)
    assert re.search(r"--artifacts-destination \S*s3://", command)
    assert "--serve-artifacts" in command
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_no_literal_secrets(compose: dict) -> None:
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for key, value in env.items():
            if SECRET_KEY.search(key):
                assert ENV_REF.fullmatch(str(value)), (
                    f"{name}.{key} must come from the env file, got {value!r}"
                )
    text = (MLFLOW_DIR / "docker-compose.yml").read_text()
    # A URI with an inline password must take it from a variable.
    for match in re.finditer(r"postgresql://([^@\s\"]+)@", text):
        assert "$" in match.group(1), match.group(0)
    assert not (MLFLOW_DIR / ".env").exists() or ".env" in (REPO_ROOT / ".gitignore").read_text()


def test_env_example_covers_required_variables() -> None:
    text = (MLFLOW_DIR / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = (MLFLOW_DIR / ".env.example").read_text()
    defined = {
        line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")
    }
    assert required and required <= defined, required - defined
    for line in example.splitlines():
        if "PASSWORD=" in line:
            assert "CHANGE-ME" in line, line


def test_folder_has_no_python_and_readme_shows_tracking_uri() -> None:
    assert not list(MLFLOW_DIR.rglob("*.py"))
    readme = (MLFLOW_DIR / "README.md").read_text()
    for needle in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "sqlite:///mlflow.db",
        "--artifacts-destination",
    ):
        assert needle in readme

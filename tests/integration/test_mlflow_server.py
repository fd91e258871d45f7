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

from tests.helpers import REPO_ROOT

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


# ---------------------------------------------------------------------------------------------- image, auth


def _dockerfile() -> tuple[str, dict[str, str]]:
    text = (MLFLOW_DIR / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    return text, args


def test_server_image_is_built_from_a_pinned_dockerfile(compose: dict) -> None:
    service = compose["services"]["mlflow"]
    assert service["build"]["context"] == "." and service["build"]["dockerfile"] == "Dockerfile"
    assert (MLFLOW_DIR / service["build"]["dockerfile"]).is_file()
    # Nothing is installed when a container starts: no pip in any service's command or entrypoint.
    for name, svc in compose["services"].items():
        for key in ("entrypoint", "command"):
            assert "pip" not in str(svc.get(key, "")), f"{name}.{key} installs at start"
    text, args = _dockerfile()
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # a full version, never :latest
    run = next(line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line)
    pins = dict(re.findall(r'"([\w\-\[\]]+)==\$\{(\w+)\}"', run))
    assert set(pins) == {"mlflow[auth]", "psycopg2-binary", "boto3", "Flask-WTF"}, pins
    for package, arg in pins.items():
        assert re.fullmatch(r"\d+(\.\d+)+", args[arg]), (package, args.get(arg))  # an exact version
    assert re.fullmatch(r"3\.17\.\d+", args["MLFLOW_VERSION"])
    assert service["image"].endswith(":" + args["MLFLOW_VERSION"])
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)


def test_auth_app_is_on_with_its_secrets_from_the_env_file(compose: dict) -> None:
    import configparser

    service = compose["services"]["mlflow"]
    assert "--app-name basic-auth" in service["entrypoint"]
    env = service["environment"]
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", env[key]), (key, env[key])  # required, from .env
    # The config file the server reads is the one the image holds, and its auth DB is on a volume.
    text, _ = _dockerfile()
    copied = re.search(r"^COPY basic_auth\.ini (\S+)$", text, re.MULTILINE).group(1)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == copied
    ini = configparser.ConfigParser()
    ini.read(MLFLOW_DIR / "basic_auth.ini")
    auth = ini["mlflow"]
    assert auth["default_permission"] == "READ"
    assert not [key for key in auth if "password" in key], list(auth)  # the admin comes from .env
    db_dir = auth["database_uri"].removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert any(v.split(":")[1].split()[0] == db_dir for v in service["volumes"]), service["volumes"]
    assert db_dir.split("/")[1] in str(compose["volumes"]) or "mlflow-auth" in compose["volumes"]


def test_mlflow_floor_is_above_the_registry_cves() -> None:
    from importlib import metadata

    text = (REPO_ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"mlflow>=(\d+)\.(\d+)', text)
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= (3, 11), floor  # CVE-2026-4137: 3.11.0
    assert "CVE-2026-2614" in text and "CVE-2026-4137" in text  # the reason is written beside it
    installed = tuple(int(p) for p in metadata.version("mlflow").split(".")[:2])
    assert installed >= (3, 11)
    _, args = _dockerfile()
    assert tuple(int(p) for p in args["MLFLOW_VERSION"].split(".")[:2]) >= (3, 11)


def test_readme_shows_identities_and_the_residual_risk() -> None:
    readme = (MLFLOW_DIR / "README.md").read_text()
    for needle in (
        "--app-name basic-auth",
        "jobs/registry_users.py",
        "AuthServiceClient",
        "copy_model_version",
        "Residual risk",
        "secretKeyRef",
        "kubectl create secret",
        "--history",
    ):
        assert needle in readme, needle
    # Every password in the README is a placeholder or comes from a variable.
    for match in re.finditer(r"PASSWORD=(\S+)", readme):
        assert match.group(1).startswith(("...", '"$', "$")), match.group(0)

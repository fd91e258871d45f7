"""Shared test fixtures: a real S3 server (moto, own process), one local Ray per session, real MLflow.

Plain helpers (functions, constants, server classes) are in tests/helpers.py.

Tiers (markers registered in pyproject.toml): ``unit`` (no Ray, no servers), ``integration``
(local Ray, the S3 server, MLflow), ``chaos`` (fault injection). Tests without a tier marker are
marked by their folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, MlflowServer, free_port, make_color_data, wait_for_port

__all__ = ["REPO_ROOT", "S3Server", "free_port", "wait_for_port"]  # imported by tests/chaos

# Every process the tests start (Ray workers, job drivers) must find the package and must never
# reach a real AWS endpoint or the network.
os.environ.setdefault("PYTHONPATH", str(REPO_ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Ray Train's controller polls its workers every 2 s, so each run waits up to 2 s to see that its
# workers started and again that they finished. A quarter second in the tests: a one-worker training
# fixture (test_train.py's) took 45.9-53.1 s (median 47.0) against 48.6-57.9 s (median 51.2) at the
# default, four alternating pairs (2026-12-04, AMD EPYC 2 vCPUs). Speed only: no test depends on it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# The tests' own MLflow store for whatever finds no MLFLOW_TRACKING_URI of a test's (jobs run in
# process and as subprocesses): the default, sqlite:///mlflow.db + ./mlruns in the cwd, was the repo
# root, where the tagging tests left ~18 runs that a later `make demo` logged beside (its store is the
# same file). A URI set from outside the suite is kept.
_MLFLOW_HOME = Path(tempfile.mkdtemp(prefix="mlc_ray-tests-mlflow-"))
_MLFLOW_DEFAULT_URI = f"sqlite:///{_MLFLOW_HOME / 'mlflow.db'}"
os.environ.setdefault("MLFLOW_TRACKING_URI", _MLFLOW_DEFAULT_URI)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("unit", "integration", "chaos"):
            if tier in parts and not any(m.name == tier for m in item.iter_markers()):
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session", autouse=True)
def _tests_mlflow_store() -> Iterator[None]:
    """The experiments jobs create under the tests' default store, made first with their artifacts in
    its temp dir: with a sqlite store MLflow puts a new experiment's artifacts in ./mlruns of the cwd
    (the repo root), and only a server-internal variable moves that default."""
    if os.environ.get("MLFLOW_TRACKING_URI") == _MLFLOW_DEFAULT_URI:
        from mlflow import MlflowClient

        from mlc_ray.tagging.report import TAGGING_EXPERIMENT
        from mlc_ray.train.config import TrainConfig

        client = MlflowClient(tracking_uri=_MLFLOW_DEFAULT_URI)
        for name in (TAGGING_EXPERIMENT, TrainConfig.experiment):
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name, artifact_location=(_MLFLOW_HOME / "artifacts" / name).as_uri())
    yield
    shutil.rmtree(_MLFLOW_HOME, ignore_errors=True)


_MLFLOW_EXPERIMENT_AT_START = {"MLFLOW_EXPERIMENT_ID": os.environ.get("MLFLOW_EXPERIMENT_ID")}


@pytest.fixture(autouse=True)
def _no_mlflow_state_between_tests() -> Iterator[None]:
    """MLflow's fluent API keeps the tracking URI, the active experiment and the run stack in module
    globals and mirrors them into MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID: a test that sets them
    (a job, the mlflow_sqlite fixture) must not hand them to the next one (seen: a stale experiment id
    looked up in a fresh database; a run started in one test's database and tagged in another's)."""
    # the tracking URI a session/module fixture set stays; the experiment never outlives a test
    saved = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI"), **_MLFLOW_EXPERIMENT_AT_START}
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # forget the URI (this also unsets the env var it mirrored)
    fluent._active_experiment_id = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class S3Server:
    """A moto S3 server in its own process on 127.0.0.1 (a thread would stall Ray on 2 CPUs)."""

    def __init__(self, tmp_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_dir / "moto.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Session-wide S3 server; sets AWS_* env so boto3, pyarrow and child processes all use it."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        from mlc_ray import storage

        storage.reset_clients()
    except (ImportError, AttributeError):
        pass
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket per test; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=name)
    return name


def start_local_ray() -> None:
    """A new local Ray (2 CPUs, no dashboard), never a cluster found on the machine."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )


@pytest.fixture(scope="session")
def _ray_session(s3_server: S3Server) -> Iterator[None]:
    """Shuts down, at the end of the session, the local Ray that ``ray_local`` started."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session: None) -> Iterator[None]:
    """A local Ray (2 CPUs) for the module, started after the S3 env is set so workers inherit it.

    One Ray serves every module of the session (each start costs seconds on 2 CPUs); isolation is
    not what these modules test. A module that finds it gone (a test or the chaos tier shut it
    down to start a Ray of its own) starts a new one.
    """
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield


@pytest.fixture
def mlflow_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private sqlite-backed MLflow tracking URI with a local artifact root."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact root (./mlruns) lands in the test's tmp dir
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small deterministic demo data set on local disk; returns the manifest path."""
    from mlc_ray.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo")
    return generate_demo(str(root), seed=0)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` for the session (shared by the registry, promotion and alias-history
    modules: each uses its own registered model names); MLFLOW_TRACKING_URI points every client (and
    child process) at it while it runs."""
    import mlflow

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    mlflow.set_tracking_uri(server.uri)
    yield server
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    mlflow.set_tracking_uri(saved or "")
    server.stop()


@pytest.fixture(scope="session")
def color_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The colour data set (labelled JPEGs, a manifest with a val split, labels.txt); read-only."""
    return make_color_data(tmp_path_factory.mktemp("color"))

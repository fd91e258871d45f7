"""Fixtures of the chaos tier: one fault proxy and one local Ray for the whole tier.

* ``fault_proxy`` — ``s3_fault_proxy.py`` in its own process in front of the session's S3 server,
  faults off until a test turns them on (and off again).
* ``chaos_ray`` — one local Ray (2 CPUs) for the tier, not one per module: starting Ray costs ~10 s
  on 2 CPUs and the tier must stay within a few minutes. Its workers reach S3 *through the proxy*
  (``AWS_ENDPOINT_URL`` in the job's runtime env; the driver talks to the server directly) with
  boto3's own retries off (``MLC_RAY_S3_MAX_ATTEMPTS=1``), so the retry layer under test in the
  workers is tagging's ``read_with_retry`` (boto3's layer is tested in the driver), and they run
  ``hooks.install_poison_decoder``, which is inert unless an image carries the poison marker.
  Drivers started by tests (``driver.py``) connect to it as separate jobs, as on a real cluster.
* ``tiny_bundle`` — MobileNet V1 x0.25 at 32 px (``tests.integration.test_tagging.make_bundle``).
* ``registered_model`` / ``tracking`` — the tiny bundle registered twice (``MODEL_NAME`` v1, v2) in
  a private sqlite MLflow; version 2's stored ``model.onnx`` is altered after registration.

At the end of the session the measured results (``support.record``) are printed as a markdown
table; ``MLC_RAY_CHAOS_RESULTS=path.json`` also writes them as JSON.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import support
from tests.chaos.hooks import CRASH_LOG_ENV
from tests.conftest import REPO_ROOT, S3Server


@pytest.fixture(scope="session")
def fault_proxy(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[support.FaultProxy]:
    proxy = support.FaultProxy(s3_server.endpoint, tmp_path_factory.mktemp("proxy"))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def crash_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """File the poison hook appends a line to before each crash it causes."""
    return tmp_path_factory.mktemp("crashes") / "crashes.log"


@pytest.fixture(scope="session")
def chaos_ray(s3_server: S3Server, fault_proxy: support.FaultProxy, crash_log: Path) -> Iterator[str]:
    """The tier's local Ray; yields its GCS address (for drivers started in other processes)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # a new local Ray, never a cluster found on the machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": str(REPO_ROOT),
                "AWS_ENDPOINT_URL": fault_proxy.endpoint,
                "MLC_RAY_S3_MAX_ATTEMPTS": "1",
                CRASH_LOG_ENV: str(crash_log),
            },
            "worker_process_setup_hook": "tests.chaos.hooks.install_poison_decoder",
        },
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def proxy_faults(fault_proxy: support.FaultProxy) -> Iterator[support.FaultProxy]:
    """The proxy, guaranteed back to pass-through after the test."""
    fault_proxy.off()
    yield fault_proxy
    fault_proxy.off()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.helpers import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny-tagger")


MODEL_NAME = support.MODEL_NAME


@pytest.fixture(scope="session")
def registered_model(tiny_bundle: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``{"uri", "root", "good", "bad"}``: tracking URI, its folder, the intact and the tampered version."""
    import mlflow

    from mlc_ray.registry import register_bundle

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # the default ./mlruns artifact root lands here
        mlflow.set_tracking_uri(uri)
        good = register_bundle(tiny_bundle, MODEL_NAME, command_line="chaos good")
        bad = register_bundle(tiny_bundle, MODEL_NAME, command_line="chaos tampered")
        model_id = mlflow.MlflowClient().get_model_version(MODEL_NAME, bad.version).source.split("/")[-1]
        [stored] = [p for p in root.rglob("model.onnx") if model_id in str(p)]
        stored.write_bytes(stored.read_bytes()[:-16] + b"\x00" * 16)  # altered after registration
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "root": root, "good": str(good.version), "bad": str(bad.version)}


@pytest.fixture
def tracking(registered_model: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """``registered_model``'s MLflow as the test's tracking server (env for jobs, API for this process)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_model["uri"])
    mlflow.set_tracking_uri(registered_model["uri"])
    yield registered_model
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _fresh_storage_clients() -> Iterator[None]:
    """boto3 clients are cached per process: tests that change AWS_* / retry settings start clean."""
    from mlc_ray import storage

    storage.reset_clients()
    yield
    storage.reset_clients()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not support.RESULTS:
        return
    terminalreporter.section("chaos results (measured)")
    terminalreporter.write_line(support.results_markdown())
    path = os.environ.get("MLC_RAY_CHAOS_RESULTS")
    if path:
        Path(path).write_text(support.results_json())

"""run_job: an MLflow server's 401/403 is a user error (one ``error:`` line, exit 2), anything else a bug.

The exceptions are the ones MLflow's REST client raises for those statuses (the real server case is
tests/integration/test_mlflow_auth.py); a copy_model_version refusal arrives wrapped in a 500.
"""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

from mlc_ray.cli import run_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

FORBIDDEN = (
    "API request to endpoint /api/2.0/mlflow/registered-models/alias failed with error code 403 != 200."
)


def _raise(exc: BaseException):
    def body() -> int:
        raise exc

    return body


def test_permission_denied_is_one_line_exit_2(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "mlc-tagging")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-never-shown")
    code = run_job(_raise(MlflowException(FORBIDDEN, error_code=PERMISSION_DENIED)))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "user 'mlc-tagging'" in err and "/api/2.0/mlflow/registered-models/alias" in err
    assert "s3cret-never-shown" not in err


def test_wrapped_refusal_and_missing_credentials(monkeypatch, capsys) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)

    def copy() -> int:
        try:
            raise MlflowException(FORBIDDEN, error_code=PERMISSION_DENIED)
        except MlflowException as exc:
            raise MlflowException("Failed to create model version copy.") from exc

    assert run_job(copy) == 2
    assert "refused this operation" in capsys.readouterr().err
    assert run_job(_raise(MlflowException("401", error_code=UNAUTHENTICATED))) == 2
    assert "MLFLOW_TRACKING_USERNAME unset" in capsys.readouterr().err


def test_other_server_errors_keep_their_traceback() -> None:
    with pytest.raises(MlflowException):
        run_job(_raise(MlflowException("boom")))  # INTERNAL_ERROR: a bug, not the user's to fix
    with pytest.raises(ZeroDivisionError):
        run_job(_raise(ZeroDivisionError()))

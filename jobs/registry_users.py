"""Create the job identities on an MLflow server that runs with authentication (see mlflow/README.md).

    MLFLOW_TRACKING_URI=https://mlflow.example.com MLFLOW_TRACKING_USERNAME=admin \
    MLFLOW_TRACKING_PASSWORD=... MLC_RAY_TRAINING_PASSWORD=... MLC_RAY_PROMOTION_PASSWORD=... \
    MLC_RAY_TAGGING_PASSWORD=... python jobs/registry_users.py --model NAME [--staging-model NAME-staging]

Runs as the admin. Creates (or re-passwords) users mlc-training, mlc-promotion and mlc-tagging,
the production model NAME and the staging model NAME-staging (both owned by the admin), and the
grants: training EDIT on the staging model only, promotion MANAGE on the production model and
EDIT on the staging one, tagging the server's default (READ). Idempotent; prints no password.
Exit codes: 0 done, 2 a user error (missing password variable, server refused), 1 a bug.
"""

from __future__ import annotations

from mlc_ray.cli import exit_process, run_job, setup_logging
from mlc_ray.registry_auth import build_parser
from mlc_ray.registry_auth import main as provision_main


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)  # --help and usage errors before logging starts
    setup_logging()
    return run_job(lambda: provision_main(argv))


if __name__ == "__main__":
    exit_process(main())  # sys.exit less the module teardown (mlc_ray.cli)

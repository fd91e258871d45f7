"""Least-privilege identities for the jobs on an MLflow server with authentication (basic-auth app).

MLflow's permission model (``mlflow server --app-name basic-auth``, checked against MLflow 3.17)
grants READ / USE / EDIT / MANAGE per *registered model*; it has no permission of its own for an
alias. Moving an alias (``SetRegisteredModelAlias``) needs EDIT on the model, the same as adding
a version or changing a version's tags; deleting an alias needs MANAGE. So "only promotion may
move ``champion``" is enforced one level up, by model:

* ``NAME-staging`` (the **staging** model): training registers its versions there (EDIT) and
  moves ``@challenger`` there; promotion may read it and write its audit tags (EDIT).
* ``NAME`` (the **production** model, where ``@champion`` lives): only promotion has MANAGE;
  training has no grant on it, tagging only reads. Promotion copies a winning staging version
  into it (``MlflowClient.copy_model_version``, tags and all) and moves ``@champion`` there.
* every other authenticated identity gets ``default_permission`` (READ in ``mlflow/basic_auth.ini``);
  unauthenticated requests get 401.

Both models are created here by the admin *before* any job runs: MLflow gives MANAGE to whoever
creates a registered model, so a training job must never be the one that creates ``NAME``.

Residual risk (what MLflow cannot separate): the promotion identity can move any alias on the
production model, delete its versions and rewrite its tags, and the admin can do anything;
training can rewrite its staging versions' tags (promotion still verifies artifacts against
their sha256 tags and evaluates before copying). With workspaces off, any authenticated
identity may create *new* experiments and registered models (never one of the two above).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from mlc_ray.errors import UserError

__all__ = ["ROLES", "JobIdentity", "main", "provision_identities", "staging_name"]

log = logging.getLogger(__name__)

STAGING_SUFFIX = "-staging"


@dataclass(frozen=True)
class JobIdentity:
    """One job role: its default user name, the env var holding its password, its grants."""

    role: str
    username: str
    password_env: str
    production: str | None  # permission on the production model (None: default_permission)
    staging: str | None  # permission on the staging model


ROLES: dict[str, JobIdentity] = {
    "training": JobIdentity("training", "mlc-training", "MLC_RAY_TRAINING_PASSWORD", None, "EDIT"),
    "promotion": JobIdentity("promotion", "mlc-promotion", "MLC_RAY_PROMOTION_PASSWORD", "MANAGE", "EDIT"),
    "tagging": JobIdentity("tagging", "mlc-tagging", "MLC_RAY_TAGGING_PASSWORD", None, None),
}


def staging_name(production: str) -> str:
    return f"{production}{STAGING_SUFFIX}"


def provision_identities(
    tracking_uri: str,
    production: str,
    passwords: Mapping[str, str],
    *,
    staging: str | None = None,
    usernames: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Create (or re-password) the job users, both registered models and their grants; idempotent.

    Runs as the admin in ``MLFLOW_TRACKING_USERNAME/PASSWORD``. ``passwords``: role -> password
    (every role in ``ROLES``). Returns role -> user name. No password is logged or returned.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    missing = sorted(set(ROLES) - {r for r, p in passwords.items() if p})
    if missing:
        raise UserError(f"no password for role(s) {', '.join(missing)}")
    staging = staging or staging_name(production)
    auth = AuthServiceClient(tracking_uri)
    client = MlflowClient(tracking_uri)
    for model in (production, staging):
        try:
            client.create_registered_model(model)
            log.info("created registered model '%s' (owned by the admin)", model)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    names = {}
    for role, ident in ROLES.items():
        user = (usernames or {}).get(role) or ident.username
        try:
            auth.create_user(user, passwords[role])
            log.info("created user '%s' (%s)", user, role)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.update_user_password(user, passwords[role])
            log.info("user '%s' (%s) exists; password updated", user, role)
        for model, permission in ((production, ident.production), (staging, ident.staging)):
            if permission is None:
                try:  # an earlier grant would outlive a role change
                    auth.revoke_user_permission(user, "registered_model", model)
                except MlflowException as exc:
                    if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                        raise
                continue
            try:
                auth.grant_user_permission(user, "registered_model", model, permission)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # No update call for a user's grant: replace it, so a changed level takes effect.
                auth.revoke_user_permission(user, "registered_model", model)
                auth.grant_user_permission(user, "registered_model", model, permission)
            log.info("granted %s on '%s' to '%s'", permission, model, user)
        names[role] = user
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Create the training / promotion / tagging identities on an MLflow server with auth."
    )
    parser.add_argument("--model", required=True, help="production registered model name (holds @champion)")
    parser.add_argument("--staging-model", help="where training registers (default: MODEL-staging)")
    for role, ident in ROLES.items():
        parser.add_argument(
            f"--{role}-user", default=ident.username, help=f"user name (default {ident.username})"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python jobs/registry_users.py --model NAME``: admin credentials and role passwords from env."""
    import mlflow

    args = build_parser().parse_args(argv)
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"MLFLOW_TRACKING_URI must be the MLflow server (http[s]://...), not {uri}")
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise UserError("set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD to the admin's credentials")
    passwords = {role: os.environ.get(ident.password_env, "") for role, ident in ROLES.items()}
    missing = [ROLES[r].password_env for r, p in passwords.items() if not p]
    if missing:
        raise UserError(f"set {', '.join(missing)} (from your secret store) before provisioning")
    usernames = {role: getattr(args, f"{role}_user") for role in ROLES}
    names = provision_identities(uri, args.model, passwords, staging=args.staging_model, usernames=usernames)
    staging = args.staging_model or staging_name(args.model)
    for role, user in names.items():
        ident = ROLES[role]
        print(
            f"{role:<10} user {user:<16} {args.model}: {ident.production or 'default (READ)':<15} "
            f"{staging}: {ident.staging or 'default (READ)'}"
        )
    return 0

"""Registry lookups every other registry module shares: the MLflow client, the alias names, and
model / version / alias lookups that fail with a ``ModelNotFoundError`` listing what exists.

No module of the package imports mlflow at import time (its import is ~0.7 s of a tagging run's
fixed cost, and a bundle-directory run never needs it): each function imports what it uses."""

from __future__ import annotations

import json
from typing import Any

from mlc_ray.errors import UserError

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
PROMOTED_FROM_TAG = "promoted_from"  # on a production version copied from a staging model
MAX_TAG_VALUE = 5000  # MLflow's limit on a model version tag value


class ModelNotFoundError(UserError):
    """Unknown registered model, version or alias; the message lists what exists."""


class ArtifactIntegrityError(UserError):
    """A downloaded artifact does not match its sha256 tag: the version must not be used."""

    exit_code = 4


def mlflow_client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in (
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "INVALID_PARAMETER_VALUE",
    )


def clip_tag(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."


def alias_map(name: str) -> dict[str, str]:
    """alias -> version for a registered model (search_model_versions() leaves aliases empty)."""
    model = mlflow_client().get_registered_model(name)
    aliases = getattr(model, "aliases", None) or {}
    return {str(k): str(v) for k, v in dict(aliases).items()}


def _known_models() -> list[str]:
    try:
        return sorted(m.name for m in mlflow_client().search_registered_models(max_results=50))
    except Exception:  # listing is a courtesy in an error message; never mask the real error
        return []


def require_model(name: str) -> None:
    """ModelNotFoundError listing the registered models when ``name`` is not one of them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client().get_registered_model(name)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        known = _known_models()
        raise ModelNotFoundError(
            f"no registered model '{name}' at {mlflow.get_tracking_uri()}; "
            f"registered models: {', '.join(known) if known else '(none)'}"
        ) from exc


def get_version(name: str, version: str | None, alias: str | None) -> Any:
    """The ModelVersion for a version number or an alias, or ModelNotFoundError listing what exists."""
    from mlflow.exceptions import MlflowException

    require_model(name)
    client = mlflow_client()
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        aliases = alias_map(name)
        listed = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "(none)"
        what = f"alias '@{alias}'" if alias is not None else f"version {version}"
        raise ModelNotFoundError(f"model '{name}' has no {what}; aliases: {listed}") from exc

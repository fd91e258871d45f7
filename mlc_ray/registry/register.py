"""Register a model bundle: log it as an MLflow pyfunc model, make it a new version, tag it, alias it.

The version's tags make it auditable and verifiable: ``sha256.<file>`` per bundle file,
``training_run_id``, ``bundle_uri``, ``command_line``, ``git_commit``, ``metric.<name>``, the
model's ``arch`` / ``manifest_sha256`` / ``manifest_uri``, and the evidence tags
(``mlc_ray.registry.evidence``). A new version gets alias ``challenger``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlc_ray import bundle as bundle_layout
from mlc_ray.errors import UserError
from mlc_ray.provenance import command_line as process_command_line
from mlc_ray.provenance import git_commit
from mlc_ray.registry.artifacts import (
    SHA_TAG_PREFIX,
    bundle_artifacts,
    local_bundle_dir,
    sha256_file,
)
from mlc_ray.registry.evidence import TrainingEvidence, log_evidence
from mlc_ray.registry.versions import CHALLENGER, clip_tag, is_not_found, mlflow_client

log = logging.getLogger("mlc_ray.registry")

# Small files also logged as plain run artifacts, so they are readable in the MLflow UI.
UI_FILES = (
    bundle_layout.THRESHOLDS,
    bundle_layout.LABELS,
    bundle_layout.PREPROCESS,
    bundle_layout.METRICS,
    bundle_layout.MODEL_JSON,
)
PYFUNC_FILE = Path(__file__).resolve().parents[1] / "pyfunc_model.py"
DEFAULT_EXPERIMENT = "mlc_ray-registry"


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))] = float(value)
    return out


def _signature_and_example(local: Path) -> tuple[Any, Any]:
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

    inputs = Schema([ColSpec(DataType.string, "image")])
    outputs = Schema(
        [
            ColSpec(DataType.string, "image", required=False),
            ColSpec(Array(DataType.string), "labels"),
            ColSpec(
                Array(Object([Property("label", DataType.string), Property("score", DataType.float)])),
                "scores",
            ),
            ColSpec(DataType.string, "error", required=False),
        ]
    )
    # MLflow stores the example as JSON beside the model and runs it through predict() when
    # logging. No image URI resolves everywhere, so the example is a relative path that resolves
    # nowhere: it documents the input and comes back as a row with `error` set, without network.
    example = pd.DataFrame({"image": ["images/example.jpg"]})
    return ModelSignature(inputs=inputs, outputs=outputs), example


def _pip_requirements() -> list[str]:
    from importlib import metadata

    reqs = []
    for dist in ("mlflow", "onnxruntime", "numpy", "pandas", "pillow", "pyarrow", "boto3"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    try:
        reqs.append(f"mlc_ray=={metadata.version('mlc_ray')}")
    except metadata.PackageNotFoundError:
        reqs.append("mlc_ray")
    return reqs


@contextmanager
def _run_for(run_id: str | None, name: str) -> Iterator[tuple[Any, bool]]:
    """The MLflow run to log into: the training run (resumed if finished) or a new one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    active = mlflow.active_run()
    if active is not None and (run_id is None or active.info.run_id == run_id):
        yield active, False
        return
    if run_id is not None:
        try:
            mlflow_client().get_run(run_id)
        except MlflowException as exc:
            if not is_not_found(exc):
                raise
            raise UserError(f"training run {run_id} not found at {mlflow.get_tracking_uri()}") from exc
        with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
            yield run, False
        return
    # An explicit experiment id, not mlflow.set_experiment(): registering must not change the
    # caller's active experiment.
    experiment_name = os.environ.get("MLC_RAY_REGISTRY_EXPERIMENT", DEFAULT_EXPERIMENT)
    experiment = mlflow_client().get_experiment_by_name(experiment_name)
    experiment_id = (
        experiment.experiment_id if experiment else mlflow_client().create_experiment(experiment_name)
    )
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"register-{name}", nested=active is not None
    ) as run:
        yield run, True


def register_bundle(
    bundle_dir: str | os.PathLike[str],
    name: str,
    *,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    command_line: str | None = None,
    alias: str | None = CHALLENGER,
    evidence: TrainingEvidence | None = None,
) -> Any:
    """Log the bundle as a pyfunc model, register it as a new version of ``name``, tag it, alias it.

    ``run_id`` is the training run (the model is logged into it); without it a ``register-NAME``
    run is created. ``tags`` are added to the version (training passes ``manifest_sha256`` and
    ``manifest_uri``); ``command_line`` defaults to this process's argv. ``evidence`` (training
    passes it) logs the evaluation data and the training-image list that promotion uses. Returns the
    ``mlflow.entities.model_registry.ModelVersion`` (with its tags).
    """
    import mlflow

    bundle_dir = str(bundle_dir)
    with local_bundle_dir(bundle_dir) as local:
        artifacts = bundle_artifacts(local)
        shas = {path.name: sha256_file(path) for path in artifacts.values()}
        bundle = bundle_layout.ModelBundle(local)
        metrics: dict[str, Any] = bundle.metrics() if bundle.has(bundle_layout.METRICS) else {}
        scalar_metrics = _scalar_metrics(metrics)

        version_tags: dict[str, str] = {f"{SHA_TAG_PREFIX}{f}": sha for f, sha in shas.items()}
        version_tags["bundle_uri"] = bundle_dir
        version_tags["command_line"] = command_line or process_command_line(full_executable=True)
        commit = git_commit()
        if commit:
            version_tags["git_commit"] = commit
        for key, value in scalar_metrics.items():
            version_tags[f"metric.{key}"] = f"{value:.6g}"
        if bundle.has(bundle_layout.MODEL_JSON):
            model_cfg = bundle.model_spec()
            for key in ("arch", "manifest_sha256", "manifest_uri"):
                if key in model_cfg:
                    version_tags[key] = str(model_cfg[key])
        for key, value in (tags or {}).items():
            version_tags[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)

        signature, example = _signature_and_example(local)
        with _run_for(run_id, name) as (run, new_run):
            version_tags["training_run_id"] = str(
                run_id or version_tags.get("training_run_id", run.info.run_id)
            )
            for fname in UI_FILES:
                if (local / fname).is_file():
                    mlflow.log_artifact(str(local / fname), artifact_path="bundle")
            if new_run and scalar_metrics:
                mlflow.log_metrics(scalar_metrics)
            if evidence is not None:
                with tempfile.TemporaryDirectory(prefix="mlc_ray-evidence-") as evidence_tmp:
                    version_tags.update(log_evidence(evidence, run.info.run_id, Path(evidence_tmp)))
            mlflow.set_tags({"mlc_ray.registered_model": name, "mlc_ray.bundle_uri": bundle_dir})
            with warnings.catch_warnings():
                # predict() has no type hints on purpose (see pyfunc_model.py); MLflow nags about it.
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_FILE),
                    artifacts={key: str(path) for key, path in artifacts.items()},
                    signature=signature,
                    input_example=example,
                    pip_requirements=_pip_requirements(),
                    registered_model_name=name,
                )
        version = str(info.registered_model_version)
        client = mlflow_client()
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, key, clip_tag(value))
        if alias:
            client.set_registered_model_alias(name, alias, version)
        log.info(
            "registered %s version %s (%s) from %s%s",
            name,
            version,
            info.model_uri,
            bundle_dir,
            f"; alias '{alias}'" if alias else "",
        )
        return client.get_model_version(name, version)

"""The MLflow model registry: register a model bundle, resolve a model URI, promote on evidence.

A registered model version is one model bundle (see ``docs/internals.md``) logged as an MLflow
pyfunc model (``mlc_ray/pyfunc_model.py``, "models from code") whose pyfunc ``artifacts`` are the
bundle's files, with tags that make it auditable and verifiable:

* ``sha256.<file>`` for every bundle file (``resolve_model`` refuses a download that differs);
* ``training_run_id``, ``manifest_sha256``/``manifest_uri`` (when training passes them),
  ``command_line``, ``git_commit``, ``metric.<name>`` for the scalar validation metrics;
* the held-out evidence (``TrainingEvidence``): ``eval_data_uri`` (the ``--val-data`` manifest, or
  the seeded split's val rows logged as ``evidence/val_manifest.csv``), ``eval_data_sha256``, and
  ``train_images_uri`` (``evidence/train_images.csv``: URI + sha256 of every training image).

A new version gets alias ``challenger``; ``promote`` moves ``champion`` (and keeps
``previous-champion``) only when the candidate beats the champion on the same evaluation data,
each at its own thresholds, and writes ``promotion.*`` audit tags on both versions either way.
The evaluation data defaults to the candidate's ``eval_data_uri``; evaluation data that contains
the candidate's training images (same URI or same bytes) is refused unless explicitly allowed.
Jobs resolve an alias to a concrete version once, at start (``resolve_model``), and use that
version for the whole run.

One module per responsibility; this package re-exports their public names:

* ``versions``  -- the MLflow client, alias names, model/version/alias lookups, the errors
* ``artifacts`` -- which bundle files a version holds; the sha256 check of a download
* ``evidence``  -- what a version was trained/validated on: logged at registration, read at promotion
* ``register``  -- ``register_bundle``
* ``resolve``   -- ``resolve_model``, ``parse_model_uri``, the version cache and the s3:// bundle cache
* ``promotion`` -- ``promotion_gate`` (the decision, a pure function of two evaluations) and ``promote``
* ``audit``     -- ``PromotionDecision`` (report + audit tags), ``write_audit``, ``rollback``
"""

from mlc_ray.registry.artifacts import ARTIFACT_FILES, verify_artifacts
from mlc_ray.registry.audit import PromotionDecision, rollback, write_audit
from mlc_ray.registry.evidence import TrainingEvidence
from mlc_ray.registry.promotion import GateVerdict, promote, promotion_gate
from mlc_ray.registry.register import register_bundle
from mlc_ray.registry.resolve import ResolvedModel, default_cache_dir, parse_model_uri, resolve_model
from mlc_ray.registry.versions import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    ArtifactIntegrityError,
    ModelNotFoundError,
    require_model,
)

__all__ = [
    "ARTIFACT_FILES",
    "CHAMPION",
    "CHALLENGER",
    "PREVIOUS_CHAMPION",
    "ArtifactIntegrityError",
    "GateVerdict",
    "ModelNotFoundError",
    "PromotionDecision",
    "ResolvedModel",
    "TrainingEvidence",
    "default_cache_dir",
    "parse_model_uri",
    "promote",
    "promotion_gate",
    "register_bundle",
    "require_model",
    "resolve_model",
    "rollback",
    "verify_artifacts",
    "write_audit",
]

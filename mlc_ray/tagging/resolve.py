"""Stage [1]: the model of a tagging run, resolved once in the driver.

``resolve`` turns ``--model`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a bundle
directory) into a pinned version through ``registry.resolve_model`` (files downloaded once and
checked against their sha256 tags); a bare bundle directory is pinned by the content hash of its
fp32 graph. ``load_model_metadata`` reads what the actors need from the bundle: labels, thresholds
(refused when their labels are not ``labels.json``'s) and ``preprocess.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mlc_ray.cli import UserError
from mlc_ray.tagging.config import DEMO_MODEL_URI, TagConfig

__all__ = ["TagModel", "resolve", "load_model_metadata"]


@dataclass
class TagModel:
    pinned: str
    name: str
    version: str
    alias: str | None
    local_dir: str


def resolve(cfg: TagConfig) -> TagModel:
    from mlc_ray import storage
    from mlc_ray.registry import ModelNotFoundError, resolve_model

    if (
        not cfg.model.startswith("models:/")
        and not storage.is_s3(cfg.model)
        and not storage.exists(cfg.model)
    ):
        raise UserError(
            f"--model: bundle directory {cfg.model} does not exist; give models:/NAME@ALIAS, "
            "models:/NAME/VERSION or the directory jobs/train.py wrote (<storage-path>/<run-name>/model)"
        )
    try:
        resolved = resolve_model(cfg.model, cfg.model_cache)
    except ModelNotFoundError as exc:
        if cfg.model == DEMO_MODEL_URI:
            raise UserError(
                f"{exc}. The demo champion is not registered yet: run `make demo` (or jobs/train.py then "
                "jobs/promote.py) first, or pass --model models:/NAME@ALIAS or a bundle directory"
            ) from exc
        raise
    if resolved.name:
        return TagModel(
            resolved.pinned_uri, resolved.name, str(resolved.version), resolved.alias, resolved.local_dir
        )
    # A bare bundle directory: its name, and the content hash of its fp32 graph as the "version".
    from mlc_ray.bundle import ModelBundle, sha256_file

    digest = sha256_file(ModelBundle(resolved.local_dir).onnx_path)[:12]
    name = os.path.basename(cfg.model.rstrip("/")) or "bundle"
    return TagModel(f"{cfg.model.rstrip('/')}#{digest}", name, f"bundle-{digest}", None, resolved.local_dir)


def load_model_metadata(local_dir: str) -> tuple[list[str], Any, dict]:
    from mlc_ray.bundle import ModelBundle

    bundle = ModelBundle(local_dir)
    # thresholds() refuses a thresholds.json whose labels are not labels.json's
    return bundle.labels(), bundle.thresholds(), bundle.preprocess().to_dict()

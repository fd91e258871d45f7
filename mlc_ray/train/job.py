"""The training job around one stage: hard-sample mining or one ``run_training``, then export + registration.

``run_train_job(cfg)`` is what ``jobs/train.py`` calls: ``cfg.mining.enabled`` runs the mining
pipeline (base -> score -> mine -> fine-tune, ``mlc_ray.train.mining_pipeline``), else one training stage
(``mlc_ray.train.runner.run_training``); with ``cfg.register_as`` the bundle is exported (ONNX, int8
when it passes its gate, ncnn) and registered as a new MLflow model version with the evidence promotion
needs. It sits above both ``runner`` and ``mining`` so neither imports the other's caller.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mlc_ray.train.config import TrainConfig
from mlc_ray.train.runner import TrainResult, run_training

__all__ = ["run_train_job"]

log = logging.getLogger(__name__)


def run_train_job(cfg: TrainConfig) -> TrainResult:
    """The training job: mining pipeline or one stage, then export + registration if ``register_as``."""
    if cfg.mining.enabled:
        from mlc_ray.train.mining_pipeline import run_mining_pipeline

        result = run_mining_pipeline(cfg)
    else:
        result = run_training(cfg)
    if cfg.register_as:
        _export_and_register(cfg, result)
    return result


def _export_and_register(cfg: TrainConfig, result: TrainResult) -> None:
    from mlc_ray.export import export_bundle
    from mlc_ray.provenance import command_line
    from mlc_ray.registry import TrainingEvidence, register_bundle

    calibration, val_images, val_targets = _export_inputs(result)
    export_bundle(  # logs its own report (parity per format, the int8 gate)
        result.bundle_dir, calibration_images=calibration, val_images=val_images, val_targets=val_targets
    )
    version = register_bundle(
        result.bundle_dir,
        cfg.register_as,
        run_id=result.mlflow_run_id,
        command_line=command_line(),
        tags=_version_tags(cfg, result),
        # promotion's default evaluation data, and the images it must not be judged on
        evidence=TrainingEvidence(
            val_manifest=result.val_manifest, val_data_uri=cfg.val_data, train_manifest=result.train_manifest
        ),
    )
    log.info(
        "registered %s version %s (alias challenger)", cfg.register_as, getattr(version, "version", version)
    )


def _version_tags(cfg: TrainConfig, result: TrainResult) -> dict[str, str]:
    """What audits need to know about the data behind a version: the manifest it was trained on and
    the hash of its training rows (the evaluation data is recorded by ``TrainingEvidence``)."""
    from mlc_ray.data.demo import ensure_demo_data

    tags = {"manifest_uri": str(cfg.data) if cfg.data is not None else ensure_demo_data()}
    if result.train_manifest is not None:
        tags["manifest_sha256"] = result.train_manifest.sha256
    return tags


MAX_EXPORT_CALIBRATION = 256  # training images for onnxruntime's int8 calibration
MAX_EXPORT_VAL = 2000  # validation images for the int8 accuracy gate and the parity checks


def _load_pixels(uris: list[str], preprocess: Any) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC pixels from the one image path, mask of the URIs that read and decoded)."""
    from mlc_ray.data.images import read_and_prepare, stack_views

    prepared = [read_and_prepare(uri, preprocess) for uri in uris]
    ok = np.array([p.error is None for p in prepared], dtype=bool)
    return stack_views(prepared, preprocess), ok


def _export_inputs(result: TrainResult) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Calibration images (a seeded sample of the training set) and validation images + targets
    (the first MAX_EXPORT_VAL scored val rows) for export's int8 gate and parity checks."""
    from mlc_ray.bundle import PREPROCESS, local_bundle

    with local_bundle(result.bundle_dir, files=(PREPROCESS,)) as bundle:
        preprocess = bundle.preprocess()
    calibration = None
    if result.train_manifest is not None and len(result.train_manifest):
        rng = np.random.default_rng(0)
        n = min(MAX_EXPORT_CALIBRATION, len(result.train_manifest))
        rows = np.sort(rng.choice(len(result.train_manifest), size=n, replace=False))
        calibration, _ = _load_pixels([result.train_manifest.images[i] for i in rows], preprocess)
    if result.val_manifest is None:
        return calibration, None, None
    rows = result.val_indices[:MAX_EXPORT_VAL]
    val_images, ok = _load_pixels([result.val_manifest.images[i] for i in rows], preprocess)
    return calibration, val_images, result.val_targets[: len(rows)][ok]

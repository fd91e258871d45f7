"""One training stage on Ray Train, end to end: data -> fit -> calibrate -> model bundle -> MLflow.

``run_training(cfg)`` is what ``jobs/train.py`` (and each stage of hard-sample mining) calls:

  [1] read the manifests (``data`` or the built-in demo set), split train/val, build the Ray Data
      datasets (decoding and augmentation happen in Ray Data tasks, not on the driver)
  [2] ``TorchTrainer(train_loop_per_worker)`` with ``RunConfig(name=run_name, storage_path=...)``:
      checkpoints every epoch, keeps the best K by val mAP, recovers from ``max_failures`` worker
      failures; starting the same run name again resumes from its latest checkpoint, and a run
      whose every epoch is checkpointed starts no workers at all (``_finished_run``: steps [3]-[5]
      from its checkpoints)
  [3] from the best checkpoint: weights + the validation scores gathered across workers (single
      view: the pixels tagging produces, ``mlc_ray.data.images``); per-label thresholds fitted on all
      of them (``thresholds.json``) and, for the reported calibrated metrics, cross-fitted over
      ``CALIBRATION_FOLDS`` folds (``cross_fit_thresholds``: each row judged by thresholds fitted
      without it); metrics at 0.5. With ``tta=10crop`` a 10-crop scoring pass adds *evaluation-only*
      metrics (tagging scores one view, so the shipped thresholds stay fitted on single-view scores)
  [4] the model bundle (model.pt, model.json, labels.json, preprocess.json, thresholds.json,
      metrics.json; see docs/internals.md) written under a temporary name, then committed
  [5] MLflow: final metrics, resolved config, label-distribution chart, PR curves, per-label table

The job around it (hard-sample mining, export, registration) is ``mlc_ray.train.job.run_train_job``.

Why ~570 lines: ``run_training`` is one stage that reads top to bottom as the numbered steps above,
and the helpers below it (checkpoint selection and loading, the bundle commit, the 10-crop
evaluation, MLflow artifacts) are each used only by it. The job around a stage (mining, export,
registration) is ``mlc_ray.train.job``; the worker is ``mlc_ray.train.loop``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlc_ray.bundle import SHA256_MANIFEST, TRAINING_FILES
from mlc_ray.train.config import TrainConfig

__all__ = ["TrainResult", "run_training", "HEARTBEAT_ENV"]

log = logging.getLogger(__name__)

# Directory where each worker writes rank-N.json (pid, epoch, phase) while it trains; for operators
# watching a run and for the fault-injection tests that kill a worker mid-run.
HEARTBEAT_ENV = "MLC_RAY_TRAIN_HEARTBEAT_DIR"

BUNDLE_FILES = (*TRAINING_FILES, SHA256_MANIFEST)  # what a training stage commits
CALIBRATION_FOLDS = 5  # cross-fitting folds for the reported calibrated metrics
# Ray Train's record of a run's reported checkpoints, in its run directory
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
# What each reported figure was measured on (the summary, metrics.json "measured_on", MLflow tags).
MEASURED_ON_05 = "validation rows, threshold 0.5 (nothing fitted on them)"


@dataclass
class TrainResult:
    """What one training stage produced."""

    bundle_dir: str  # the committed model bundle
    labels: list[str]
    metrics: dict[str, Any]  # compute_metrics at cross-fitted thresholds (each row: fitted without it)
    metrics_at_05: dict[str, Any]  # compute_metrics at 0.5
    thresholds: Any  # mlc_ray.calibrate.Thresholds
    val_scores: np.ndarray  # (N, L) float32, rows = val_indices
    val_targets: np.ndarray  # (N, L) uint8
    val_indices: np.ndarray  # (N,) rows of the validation manifest, ascending, each once
    mlflow_run_id: str | None
    checkpoint_path: str | None  # the checkpoint the bundle came from
    wall_time_s: float
    images_per_s: float  # training images per second over the epochs this call trained (0 if none)
    epochs_trained: int  # epochs trained by this call (0 when the run was already finished)
    starts: list[int] = field(default_factory=list)  # epoch at which each (re)start of the run began
    val_manifest: Any = None  # the validation Manifest (rows that val_indices point into)
    train_manifest: Any = None  # the training Manifest (int8 calibration images for export)
    run_name: str = ""
    mining_report: Any = None  # mlc_ray.train.mining_report.MiningReport when the job ran hard-sample mining
    measured_on: dict[str, str] = field(default_factory=dict)  # figure -> the data it was measured on
    metrics_10crop: dict[str, Any] | None = None  # tta=10crop: {"at_0.5": ..., "calibrated": ...}

    def summary(self) -> str:
        """The table the job prints: per-label AP/F1, averages at 0.5 and calibrated, speed, run id."""
        from mlc_ray.metrics import format_metrics_table

        m05, mcal = self.metrics_at_05, self.metrics
        lines = [
            f"validation: {len(self.val_indices)} images, {len(self.labels)} labels; "
            f"thresholds: {self.thresholds.method}, fitted on all {len(self.val_indices)} validation images "
            "(thresholds.json)",
            *collapsed_labels_note(self.thresholds.fallback_labels, len(self.labels)),
            "",
            "at cross-fitted thresholds (" + self.measured_on.get("calibrated", "cross-fitted") + "):",
            format_metrics_table(mcal, self.labels),
            "",
            f"{'':<22}{'@0.5':>10}{'calibrated (cross-fitted)':>28}",
        ]
        for key in ("mAP", "micro_f1", "macro_f1", "samples_f1"):
            lines.append(f"{key:<22}{m05[key]:>10.4f}{mcal[key]:>28.4f}")
        if self.metrics_10crop:
            t05, tcal = self.metrics_10crop["at_0.5"], self.metrics_10crop["calibrated"]
            lines.append("10-crop (evaluation only: tagging scores one view with the single-view thresholds)")
            for key in ("mAP", "micro_f1", "macro_f1"):
                lines.append(f"{'  10crop ' + key:<22}{t05[key]:>10.4f}{tcal[key]:>28.4f}")
        lines += ["", "measured on:"] + [f"  {k}: {v}" for k, v in self.measured_on.items()]
        if self.mining_report is not None:
            lines += [
                "",
                "hard-sample mining, base vs mined vs random fine-tune (held-out rows):",
                self.mining_report.to_markdown(),
            ]
        stage = "fine-tune stage: " if self.mining_report is not None else ""  # the model this job ships
        lines += [
            "",
            f"{stage}wall time {self.wall_time_s:.1f} s, {self.epochs_trained} epoch{'' if self.epochs_trained == 1 else 's'} trained "
            f"({starts_text(self.starts, self.epochs_trained)}), {self.images_per_s:.1f} training images/s",
            f"model bundle: {self.bundle_dir}",
            f"MLflow run id: {self.mlflow_run_id}",
        ]
        return "\n".join(lines)


# ---- helpers -------------------------------------------------------------------------------------


def collapsed_labels_note(fallback_labels: dict[str, str], num_labels: int) -> list[str]:
    """The summary's warning when labels scored every validation image alike: the model has not
    learned them (seen: a 3-epoch MobileNetV3-Small at the default lr scored 0.48121 everywhere), and
    the calibration log line that lists them is easy to miss above the table."""
    flat = [label for label, reason in fallback_labels.items() if reason.startswith("constant scores")]
    if not flat:
        return []
    listed = ", ".join(flat[:10]) + (", ..." if len(flat) > 10 else "")
    return [
        f"WARNING: {len(flat)} of {num_labels} labels score every validation image alike ({listed}): the "
        "model has not learned them; they keep the fallback threshold. Train longer, or another --lr."
    ]


def describe_train_data(data: Any) -> str:
    """The job's first lines: the split sizes, then the training rows' label statistics (headed as the
    training rows: "manifest M: 240 images" read as if M held no validation rows)."""
    from mlc_ray.data.manifest import label_statistics

    stats = label_statistics(data.train)
    stats.source = f"{data.source} (training rows)"
    return (
        f"training data {data.source}: {len(data.train)} train / {len(data.val)} val images\n{stats.format()}"
    )


def starts_text(starts: list[int], epochs_trained: int) -> str:
    """``starts`` (0-based epoch of each start of the run) as the 1-based epochs the log prints:
    [0, 3] -> "started at epoch 1, resumed at epoch 4"; a last start that had nothing left to train
    (``epochs_trained`` 0) says so."""
    if not starts:
        return "no start recorded"
    words = [f"{'started' if i == 0 else 'resumed'} at epoch {s + 1}" for i, s in enumerate(starts)]
    if epochs_trained == 0:
        words[-1] = ("started" if len(starts) == 1 else "resumed") + " with every epoch already trained"
    return ", ".join(words)


def _cpus_per_worker(cfg: TrainConfig) -> float:
    """CPU workers leave at least one CPU to Ray Data's decode tasks (else ingest starves)."""
    if cfg.cpus_per_worker is not None:
        return float(cfg.cpus_per_worker)
    if cfg.use_gpu:
        return 1.0
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.25, min(1.0, (total - 1.0) / cfg.num_workers))


def _storage_args(storage_path: str) -> dict[str, Any]:
    from mlc_ray import storage

    if storage.is_s3(storage_path):
        fs, path = storage.arrow_filesystem(storage_path)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": os.path.abspath(storage_path)}


def _checkpoint_label(checkpoint: Any) -> str:
    fs = getattr(checkpoint, "filesystem", None)
    path = str(checkpoint.path)
    if fs is not None and getattr(fs, "type_name", "") == "s3":
        return f"s3://{path}"
    return path


def _finished_run(cfg: TrainConfig) -> tuple[Any, list[int]] | None:
    """``(Result, starts)`` when every epoch of ``cfg`` is already checkpointed in its run directory
    (``starts``: the checkpoint's, then this start, as the worker loop records a start that finds
    nothing to train); else None. Ray Train's workers would load that checkpoint and stop, after a
    controller, a worker group and the datasets had started (15-35 s on 2 CPUs)."""
    from ray.train import Result

    from mlc_ray import storage
    from mlc_ray.train.loop import META_FILE

    if not storage.exists(storage.join(cfg.run_dir, RAY_TRAIN_SNAPSHOT)):
        return None
    where = _storage_args(cfg.run_dir)
    # its INFO on reading the snapshot tells a Ray Train user to rename the run or delete the folder:
    # advice for starting over, not for this read
    ray_log = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = ray_log.level
    ray_log.setLevel(logging.WARNING)
    try:
        result = Result.from_path(where["storage_path"], storage_filesystem=where.get("storage_filesystem"))
    finally:
        ray_log.setLevel(level)
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / META_FILE).read_text())
    next_epoch = int(meta["epoch"]) + 1
    if next_epoch < cfg.epochs:
        return None
    return result, [*(int(x) for x in meta.get("starts", [])), next_epoch]


def _pick_checkpoint(result: Any) -> Any:
    """The best reported checkpoint by val mAP (ties: the later), else the latest."""
    best = None
    for checkpoint, metrics in result.best_checkpoints or []:
        score = (float(metrics.get("val_mAP", -math.inf)), int(metrics.get("epoch", -1)))
        if best is None or score > best[0]:
            best = (score, checkpoint)
    return best[1] if best is not None else result.checkpoint


def _load_checkpoint(checkpoint: Any) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    import torch

    from mlc_ray.train.loop import META_FILE, STATE_FILE, VAL_SCORES_FILE

    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        with np.load(Path(d) / VAL_SCORES_FILE) as npz:
            val = {k: npz[k] for k in npz.files}
        meta = json.loads((Path(d) / META_FILE).read_text())
    return state, val, meta


def _model_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The ImageTagger state dict to ship: the EMA weights when the run kept an EMA."""
    ema = state.get("ema")
    if ema:
        prefix = "module."
        return {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}
    return state["model"]


def _commit_bundle(local_dir: Path, target: str) -> None:
    """Local: build beside the target, then swap by rename. S3: upload each file (atomic per object),
    metrics.json then sha256.json last, so a reader that sees them sees a complete bundle."""
    from mlc_ray import storage

    if storage.is_s3(target):
        names = sorted(p.name for p in local_dir.iterdir())
        names.sort(key=lambda n: (n == SHA256_MANIFEST, n == "metrics.json"))
        for name in names:
            storage.upload_file(local_dir / name, storage.join(target, name))
        return
    target_path = Path(target).resolve()
    target_path.parent.mkdir(parents=True, exist_ok=True)
    staging = target_path.with_name(f"{target_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(local_dir, staging)
    old = None
    if target_path.exists():
        old = target_path.with_name(f"{target_path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target_path, old)
    os.replace(staging, target_path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _loop_config(cfg: TrainConfig, data: Any, preprocess: Any, spec: dict, **extra: Any) -> dict[str, Any]:
    from mlc_ray.config import config_to_dict

    world = cfg.num_workers
    per_rank_rows = len(data.train) // world
    return {
        "cfg": config_to_dict(cfg),
        "labels": list(data.vocabulary),
        "preprocess": preprocess.to_dict(),
        "model_spec": spec,
        "num_train": len(data.train),
        "num_val": len(data.val),
        "steps_per_epoch": max(1, math.ceil(per_rank_rows / cfg.per_worker_batch_size)),
        "heartbeat_dir": os.environ.get(HEARTBEAT_ENV),
        **extra,
    }


# ---- the stage -----------------------------------------------------------------------------------


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train one model on Ray Train, calibrate it and write its bundle; see the module docstring."""
    import mlflow
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mlc_ray import storage
    from mlc_ray.bundle import (
        LABEL_RATES,
        LABELS,
        METRICS,
        MODEL_JSON,
        PREPROCESS,
        THRESHOLDS,
        WEIGHTS,
        ModelBundle,
    )
    from mlc_ray.calibrate import cross_fit_thresholds
    from mlc_ray.cli import JobError, check_gpus_for, init_ray
    from mlc_ray.config import config_to_yaml
    from mlc_ray.data.demo import ensure_demo_data
    from mlc_ray.metrics import compute_metrics, jsonable_metrics, scalar_metrics
    from mlc_ray.models import build_tagger, model_spec
    from mlc_ray.progress import quiet_ray_progress
    from mlc_ray.provenance import command_line, git_commit
    from mlc_ray.tagging.report import expected_label_rates
    from mlc_ray.train import tracking
    from mlc_ray.train.data import BadImageLog, ValShardingConfig, build_dataset, load_train_val
    from mlc_ray.train.fingerprint import check_run_fingerprint, run_fingerprint
    from mlc_ray.train.loop import train_loop_per_worker
    from mlc_ray.train.losses import pos_weight_from_frequency

    t_start = time.perf_counter()
    if cfg.data is None:
        cfg = cfg.replace(data=ensure_demo_data())
        log.info("no --data given: training on the built-in demo set %s", cfg.data)

    # [1] data
    data = load_train_val(
        str(cfg.data), val_data=cfg.val_data, labels=cfg.labels, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    labels = list(data.vocabulary)
    log.info("%s", describe_train_data(data))
    preprocess = cfg.preprocess_config()
    spec = model_spec(cfg.model, len(labels), width=cfg.width, dropout=cfg.dropout)
    _check_start_files(cfg, spec, preprocess)  # a missing/unfitting --pretrained fails before any worker
    if cfg.output is not None:  # where the bundle goes after the last epoch: checked before the first
        storage.check_local_dir(cfg.output, "--output")
    check_run_fingerprint(cfg, run_fingerprint(cfg, data))  # a resumed run must be the same run
    train_targets, val_targets_all = data.train_targets, data.val_targets

    # a rerun of a finished run builds its bundle from the checkpoint, without Ray Train's workers
    finished = _finished_run(cfg)
    if finished is None or cfg.tta == "10crop":  # the 10-crop evaluation scores on Ray Data
        init_ray(keep_dashboard=True)  # Ray Train's placement-group cleaner needs the state API
        if cfg.use_gpu:
            check_gpus_for("--use-gpu")  # none on a local Ray: an error; on a cluster: its autoscaler
        quiet_ray_progress()  # before the datasets exist: their split coordinator copies this context
    if finished is None:
        bad_log = BadImageLog()
        datasets = {
            "train": build_dataset(
                data.train,
                labels,
                split="train",
                preprocess=preprocess,
                bad_image_log=bad_log,
                augment=cfg.augment,
            ),
            "val": build_dataset(data.val, labels, split="val", preprocess=preprocess, bad_image_log=bad_log),
        }
    pos_weight = pos_weight_from_frequency(train_targets).tolist() if cfg.pos_weight else None
    tracking_uri = tracking.resolve_tracking_uri()
    tags = {
        "mlc_ray.run_name": str(cfg.run_name),
        "mlc_ray.storage_path": cfg.run_dir,
        "manifest_sha256": data.train.sha256,
        "manifest_uri": data.source,
        "command_line": command_line(),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit

    with tracking.training_run(
        cfg.experiment, str(cfg.run_name), tracking_uri=tracking_uri, tags=tags
    ) as run:
        run_id = run.info.run_id
        try:
            mlflow.log_params(tracking.flatten_params({**_config_params(cfg), "num_labels": len(labels)}))
        except mlflow.exceptions.MlflowException as exc:  # same key, other value: a resumed run
            log.warning("MLflow params not logged: %s", exc)
        mlflow.log_text(config_to_yaml(cfg), "config.yaml")
        _log_bytes(
            tracking.label_distribution_png(train_targets, val_targets_all, labels), "label_distribution.png"
        )

        # [2] fit (or, for a finished run, what its workers would find: every epoch checkpointed)
        if finished is not None:
            result, starts_so_far = finished
            returned = {"epochs_trained": 0, "starts": starts_so_far}
            log.info(
                "all %d epochs of run '%s' are already checkpointed: nothing to train (no Ray Train "
                "workers started); the bundle is built from its checkpoints",
                cfg.epochs,
                cfg.run_name,
            )
        else:
            cpus = _cpus_per_worker(cfg)  # from the cluster's CPUs: Ray is up on this path
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=_loop_config(
                    cfg,
                    data,
                    preprocess,
                    spec,
                    pos_weight=pos_weight,
                    bad_image_log=bad_log,
                    mlflow_tracking_uri=tracking_uri,
                    mlflow_run_id=run_id,
                ),
                scaling_config=ScalingConfig(
                    num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus}
                ),
                run_config=RunConfig(
                    name=str(cfg.run_name),
                    checkpoint_config=CheckpointConfig(
                        num_to_keep=cfg.keep_checkpoints,
                        checkpoint_score_attribute="val_mAP",
                        checkpoint_score_order="max",
                    ),
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                    # Ray Train's own INFO lines (a TrainingReport dump per epoch, checkpoint paths) go to
                    # the log files Ray keeps (its system logs hold every level); the console gets the
                    # loop's one line per epoch
                    logging_config=LoggingConfig(log_level="WARNING"),
                    **_storage_args(cfg.storage_path),
                ),
                datasets=datasets,
                dataset_config=ValShardingConfig.create(),
            )
            log.info(
                "Ray Train: %d worker(s) x %.2g CPU%s, run '%s' in %s",
                cfg.num_workers,
                cpus,
                " + 1 GPU" if cfg.use_gpu else "",
                cfg.run_name,
                cfg.storage_path,
            )
            try:
                result = trainer.fit()
                bad_entries = ray.get(bad_log.entries.remote())
            finally:
                # the log is this run's actor: without this it outlived the run in a driver that goes
                # on (five idle log processes after the mining pipeline's stages in one process)
                ray.kill(bad_log)
            if bad_entries:
                _log_bytes(_bad_images_csv(bad_entries).encode(), "bad_images.csv")
            returned = result.return_value if isinstance(result.return_value, dict) else {}
            if returned.get("aborted"):
                raise JobError(str(returned["aborted"]), exit_code=1)
        checkpoint = _pick_checkpoint(result)
        if checkpoint is None:
            raise JobError(
                f"run '{cfg.run_name}' in {cfg.storage_path} has no checkpoint to build a model from",
                exit_code=1,
            )

        # [3] weights + validation scores of the chosen epoch
        state, val, meta = _load_checkpoint(checkpoint)
        starts = [int(x) for x in returned.get("starts", meta.get("starts", []))]
        epochs_trained = int(returned.get("epochs_trained", 0))
        tagger = build_tagger(spec, preprocess)
        tagger.load_state_dict(_model_weights(state))
        tagger.eval()
        val_index = np.asarray(val["index"], dtype=np.int64)
        val_scores = np.asarray(val["scores"], dtype=np.float32)
        val_targets = np.asarray(val["targets"], dtype=np.uint8)

        with tempfile.TemporaryDirectory(prefix="mlc_ray-bundle-") as tmp:
            bundle = Path(tmp)
            buf = io.BytesIO()
            torch.save(tagger.state_dict(), buf)
            (bundle / WEIGHTS).write_bytes(buf.getvalue())
            (bundle / MODEL_JSON).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
            (bundle / LABELS).write_text(json.dumps(labels, indent=2) + "\n")
            (bundle / PREPROCESS).write_text(preprocess.to_json())
            # Thresholds are fitted on single-view scores, the way tagging and pyfunc score; the
            # calibrated figures come from cross-fitting (never from the rows a threshold was fitted on).
            crossfit = cross_fit_thresholds(
                val_scores,
                val_targets,
                labels,
                method=cfg.calibration,
                folds=CALIBRATION_FOLDS,
                seed=cfg.seed,
            )
            thresholds = crossfit.thresholds
            m05 = compute_metrics(val_scores, val_targets, 0.5, labels=labels)
            mcal = compute_metrics(val_scores, val_targets, crossfit.row_thresholds, labels=labels)
            n_val = len(val_index)
            measured_on = {
                "at_0.5": f"{n_val} {MEASURED_ON_05}",
                "calibrated": f"{n_val} validation rows, {crossfit.description}",
                "thresholds.json": f"fitted on all {n_val} validation rows, single-view scores",
                "checkpoint": f"epoch chosen by val mAP on the same {n_val} rows (threshold-free)",
            }
            metrics_10crop = None
            if cfg.tta == "10crop":
                metrics_10crop = _evaluate_10crop(str(bundle), data.val, labels, cfg)
                measured_on["10crop"] = (
                    f"{n_val} validation rows scored with 10 crops (evaluation only; tagging scores one view)"
                )
            (bundle / THRESHOLDS).write_text(thresholds.to_json())
            # what tagging's drift check compares each run with (mlc_ray.tagging.report)
            rates = expected_label_rates(val_scores, thresholds.values, labels)
            (bundle / LABEL_RATES).write_text(json.dumps(rates, indent=2) + "\n")
            metrics_doc = {
                "calibrated": jsonable_metrics(mcal, labels),
                "at_0.5": jsonable_metrics(m05, labels),
                "measured_on": measured_on,
                # the same as measured_on["thresholds.json"], for programs (promotion's in-sample note)
                "thresholds_fitted_on": {"rows": "validation", "count": n_val, "scores": "single-view"},
                "calibration": thresholds.method,
                "calibration_folds": crossfit.folds,
                "tta": cfg.tta,
                "epoch": int(meta.get("epoch", -1)),
                "run_name": cfg.run_name,
                "mlflow_run_id": run_id,
                "manifest_sha256": data.train.sha256,
            }
            if metrics_10crop is not None:
                metrics_doc["tta_10crop"] = {
                    k: jsonable_metrics(v, labels) for k, v in metrics_10crop.items()
                }
            (bundle / METRICS).write_text(json.dumps(metrics_doc, indent=2, sort_keys=True) + "\n")
            ModelBundle(bundle).write_manifest()
            _commit_bundle(bundle, cfg.bundle_dir)

        # [5] final MLflow records
        wall = time.perf_counter() - t_start
        images_per_s = _images_per_s(result) if epochs_trained else 0.0
        # names say the data: val_at05_* (validation, 0.5), val_cv_cal_* (validation, cross-fitted thresholds)
        mlflow.log_metrics({**scalar_metrics(m05, "val_at05_"), **scalar_metrics(mcal, "val_cv_cal_")})
        if metrics_10crop is not None:
            mlflow.log_metrics(
                {
                    **scalar_metrics(metrics_10crop["at_0.5"], "val_10crop_at05_"),
                    **scalar_metrics(metrics_10crop["calibrated"], "val_10crop_cv_cal_"),
                }
            )
        mlflow.set_tags({f"measured_on.{k}": v for k, v in measured_on.items()})
        mlflow.log_metrics({"wall_time_s": wall, "train_images_per_s": images_per_s})
        _log_bytes(tracking.pr_curves_png(val_scores, val_targets, labels), "pr_curves.png")
        csv, md = tracking.per_label_table(m05, mcal, thresholds.values, labels)
        mlflow.log_text(csv, "per_label_metrics.csv")
        mlflow.log_text(md, "per_label_metrics.md")
        mlflow.log_text(thresholds.to_json(), "thresholds.json")
        mlflow.set_tags({"mlc_ray.starts": json.dumps(starts), "mlc_ray.bundle_dir": cfg.bundle_dir})

    return TrainResult(
        bundle_dir=cfg.bundle_dir,
        labels=labels,
        metrics=mcal,
        metrics_at_05=m05,
        thresholds=thresholds,
        val_scores=val_scores,
        val_targets=val_targets,
        val_indices=val_index,
        mlflow_run_id=run_id,
        checkpoint_path=_checkpoint_label(checkpoint),
        wall_time_s=wall,
        images_per_s=images_per_s,
        epochs_trained=epochs_trained,
        starts=starts,
        val_manifest=data.val,
        train_manifest=data.train,
        run_name=str(cfg.run_name),
        measured_on=measured_on,
        metrics_10crop=metrics_10crop,
    )


def _check_start_files(cfg: TrainConfig, spec: dict, preprocess: Any) -> None:
    """Build the model once on the driver (loading ``--pretrained``) and check ``--init-from`` exists,
    so that a wrong file is one clear error before Ray Train starts a worker."""
    from mlc_ray import storage
    from mlc_ray.config import ConfigError
    from mlc_ray.models import build_tagger

    if cfg.init_from and not (
        storage.exists(cfg.init_from) or storage.exists(storage.join(cfg.init_from, "model.pt"))
    ):
        raise ConfigError(f"init_from: {cfg.init_from} does not exist; give a model bundle dir or checkpoint")
    if cfg.pretrained and not storage.exists(cfg.pretrained):
        raise ConfigError(
            f"pretrained: {cfg.pretrained} does not exist; give a state-dict file (torchvision layout ok)"
        )
    try:
        build_tagger(spec, preprocess, pretrained=cfg.pretrained)
    except ValueError as exc:  # a file of another arch/width, or not a state dict
        if not cfg.pretrained:
            raise
        raise ConfigError(f"pretrained: {exc}") from None


def _images_per_s(result: Any) -> float:
    df = result.metrics_dataframe
    if df is None or "train_images_per_s" not in df:
        return 0.0
    return float(df["train_images_per_s"].mean())


def _config_params(cfg: TrainConfig) -> dict[str, Any]:
    from mlc_ray.config import config_to_dict

    return config_to_dict(cfg)


def _log_bytes(data: bytes, name: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        mlflow.log_artifact(str(path))


def _bad_images_csv(entries: list[dict[str, Any]]) -> str:
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["split", "index", "uri", "code", "message"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(entries)
    return buf.getvalue()


def _evaluate_10crop(bundle_dir: str, val: Any, labels: list[str], cfg: TrainConfig) -> dict[str, Any]:
    """``--tta 10crop``: metrics of 10-crop scores, at 0.5 and at thresholds cross-fitted on 10-crop
    scores. Evaluation only: tagging scores one view, and thresholds.json is fitted on single-view
    scores, so nothing here changes what ships."""
    from mlc_ray.calibrate import cross_fit_thresholds
    from mlc_ray.metrics import compute_metrics
    from mlc_ray.train.scoring import score_manifest

    scored = score_manifest(bundle_dir, val, tta="10crop")
    crossfit = cross_fit_thresholds(
        scored.scores, scored.targets, labels, method=cfg.calibration, folds=CALIBRATION_FOLDS, seed=cfg.seed
    )
    return {
        "at_0.5": compute_metrics(scored.scores, scored.targets, 0.5, labels=labels),
        "calibrated": compute_metrics(scored.scores, scored.targets, crossfit.row_thresholds, labels=labels),
    }

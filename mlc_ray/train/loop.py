"""The Ray Train worker loop: one function every training worker runs (DDP over N CPUs or GPUs).

``train_loop_per_worker(config)`` is handed to ``TorchTrainer`` by ``mlc_ray.train.runner``. Per epoch:

  [1] train on this worker's shard of ``train`` (``iter_torch_batches``; uint8 NHWC pixels, the
      ImageTagger normalises on the device); each batch is ``mlc_ray.train.step.train_step`` (Ray-free:
      AMP on GPU, bf16 where supported, else fp16 + scaler; channels-last on GPU); per-step warm-up +
      cosine or one-cycle schedule; optional EMA of weights
  [2] score this worker's shard of ``val`` (split without dropping rows), all-gather (index, scores,
      targets) to every rank, dedupe by index: every val image is counted exactly once, which rank 0
      checks against the number of val images that decoded
  [3] rank 0 computes the metrics (``compute_metrics``) and logs them to the driver's MLflow run
  [4] every worker calls ``ray.train.report`` once per epoch with the same metrics; rank 0 attaches
      the checkpoint (``state.pt``: model, optimiser, scheduler, scaler, EMA, epoch, best mAP,
      ``starts``; ``val_scores.npz``: the gathered validation scores; ``meta.json``)

Resume: ``ray.train.get_checkpoint()`` at start (after a worker failure, or when a run is started
again under the same name) restores everything and continues with the next epoch; a run whose last
epoch is already checkpointed trains nothing. ``starts`` records the epoch of every (re)start.

Too many undecodable images (``max_error_rate``) end the run cleanly: every worker reports an
``aborted`` message and returns, so Ray Train does not retry a data problem; the runner raises it.

Why just over 400 lines: it is the one Ray Train worker function and the state it checkpoints;
splitting the per-epoch steps out would scatter the order the loop reports in, which Ray Train V2
requires to be identical on every worker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlc_ray.progress import format_eta

__all__ = ["train_loop_per_worker", "lr_factor", "STATE_FILE", "VAL_SCORES_FILE", "META_FILE"]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
VAL_SCORES_FILE = "val_scores.npz"
META_FILE = "meta.json"


def lr_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Warm-up + cosine: linear from ~0 to 1 over ``warmup_steps``, then cosine down to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_gather(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sync_buffers(model: Any) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Each rank updates them on its
    own batches, and the model that ships is rank 0's: validation on the other ranks must score
    with the same statistics, or the thresholds are fitted on scores no shipped model produces."""
    dist = _dist()
    if dist is None:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def _init_weights(tagger: Any, uri: str) -> None:
    """Fine-tune start: a bundle dir (its model.pt), a checkpoint dir (state.pt) or a state-dict file."""
    from mlc_ray import storage
    from mlc_ray.bundle import WEIGHTS
    from mlc_ray.models import load_pretrained

    for name in (WEIGHTS, STATE_FILE):
        candidate = storage.join(uri, name)
        if storage.exists(candidate):
            uri = candidate
            break
    report = load_pretrained(tagger.backbone, uri)
    log.info("initialised from %s (%s)", uri, report)


def _write_heartbeat(directory: str | None, rank: int, **fields: Any) -> None:
    """Progress file per rank (pid, epoch): lets operators and tests find a live worker process."""
    if not directory:
        return
    path = Path(directory) / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "rank": rank, "time": time.time(), **fields}))
    os.replace(tmp, path)


def _drop_report_dumps() -> None:
    """Drop Ray Train's INFO line per ``ray.train.report`` (a ``TrainingReport(checkpoint=...,
    metrics={...})`` dump per epoch and worker). Its logger is named by the module's file path, not
    ``ray.train.*``, so ``LoggingConfig(log_level=...)`` does not reach it (Ray 2.60); the same
    metrics are in the loop's own epoch line, in MLflow and in each checkpoint."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to drop
        return

    class _NoReportDump(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (
                record.levelno < logging.WARNING and "Reporting training result" in record.getMessage()
            )

    logger = logging.getLogger(train_context.__file__)
    if not any(isinstance(f, _NoReportDump) or type(f).__name__ == "_NoReportDump" for f in logger.filters):
        logger.addFilter(_NoReportDump())


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The body of every Ray Train worker; ``config`` is built by ``runner._loop_config``.

    Returns (rank 0's value reaches the driver as ``Result.return_value``) the epochs this call
    trained and the ``starts`` history.
    """
    import ray.train
    import ray.train.torch
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from mlc_ray.cli import setup_logging
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.metrics import compute_metrics, scalar_metrics
    from mlc_ray.models import build_tagger
    from mlc_ray.train.losses import build_loss
    from mlc_ray.train.step import (
        amp_dtype_for,
        autocast,
        build_optimizer,
        make_grad_scaler,
        to_device,
        train_step,
    )
    from mlc_ray.train.tracking import EpochLogger

    setup_logging()
    cfg: dict[str, Any] = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _drop_report_dumps()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    np.random.seed(cfg["seed"] + rank)

    # [0] model, optimiser, schedule, loss
    preprocess = PreprocessConfig.from_dict(config["preprocess"])
    tagger = build_tagger(config["model_spec"], preprocess, pretrained=cfg["pretrained"])
    if cfg.get("init_from"):
        _init_weights(tagger, cfg["init_from"])
    # channels-last weights on CPU too: the batch arrives NHWC (ImageTagger's permute is a view), so
    # conv backward returns channels-last grads; contiguous MobileNetV1 depthwise weights then made
    # DDP warn "Grad strides do not match bucket view strides" on every worker and copy those grads
    # out of its buckets. CPU step time the same either way (2026-12-06, AMD EPYC, 1 thread, batch 32
    # at 96 px, channels-last / contiguous: MobileNetV1 x0.5 1.04, V2 0.96, V3-Large 1.02, 3 runs each)
    tagger = to_device(tagger, device, channels_last=True)
    ema = (
        AveragedModel(tagger, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema_decay"]), use_buffers=True)
        if cfg["ema"]
        else None
    )
    model = ray.train.torch.prepare_model(tagger)
    optimizer = build_optimizer(tagger, cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = int(config["steps_per_epoch"])
    total_steps = max(1, steps_per_epoch * cfg["epochs"])
    warmup_steps = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    if cfg["schedule"] == "onecycle":
        scheduler: Any = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg["lr"],
            total_steps=total_steps,
            pct_start=max(0.01, min(0.5, warmup_steps / total_steps)),
            cycle_momentum=cfg["optimizer"] == "sgd",
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup_steps)
        )
    pos_weight = config.get("pos_weight")
    criterion = build_loss(
        cfg["loss"],
        num_labels=len(config["labels"]),
        label_smoothing=cfg["label_smoothing"],
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32),
        gamma_neg=cfg.get("asl_gamma_neg", 4.0),
        gamma_pos=cfg.get("asl_gamma_pos", 0.0),
        clip=cfg.get("asl_clip", 0.05),
    ).to(device)
    log.info("loss: %r", criterion)
    amp_dtype = amp_dtype_for(device.type, bool(cfg["amp"]))  # bf16 / fp16 on GPU, None (fp32) on CPU
    scaler = make_grad_scaler(device.type, amp_dtype)

    # [0b] resume
    start_epoch, best_map, starts, images_seen = 0, float("-inf"), [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        tagger.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch = int(state["epoch"]) + 1
        best_map = float(state["best_map"])
        starts = [int(x) for x in state.get("starts", [])]
        images_seen = int(state.get("images_seen", 0))
        if rank == 0:
            log.info("resuming from the checkpoint after epoch %d/%d", start_epoch, cfg["epochs"])
    starts.append(start_epoch)
    if start_epoch >= cfg["epochs"]:
        if rank == 0:
            log.info("all %d epochs are already checkpointed: nothing to train", cfg["epochs"])
        return {"epochs_trained": 0, "starts": starts}

    tracker = (
        EpochLogger(config.get("mlflow_tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else None
    )
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    dtypes = {"image": torch.uint8, "target": torch.float32, "index": torch.int64}
    per_worker = cfg["batch_size"] // world
    labels = list(config["labels"])
    bad_log = config.get("bad_image_log")

    t_loop = time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        _write_heartbeat(config.get("heartbeat_dir"), rank, epoch=epoch, phase="train")
        t0 = time.perf_counter()
        # [1] train
        model.train()
        loss_sum, n_seen = 0.0, 0
        for batch in train_shard.iter_torch_batches(
            batch_size=per_worker, dtypes=dtypes, device=device, local_shuffle_buffer_size=per_worker * 4
        ):
            images, targets = batch["image"], batch["target"]
            loss = train_step(
                model,
                images,
                targets,
                criterion=criterion,
                optimizer=optimizer,
                scaler=scaler,
                amp_dtype=amp_dtype,
            )
            if scheduler.last_epoch < total_steps - 1 or cfg["schedule"] != "onecycle":
                scheduler.step()
            if ema is not None:
                ema.update_parameters(tagger)
            loss_sum += float(loss) * images.shape[0]
            n_seen += int(images.shape[0])
        train_time = time.perf_counter() - t0
        totals = _all_gather((loss_sum, n_seen, train_time))
        global_seen = sum(t[1] for t in totals)
        images_seen += global_seen
        train_loss = sum(t[0] for t in totals) / max(1, global_seen)

        # [2] validate: each rank scores its shard, every rank gets all of it
        _write_heartbeat(config.get("heartbeat_dir"), rank, epoch=epoch, phase="val")
        eval_model = (ema.module if ema is not None else tagger).eval()
        _sync_buffers(eval_model)
        idx_parts, score_parts, target_parts = [], [], []
        with torch.inference_mode():
            for batch in val_shard.iter_torch_batches(
                batch_size=per_worker * 2, dtypes=dtypes, device=device
            ):
                with autocast(device.type, amp_dtype):
                    logits = eval_model(batch["image"])
                score_parts.append(torch.sigmoid(logits.float()).cpu().numpy())
                idx_parts.append(batch["index"].cpu().numpy())
                target_parts.append(batch["target"].cpu().numpy().astype(np.uint8))
        n_labels = len(labels)
        local = (
            np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64),
            np.concatenate(score_parts) if score_parts else np.zeros((0, n_labels), np.float32),
            np.concatenate(target_parts) if target_parts else np.zeros((0, n_labels), np.uint8),
        )
        gathered = _all_gather(local)
        val_index = np.concatenate([g[0] for g in gathered])
        val_scores = np.concatenate([g[1] for g in gathered])
        val_targets = np.concatenate([g[2] for g in gathered])
        n_gathered = int(val_index.size)
        val_index, first = np.unique(val_index, return_index=True)  # sorted, each image once
        val_scores, val_targets = val_scores[first], val_targets[first]

        # [3] metrics, error ceiling (rank 0 decides, everyone follows)
        decision: dict[str, Any] = {}
        if rank == 0:
            bad_train = bad_val = 0
            bad_entries: list[dict[str, Any]] = []
            if bad_log is not None:
                import ray as _ray

                bad_entries = _ray.get(bad_log.entries.remote())
                bad_train = sum(1 for e in bad_entries if e["split"] == "train")
                bad_val = sum(1 for e in bad_entries if e["split"] == "val")
            n_train, n_val = int(config["num_train"]), int(config["num_val"])
            if n_gathered != val_index.size or val_index.size != n_val - bad_val:
                raise RuntimeError(
                    f"validation gathered {n_gathered} rows ({val_index.size} distinct) but {n_val} val "
                    f"images minus {bad_val} undecodable were expected: a sharding bug"
                )
            error_rate = (bad_train + bad_val) / max(1, n_train + n_val)
            metrics = compute_metrics(val_scores, val_targets, 0.5, labels=labels)
            decision = {
                "epoch": epoch,
                "train_loss": train_loss,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "epoch_time_s": time.perf_counter() - t0,
                "train_images_per_s": global_seen / max(1e-9, max(t[2] for t in totals)),
                "val_images": int(val_index.size),
                "bad_images": bad_train + bad_val,
                "error_rate": error_rate,
                **scalar_metrics(metrics, prefix="val_"),
            }
            decision.setdefault("val_mAP", 0.0)
            if error_rate > cfg["max_error_rate"]:
                examples = "; ".join(f"{e['uri']} [{e['code']}]" for e in bad_entries[:5])
                decision["aborted"] = (
                    f"{bad_train + bad_val} of {n_train + n_val} images could not be read or decoded "
                    f"(error rate {error_rate:.2%} > max_error_rate {cfg['max_error_rate']:.2%}), e.g. "
                    f"{examples}. Fix or remove them from the manifest, or raise --max-error-rate."
                )
        decision = _broadcast(decision)
        if "aborted" in decision:
            ray.train.report(decision)
            return {"epochs_trained": epoch - start_epoch, "starts": starts, "aborted": decision["aborted"]}

        # [4] checkpoint + report (same number of reports on every rank; rank 0 brings the files)
        best_map = max(best_map, decision["val_mAP"])
        decision["best_val_mAP"] = best_map
        if tracker is not None:
            tracker.log_epoch(decision, step=epoch)
        if rank == 0:
            ckpt_dir = tempfile.mkdtemp(prefix="mlc_ray-ckpt-")
            state = {
                "model": tagger.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch,
                "best_map": best_map,
                "starts": starts,
                "images_seen": images_seen,
            }
            torch.save(state, Path(ckpt_dir) / STATE_FILE)
            np.savez(
                Path(ckpt_dir) / VAL_SCORES_FILE, index=val_index, scores=val_scores, targets=val_targets
            )
            meta = {
                "epoch": epoch,
                "metrics": decision,
                "starts": starts,
                "images_seen": images_seen,
                "loss": repr(criterion),  # the loss as built, settings included
                "lr": scheduler.get_last_lr()[0],  # after this epoch's last step
            }
            (Path(ckpt_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            try:
                ray.train.report(decision, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
            finally:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            # one line per epoch for people reading the job's log (ETA: this start's mean epoch time)
            spent = time.perf_counter() - t_loop
            eta = spent / (epoch + 1 - start_epoch) * (cfg["epochs"] - epoch - 1)
            log.info(
                "epoch %d/%d: train loss %.4f, val mAP %.4f, macro-F1@0.5 %.4f, %.1f images/s, ETA %s",
                epoch + 1,
                cfg["epochs"],
                train_loss,
                decision["val_mAP"],
                decision.get("val_macro_f1", float("nan")),
                decision["train_images_per_s"],
                format_eta(eta),
            )
        else:
            ray.train.report(decision, checkpoint=None)
    return {"epochs_trained": cfg["epochs"] - start_epoch, "starts": starts}

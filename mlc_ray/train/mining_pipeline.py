"""The hard-sample mining job: base -> score -> mine -> fine-tune (and the random-subset control), one
parent MLflow run with a nested run per stage; the stages and the selection rules are described in
``mlc_ray.train.mining``, the report in ``mlc_ray.train.mining_report``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from mlc_ray.train.config import MiningConfig
from mlc_ray.train.mining import HardSampleMiner, MinedSet, write_mined_manifest
from mlc_ray.train.mining_report import mining_report

__all__ = ["run_mining_pipeline"]

log = logging.getLogger(__name__)


def _train_in_nested_run(cfg: Any, stage: str, parent_run_id: str) -> Any:
    """run_training under a child run of the mining parent (the runner logs into the active run)."""
    import mlflow

    from mlc_ray.train.runner import run_training

    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id):
        mlflow.set_tag("mlc_ray.mining.stage", stage)
        return run_training(cfg)


def whole_split_note(n_mined: int, n_train: int) -> str | None:
    """What to tell the user when mining picked every training image (a base model too weak to tell
    hard images from easy ones): the random control then trains on the same images as the mined
    fine-tune, so the report's "mined - random" is training noise. None otherwise."""
    if n_mined < n_train:
        return None
    return (
        f"Mining selected every training image ({n_mined} of {n_train}): the mined and the random "
        "fine-tune trained on the same images, so 'mined - random' is training noise; train the base "
        "model longer, or narrow mining.top_k / band."
    )


def run_mining_pipeline(cfg: Any) -> Any:
    """Base training -> score the train split -> mine -> fine-tune; returns the fine-tuned TrainResult.

    One parent MLflow run (``<run_name>-mining``) holds three nested runs (``base``, ``score``,
    ``fine_tune``), the mined manifest artifact (``mining/mined_manifest.csv``, with reasons) and the
    before/after report (``mining/mining_report.md`` and ``.csv``).
    """
    import mlflow

    from mlc_ray import storage
    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.demo import ensure_demo_data
    from mlc_ray.data.manifest import split_train_val
    from mlc_ray.train.data import load_train_val
    from mlc_ray.train.scoring import score_manifest

    mcfg: MiningConfig = cfg.mining
    work = storage.join(cfg.run_dir, "mining")

    # [0] one explicit train/val split, written out, so base and fine-tune see the same val set
    data_uri = str(cfg.data) if cfg.data is not None else ensure_demo_data()
    split = load_train_val(
        data_uri, val_data=cfg.val_data, labels=cfg.labels, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    train, val_all, vocabulary = split.train, split.val, list(split.vocabulary)
    # the report's held-out rows: no stage trains on them, picks a checkpoint or fits a threshold on them
    val, holdout = split_train_val(
        dataclasses.replace(val_all, splits=[None] * len(val_all)),
        val_fraction=mcfg.holdout_fraction,
        seed=cfg.seed,
    )
    split_uri = storage.join(work, "split_manifest.csv")
    _write_split_manifest(train, val, split_uri, vocabulary=vocabulary)
    holdout_uri = storage.join(work, "holdout_manifest.csv")
    holdout.write(holdout_uri, write_labels_file=False)

    from mlc_ray.train.tracking import resolve_tracking_uri

    # the parent run and every stage's run in the same store (each stage resolves it the same way)
    mlflow.set_tracking_uri(resolve_tracking_uri())
    experiment = getattr(cfg, "experiment", None)
    if experiment:
        mlflow.set_experiment(experiment)
    run_name = getattr(cfg, "run_name", None) or "train"
    with mlflow.start_run(run_name=f"{run_name}-mining") as parent:
        parent_id = parent.info.run_id
        mlflow.set_tag("mlc_ray.mining", "parent")
        mlflow.log_params({f"mining.{k}": v for k, v in dataclasses.asdict(mcfg).items()})

        # [a] base model on the whole training split
        # each stage is its own Ray Train run (its own checkpoints: the fine-tune must not resume the
        # base run's), so rerunning the job resumes whichever stage was interrupted
        base_cfg = cfg.replace(
            data=split_uri,
            val_data=None,
            labels=None,
            mining=dataclasses.replace(mcfg, enabled=False),
            run_name=f"{cfg.run_name}-base",
            output=storage.join(work, "base-model"),
        )
        base = _train_in_nested_run(base_cfg, "base", parent_id)

        # [b] score the training split with the base bundle (Ray Data batch inference)
        with mlflow.start_run(run_name="score", nested=True, parent_run_id=parent_id):
            mlflow.set_tag("mlc_ray.mining.stage", "score")
            scored = score_manifest(base.bundle_dir, train, tta=mcfg.tta, batch_size=mcfg.score_batch_size)
            mlflow.log_metrics({"scored_images": len(scored.indices), "score_errors": len(scored.errors)})
            thresholds_uri = storage.join(base.bundle_dir, "thresholds.json")
            thresholds: Any = Thresholds.load(thresholds_uri) if storage.exists(thresholds_uri) else 0.5
            mined_local = HardSampleMiner(mcfg).select(
                scored.scores, scored.targets, thresholds, scored.labels
            )
            # indices of the scored subset -> rows of the train manifest
            mined = MinedSet(indices=scored.indices[mined_local.indices], reasons=mined_local.reasons)
            mined_uri = storage.join(work, "mined_manifest.csv")
            write_mined_manifest(train, mined, mined_uri)
            mlflow.log_metrics({f"mined_{k}": v for k, v in mined.reason_counts().items()})
            mlflow.log_metric("mined_total", len(mined))
        mlflow.log_text(storage.read_text(mined_uri), "mining/mined_manifest.csv")
        if len(mined) == 0:
            raise ValueError(
                "mining selected no samples: loosen mining.top_k / band / rare_combination_max_frequency "
                "or raise mining.replay_fraction"
            )

        everything = whole_split_note(len(mined), len(train))
        if everything:
            log.warning("%s", everything)

        # [c] fine-tune from the base weights on mined (+ replay), validated on the same val split
        ft_uri = storage.join(work, "fine_tune_manifest.csv")
        _write_split_manifest(train.subset(list(mined.indices)), val, ft_uri, vocabulary=vocabulary)
        ft_cfg = cfg.replace(
            data=ft_uri,
            val_data=None,
            labels=None,
            mining=dataclasses.replace(mcfg, enabled=False),
            run_name=f"{cfg.run_name}-fine-tune",
            output=cfg.bundle_dir,  # the job's model is the fine-tuned one
            epochs=mcfg.fine_tune_epochs,
            warmup_epochs=min(cfg.warmup_epochs, float(mcfg.fine_tune_epochs)),
            lr=mcfg.fine_tune_lr if mcfg.fine_tune_lr is not None else cfg.lr / 5.0,
            init_from=base.bundle_dir,
        )
        fine = _train_in_nested_run(ft_cfg, "fine_tune", parent_id)

        # [d] the control: the same fine-tune on a random subset of the training split of the same size
        control = None
        if mcfg.control:
            rows = np.random.default_rng(mcfg.seed).choice(len(train), size=len(mined), replace=False)
            control_uri = storage.join(work, "control_manifest.csv")
            _write_split_manifest(
                train.subset(np.sort(rows).tolist()), val, control_uri, vocabulary=vocabulary
            )
            control_cfg = ft_cfg.replace(
                data=control_uri,
                run_name=f"{cfg.run_name}-control",
                output=storage.join(work, "control-model"),
            )
            control = _train_in_nested_run(control_cfg, "control", parent_id)

        # [e] base vs mined vs random on the held-out rows, each model at its own calibrated thresholds
        with mlflow.start_run(run_name="report", nested=True, parent_run_id=parent_id):
            mlflow.set_tag("mlc_ray.mining.stage", "report")
            models = [base, fine] + ([control] if control is not None else [])
            held = [score_manifest(m.bundle_dir, holdout, batch_size=mcfg.score_batch_size) for m in models]
        common = held[0].indices
        for h in held[1:]:
            common = np.intersect1d(common, h.indices)
        if len(common) == 0:
            raise ValueError("mining report: no held-out image was scored by every model")
        aligned = [h.scores[np.searchsorted(h.indices, common)] for h in held]
        report = mining_report(
            held[0].labels,
            held[0].targets[np.searchsorted(held[0].indices, common)],
            aligned[0],
            aligned[1],
            thresholds=base.thresholds,
            fine_tuned_thresholds=fine.thresholds,
            n_combinations=mcfg.report_combinations,
            control_scores=aligned[2] if control is not None else None,
            control_thresholds=control.thresholds if control is not None else None,
            data_note=(
                f"Held-out rows: {len(common)} of the validation split that no stage trained, selected or "
                f"calibrated on; mined set and random subset: {len(mined)} images each. "
                + (everything + " " if everything else "")
            ),
        )
        fine.mining_report = report
        # the fine-tuned model has seen the whole training split (in its base stage), not only the
        # mined rows: that is the list promotion must keep out of its evaluation data
        fine.train_manifest = train
        text = report.to_markdown()
        log.info("hard-sample mining, base vs mined vs random fine-tune on held-out rows:\n%s", text)
        mlflow.log_text(text, "mining/mining_report.md")
        mlflow.log_text(report.to_csv(), "mining/mining_report.csv")
        for r in report.label_rows:
            mlflow.log_metrics(
                {f"f1_base.{r['label']}": r["f1_base"], f"f1_fine_tuned.{r['label']}": r["f1_fine_tuned"]}
            )
            if "f1_control" in r:
                mlflow.log_metric(f"f1_control.{r['label']}", r["f1_control"])
        mlflow.set_tag("mlc_ray.mining.fine_tune_run_id", fine.mlflow_run_id)
        if control is not None:
            mlflow.set_tag("mlc_ray.mining.control_run_id", control.mlflow_run_id)
    return fine


def _write_split_manifest(train: Any, val: Any, uri: str, *, vocabulary: list[str]) -> None:
    """A manifest with an explicit ``split`` column (train rows, then val rows) and labels.txt beside it
    (``Manifest.write``, the manifest module's one writer)."""
    from mlc_ray.data.manifest import Manifest

    Manifest(
        images=[*train.images, *val.images],
        labels=[list(x) for x in [*train.labels, *val.labels]],
        splits=["train"] * len(train) + ["val"] * len(val),
        vocabulary=list(vocabulary),
    ).write(uri)

"""``split_train_val``: a manifest's train/val split (its split column, else a seeded stratified split)."""

from __future__ import annotations

import logging

import numpy as np

from mlc_ray.data.manifest.model import Manifest
from mlc_ray.errors import ManifestError

log = logging.getLogger("mlc_ray.data.manifest")


def split_train_val(
    manifest: Manifest, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Manifest, Manifest]:
    """(train, val). With a split column: its ``val`` rows are val, ``train`` (and unset) rows are
    train, ``test`` rows are left out. Without one (or with no ``val`` rows), a seeded split that puts
    every label with >= 2 examples into val and keeps at least one of each in train (greedy
    iterative stratification, rarest label first). Returned rows keep the manifest's order and have
    their ``split`` set to train/val.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(manifest)
    if manifest.has_splits:
        val_idx = [i for i, s in enumerate(manifest.splits) if s == "val"]
        if val_idx:
            train_idx = [i for i, s in enumerate(manifest.splits) if s in ("train", None)]
            unset = sum(1 for s in manifest.splits if s is None)
            if unset:
                log.warning("%s: %d row(s) without a split go to train", manifest.source, unset)
            if not train_idx:
                raise ManifestError(f"{manifest.source}: the split column has 'val' rows but no 'train' rows")
            return _with_split(manifest, train_idx, "train"), _with_split(manifest, val_idx, "val")
        pool = [i for i, s in enumerate(manifest.splits) if s != "test"]
        log.info("%s: split column has no 'val' rows; splitting %d rows", manifest.source, len(pool))
    else:
        pool = list(range(n))
    if len(pool) < 2:
        raise ManifestError(
            f"{manifest.source}: need at least 2 rows to split into train and val, got {len(pool)}"
        )

    targets = manifest.multi_hot()[pool].astype(bool)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    counts = targets.sum(axis=0)
    in_val = np.zeros(len(pool), dtype=bool)
    val_counts = np.zeros(targets.shape[1], dtype=np.int64)
    n_val = min(len(pool) - 1, max(1, round(len(pool) * val_fraction)))

    def can_move(i: int) -> bool:  # every label of row i keeps >= 1 example in train
        labels = targets[i]
        return bool(np.all(counts[labels] - val_counts[labels] >= 2))

    def move(i: int) -> None:
        in_val[i] = True
        val_counts[targets[i]] += 1

    # [1] labels rarest first: give each its share of val (at least one) when it has >= 2 examples
    for label in np.argsort(counts, kind="stable"):
        if counts[label] < 2:
            continue
        want = min(counts[label] - 1, max(1, round(counts[label] * val_fraction)))
        for i in order:
            if val_counts[label] >= want:
                break
            if targets[i, label] and not in_val[i] and can_move(i):
                move(i)
        if val_counts[label] == 0:
            log.warning(
                "%s: label '%s' (%d examples) could not be put in val without emptying another label's train set",
                manifest.source,
                manifest.vocabulary[label],
                counts[label],
            )
    # [2] top up to the wanted size with the rest, in the seeded order
    for i in order:
        if in_val.sum() >= n_val:
            break
        if not in_val[i] and can_move(i):
            move(i)
    train_idx = [pool[i] for i in range(len(pool)) if not in_val[i]]
    val_idx = [pool[i] for i in range(len(pool)) if in_val[i]]
    return _with_split(manifest, train_idx, "train"), _with_split(manifest, val_idx, "val")


def _with_split(manifest: Manifest, indices: list[int], split: str) -> Manifest:
    sub = manifest.subset(indices)
    sub.splits = [split] * len(sub)
    return sub

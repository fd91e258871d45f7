"""The training input pipeline: manifests -> Ray Data datasets of decoded, augmented uint8 pixels.

The driver never holds pixels. It turns the train and validation manifests into small Arrow tables
of (index, uri, label ids) and Ray Data does the rest in its own tasks, streaming:

  [1] ``ray.data.from_arrow`` of those rows, a few dozen rows per block (train: block order
      re-randomised every epoch)
  [2] ``map_batches(decode_batch)`` tasks: read the bytes (``mlc_ray.storage``, local or s3://),
      ``decode_for_model`` (the decode every model input goes through, with ``preprocess.decode``), then
      ``TrainAugment`` (train, ``augment`` settings) or ``preprocess_eval`` (val) -> uint8 NHWC
      ``image``, float32 multi-hot ``target``, int64 ``index`` (row in its manifest)
  [3] each Ray Train worker reads its shard with ``get_dataset_shard(name).iter_torch_batches``.

Images that cannot be read or decoded are dropped from the batch and recorded, with their URI and
error code, in one ``BadImageLog`` actor per run; the loop compares the count with
``max_error_rate`` after each epoch and stops the run with a message listing them when too many fail.

Train augmentation draws from fresh entropy in every task, so two runs with the same seed see the
same split and the same initial weights but not bit-identical augmentations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc_ray.data.manifest import Manifest

__all__ = [
    "BadImageLog",
    "TrainData",
    "ValShardingConfig",
    "build_dataset",
    "decode_batch",
    "image_rows",
    "load_train_val",
    "targets_in",
]

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 32  # small blocks: shuffling granularity for train, parallelism for decoding


@dataclass
class TrainData:
    """The two manifests of a run, with the label vocabulary both are scored in."""

    train: Manifest
    val: Manifest
    vocabulary: list[str]
    source: str  # the training manifest URI

    @property
    def train_targets(self) -> np.ndarray:
        return targets_in(self.train, self.vocabulary)

    @property
    def val_targets(self) -> np.ndarray:
        return targets_in(self.val, self.vocabulary)


def targets_in(manifest: Manifest, vocabulary: list[str]) -> np.ndarray:
    """(N, L) uint8 multi-hot of ``manifest`` in ``vocabulary`` order; ValueError on unknown labels."""
    index = {label: j for j, label in enumerate(vocabulary)}
    out = np.zeros((len(manifest), len(vocabulary)), dtype=np.uint8)
    for i, labels in enumerate(manifest.labels):
        for label in labels:
            j = index.get(label)
            if j is None:
                raise ValueError(
                    f"{manifest.source}: row {i} has label '{label}', which the training vocabulary "
                    f"({len(vocabulary)} labels) does not know; add it to labels.txt or fix the row"
                )
            out[i, j] = 1
    return out


def load_train_val(
    data: str,
    *,
    val_data: str | None = None,
    labels: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> TrainData:
    """Read the manifests and split: ``val_data`` if given, else the ``split`` column, else a seeded split."""
    from mlc_ray.data.manifest import load_manifest, split_train_val

    full = load_manifest(data, labels_uri=labels)
    if val_data:
        val = load_manifest(val_data, labels_uri=labels)
        train = full
        if full.has_splits:
            train = full.subset([i for i, s in enumerate(full.splits) if s in ("train", None)])
        targets_in(val, list(full.vocabulary))  # unknown val labels fail here, with the row
    else:
        train, val = split_train_val(full, val_fraction=val_fraction, seed=seed)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"{data}: need training and validation images, got {len(train)} train and {len(val)} val rows"
        )
    if not full.vocabulary:
        raise ValueError(f"{data}: the manifest has no labels; training needs at least one")
    return TrainData(train=train, val=val, vocabulary=list(full.vocabulary), source=str(data))


def image_rows(manifest: Manifest, vocabulary: list[str]) -> Any:
    """A ``pyarrow.Table`` (index int64, uri string, label_ids list<int32>): what [1] distributes."""
    import pyarrow as pa

    targets = targets_in(manifest, vocabulary)
    label_ids = [np.flatnonzero(row).astype(np.int32).tolist() for row in targets]
    return pa.table(
        {
            "index": pa.array(np.arange(len(manifest), dtype=np.int64)),
            "uri": pa.array(manifest.images, pa.string()),
            "label_ids": pa.array(label_ids, pa.list_(pa.int32())),
        }
    )


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    split: str,
    preprocess: dict[str, Any],
    num_labels: int,
    augment: dict[str, Any] | None,
    bad_image_log: Any = None,
) -> dict[str, np.ndarray]:
    """[2] One batch of rows -> decoded pixels. Bad images are dropped and sent to ``bad_image_log``."""
    from mlc_ray import storage
    from mlc_ray.data.augment import AugmentConfig, TrainAugment
    from mlc_ray.data.images import PreprocessConfig, decode_for_model, preprocess_eval

    cfg = PreprocessConfig.from_dict(preprocess)
    size = cfg.image_size
    transform = None
    if augment is not None:
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()}
        transform = TrainAugment(cfg, seed=None, augment=AugmentConfig(**settings))
    indices = np.asarray(batch["index"], dtype=np.int64)
    images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    targets = np.zeros((len(indices), num_labels), dtype=np.float32)
    keep = np.zeros(len(indices), dtype=bool)
    bad: list[tuple[int, str, str, str]] = []
    for k, (index, uri) in enumerate(zip(indices, batch["uri"], strict=True)):
        uri = str(uri)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            bad.append((int(index), uri, "missing", "no such file or object"))
            continue
        except Exception as exc:  # unreadable: permissions, a flaky endpoint after boto3's retries
            # (a throttled GET whose retries ran out is botocore's ClientError, not an OSError)
            bad.append((int(index), uri, "read_error", f"{type(exc).__name__}: {exc}"))
            continue
        decoded = decode_for_model(data, cfg)  # the one decode (bundle policy); augmentation on top
        if decoded.error is not None:
            bad.append((int(index), uri, decoded.error.code, decoded.error.message))
            continue
        images[k] = transform(decoded.array) if transform is not None else preprocess_eval(decoded.array, cfg)
        targets[k, np.asarray(batch["label_ids"][k], dtype=np.int64)] = 1.0
        keep[k] = True
    if bad:
        for index, uri, code, message in bad:
            log.warning("%s image %d skipped: %s [%s] %s", split, index, uri, code, message)
        if bad_image_log is not None:
            bad_image_log.record.remote(split, bad)
    return {"image": images[keep], "target": targets[keep], "index": indices[keep]}


def build_dataset(
    manifest: Manifest,
    vocabulary: list[str],
    *,
    split: str,
    preprocess: Any,
    bad_image_log: Any = None,
    augment: Any = None,
    decode_cpus: float = 1.0,
) -> Any:
    """The Ray Data dataset of one split: ``image`` uint8 NHWC, ``target`` float32, ``index`` int64."""
    import dataclasses

    import ray

    from mlc_ray.data.augment import AugmentConfig

    table = image_rows(manifest, vocabulary)
    blocks = [table.slice(start, ROWS_PER_BLOCK) for start in range(0, table.num_rows, ROWS_PER_BLOCK)]
    ds = ray.data.from_arrow(blocks)
    train = split == "train"
    if train:
        ds = ds.randomize_block_order()  # a fresh order on every epoch's execution
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "split": split,
            "preprocess": preprocess.to_dict(),
            "num_labels": len(vocabulary),
            "augment": dataclasses.asdict(augment or AugmentConfig()) if train else None,
            "bad_image_log": bad_image_log,
        },
        batch_size=ROWS_PER_BLOCK,
        batch_format="numpy",
        num_cpus=decode_cpus,
    )


class _BadImageLog:
    """Every image that failed in this run, per split, deduplicated by row (epochs re-decode)."""

    def __init__(self) -> None:
        self._bad: dict[tuple[str, int], tuple[str, str, str]] = {}

    def record(self, split: str, rows: list[tuple[int, str, str, str]]) -> None:
        for index, uri, code, message in rows:
            self._bad[(split, int(index))] = (uri, code, message)

    def count(self, split: str | None = None) -> int:
        return sum(1 for s, _ in self._bad if split is None or s == split)

    def entries(self) -> list[dict[str, Any]]:
        return [
            {"split": s, "index": i, "uri": uri, "code": code, "message": message}
            for (s, i), (uri, code, message) in sorted(self._bad.items())
        ]


def BadImageLog() -> Any:  # noqa: N802 - reads like the class it creates
    """Start the run's bad-image log (a zero-CPU actor owned by the driver)."""
    import ray

    return ray.remote(num_cpus=0)(_BadImageLog).remote()


class ValShardingConfig:
    """Ray Train ``DataConfig`` factory: ``train`` split equally, ``val`` split WITHOUT dropping rows.

    The default ``streaming_split(equal=True)`` may drop up to ``world_size - 1`` rows to even the
    shards out; for validation every image must be scored exactly once, so ``val`` is split with
    ``equal=False`` (shards differ by a few rows; the loop gathers them all on rank 0).
    """

    @staticmethod
    def create() -> Any:
        from ray.train import DataConfig

        class _Config(DataConfig):
            def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[no-untyped-def]
                output = super().configure(
                    {k: v for k, v in datasets.items() if k != "val"},
                    world_size,
                    worker_handles,
                    worker_node_ids,
                    **kwargs,
                )
                if "val" in datasets:
                    ds = datasets["val"].copy(datasets["val"])
                    ds.context.execution_options = self._resolve_execution_options("val")
                    for i, shard in enumerate(ds.streaming_split(world_size, equal=False)):
                        output[i]["val"] = shard
                return output

        return _Config()

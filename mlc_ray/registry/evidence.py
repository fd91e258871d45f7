"""What a version was trained and validated on: recorded at registration, checked at promotion.

Registration logs the evaluation data (the ``--val-data`` manifest's URI, or the split's val rows as
``evidence/val_manifest.csv``) and the training-image list (``evidence/train_images.csv``: URI +
sha256 of every image). Promotion loads that evaluation data, selects its rows, and counts how many
evaluation images are training images (same URI or same bytes).
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc_ray.errors import UserError

EVIDENCE_DIR = "evidence"  # run artifact folder of the evaluation data and the training-image list
EVAL_DATA_TAG = "eval_data_uri"
EVAL_DATA_SHA_TAG = "eval_data_sha256"
TRAIN_IMAGES_TAG = "train_images_uri"


@dataclass(frozen=True)
class TrainingEvidence:
    """What a version was trained and validated on, so promotion can judge it on held-out data.

    ``val_data_uri``: the validation manifest the user gave (``--val-data``), recorded as is;
    without it ``val_manifest`` (the split's val rows) is logged as a run artifact. ``train_manifest``:
    the training images; each one's sha256 is logged so promotion can find them under other names.
    """

    val_manifest: Any = None  # mlc_ray.data.manifest.Manifest
    val_data_uri: str | None = None
    train_manifest: Any = None


def hash_images(uris: list[str]) -> list[str]:
    """sha256 of each image's bytes ('' for one that cannot be read), read 8 at a time."""
    from mlc_ray.evaluation import read_images

    return [hashlib.sha256(data).hexdigest() if data is not None else "" for data in read_images(uris)]


def log_evidence(evidence: TrainingEvidence, run_id: str, tmp: Path) -> dict[str, str]:
    """Log the evidence files into the active run ``run_id``; return the version tags naming them."""
    import mlflow

    from mlc_ray import storage

    tags: dict[str, str] = {}
    base = f"runs:/{run_id}/{EVIDENCE_DIR}"
    if evidence.val_data_uri:
        uri = str(evidence.val_data_uri)
        if not storage.is_s3(uri) and "://" not in uri:
            uri = os.path.abspath(os.path.expanduser(uri))  # promotion may run from another folder
        tags[EVAL_DATA_TAG] = uri
    elif evidence.val_manifest is not None and len(evidence.val_manifest):
        path = tmp / "val_manifest.csv"  # labels.txt beside it keeps the vocabulary order
        evidence.val_manifest.write(str(path))
        mlflow.log_artifact(str(path), artifact_path=EVIDENCE_DIR)
        mlflow.log_artifact(str(tmp / "labels.txt"), artifact_path=EVIDENCE_DIR)
        tags[EVAL_DATA_TAG] = f"{base}/val_manifest.csv"
    if evidence.val_manifest is not None:
        tags[EVAL_DATA_SHA_TAG] = evidence.val_manifest.sha256
    if evidence.train_manifest is not None and len(evidence.train_manifest):
        images = list(evidence.train_manifest.images)
        path = tmp / "train_images.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["image", "sha256"])
            writer.writerows(zip(images, hash_images(images), strict=True))
        mlflow.log_artifact(str(path), artifact_path=EVIDENCE_DIR)
        tags[TRAIN_IMAGES_TAG] = f"{base}/train_images.csv"
    return tags


def fetch_evidence_file(uri: str, dst: Path) -> str:
    """A ``runs:/RUN/evidence/FILE`` artifact downloaded into ``dst`` (any other URI is returned as is)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not uri.startswith("runs:/"):
        return uri
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot download {uri} from {mlflow.get_tracking_uri()}: {exc}") from exc


def load_eval_manifest(uri: str) -> Any:
    """The evaluation manifest at ``uri``; a ``runs:/`` one comes with its labels.txt."""
    from mlc_ray.data.manifest import load_manifest

    if not uri.startswith("runs:/"):
        return load_manifest(uri)
    with tempfile.TemporaryDirectory(prefix="mlc_ray-eval-data-") as tmp:
        local = fetch_evidence_file(uri, Path(tmp))
        labels = fetch_evidence_file(uri.rsplit("/", 1)[0] + "/labels.txt", Path(tmp))
        return load_manifest(local, labels_uri=labels)


@dataclass(frozen=True)
class TrainingOverlap:
    checked: bool  # False: the version records no training-image list
    by_uri: int = 0
    by_content: int = 0  # same bytes under another URI

    @property
    def count(self) -> int:
        return self.by_uri + self.by_content


def training_overlap(tags: Mapping[str, str], manifest: Any, images: list[bytes | None]) -> TrainingOverlap:
    """How many evaluation images are the candidate's training images, by URI or by sha256 of the bytes."""
    uri = tags.get(TRAIN_IMAGES_TAG)
    if not uri:
        return TrainingOverlap(checked=False)
    with (
        tempfile.TemporaryDirectory(prefix="mlc_ray-train-images-") as tmp,
        open(fetch_evidence_file(uri, Path(tmp)), newline="") as handle,
    ):
        rows = list(csv.DictReader(handle))
    train_uris = {r["image"] for r in rows}
    train_shas = {r["sha256"] for r in rows if r.get("sha256")}
    by_uri = by_content = 0
    for image, data in zip(manifest.images, images, strict=True):
        if image in train_uris:
            by_uri += 1
        elif data is not None and hashlib.sha256(data).hexdigest() in train_shas:
            by_content += 1
    return TrainingOverlap(checked=True, by_uri=by_uri, by_content=by_content)


def select_eval_rows(manifest: Any, split: str) -> Any:
    """``split``: 'auto' = the 'val' rows if the manifest has a split column, else every row."""
    splits = list(manifest.splits)
    has_splits = any(s for s in splits)
    if split == "all" or (split == "auto" and not has_splits):
        return manifest
    wanted = "val" if split == "auto" else split
    rows = [i for i, s in enumerate(splits) if s == wanted]
    if not rows:
        present = sorted({s for s in splits if s})
        raise UserError(
            f"{manifest.source}: no rows with split '{wanted}' (splits present: {present or 'none'}); "
            "pass --split all to evaluate on every row"
        )
    return manifest.subset(rows)

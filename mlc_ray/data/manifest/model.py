"""The manifest data model: ``Manifest`` (images, labels, splits, vocabulary) and how it is written.

Every reader (``mlc_ray.data.manifest.readers``) produces one; training, evaluation, promotion,
scanning and mining consume it. ``write`` is the one writer (CSV, JSONL or Parquet by extension,
atomically, with ``labels.txt`` beside it to keep the vocabulary order).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc_ray import storage

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
LABELS_FILE = "labels.txt"
CSV_EXT = (".csv",)
JSONL_EXT = (".jsonl", ".ndjson")
PARQUET_EXT = (".parquet", ".pq")
JSON_EXT = (".json",)


def extension(uri: str) -> str:
    """The lower-case file extension of ``uri`` (``""`` for a folder)."""
    return posixpath.splitext(uri.rstrip("/"))[1].lower()


@dataclass
class Manifest:
    """Images (absolute URIs), their labels (vocabulary order), optional splits, the vocabulary."""

    images: list[str]
    labels: list[list[str]]
    splits: list[str | None]
    vocabulary: list[str]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.labels) == len(self.splits)):
            raise ValueError(
                f"Manifest: images ({len(self.images)}), labels ({len(self.labels)}) and splits "
                f"({len(self.splits)}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_splits(self) -> bool:
        return any(s is not None for s in self.splits)

    def multi_hot(self) -> np.ndarray:
        """(N, L) uint8 targets in vocabulary order."""
        from sklearn.preprocessing import MultiLabelBinarizer

        if not self.vocabulary:
            return np.zeros((len(self), 0), dtype=np.uint8)
        mlb = MultiLabelBinarizer(classes=list(self.vocabulary))
        return np.asarray(mlb.fit_transform(self.labels), dtype=np.uint8).reshape(
            len(self), len(self.vocabulary)
        )

    @property
    def sha256(self) -> str:
        """Hash of the normalised content (sorted rows of image URI + labels + split, and the
        vocabulary): the same data set gives the same hash whatever file format carried it."""
        rows = sorted(zip(self.images, self.labels, self.splits, strict=True), key=lambda r: r[0])
        payload = {"vocabulary": list(self.vocabulary), "rows": [[i, list(ls), s] for i, ls, s in rows]}
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()  # not cached: the lists are mutable

    def subset(self, indices: Iterable[int]) -> Manifest:
        idx = [int(i) for i in indices]
        return Manifest(
            images=[self.images[i] for i in idx],
            labels=[list(self.labels[i]) for i in idx],
            splits=[self.splits[i] for i in idx],
            vocabulary=list(self.vocabulary),
            source=self.source,
        )

    def to_table(self) -> Any:
        """A ``pyarrow.Table``: image string, labels list<string>, split string (null when unset)."""
        import pyarrow as pa

        return pa.table(
            {
                "image": pa.array(self.images, pa.string()),
                "labels": pa.array(self.labels, pa.list_(pa.string())),
                "split": pa.array(self.splits, pa.string()),
            }
        )

    def write(self, uri: str, *, write_labels_file: bool = True) -> str:
        """Write as CSV, JSONL or Parquet (by extension), images as absolute URIs, atomically.

        With ``write_labels_file`` a ``labels.txt`` beside it keeps the vocabulary order (this
        replaces a labels.txt already there). Returns ``uri``.
        """
        ext = extension(uri)
        with_split = self.has_splits
        if ext in CSV_EXT:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["image", "labels", "split"] if with_split else ["image", "labels"])
            for image, labels, split in zip(self.images, self.labels, self.splits, strict=True):
                row = [image, "|".join(labels)]
                writer.writerow([*row, split or ""] if with_split else row)
            data = buf.getvalue().encode()
        elif ext in JSONL_EXT:
            lines = []
            for image, labels, split in zip(self.images, self.labels, self.splits, strict=True):
                obj: dict[str, Any] = {"image": image, "labels": list(labels)}
                if with_split:
                    obj["split"] = split
                lines.append(json.dumps(obj, ensure_ascii=False))
            data = ("\n".join(lines) + "\n").encode()
        elif ext in PARQUET_EXT:
            import pyarrow.parquet as pq

            table = self.to_table() if with_split else self.to_table().drop(["split"])
            buf_b = io.BytesIO()
            pq.write_table(table, buf_b)
            data = buf_b.getvalue()
        else:
            raise ValueError(f"{uri}: write a manifest as .csv, .jsonl or .parquet")
        storage.write_bytes(uri, data)
        if write_labels_file:
            storage.write_text(
                storage.join(storage.parent(uri), LABELS_FILE), "\n".join(self.vocabulary) + "\n"
            )
        return uri

"""Raw rows -> a validated ``Manifest``: label and split parsing, image paths, the vocabulary.

Each reader yields ``RawRow`` objects (what one line, record or file said, and where to find it);
``build_manifest`` turns them into a ``Manifest``, failing with a ``ManifestError`` that names the file,
the row and the fix (empty image, duplicate image, unknown label with a did-you-mean, bad split).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc_ray import storage
from mlc_ray.data.manifest.model import SPLITS, Manifest
from mlc_ray.errors import ManifestError

log = logging.getLogger("mlc_ray.data.manifest")


def read_manifest_bytes(uri: str, what: str = "manifest") -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as exc:
        detail = f" ({exc})" if type(exc) is not FileNotFoundError else ""  # e.g. the bucket is missing
        raise ManifestError(
            f"{uri}: {what} file does not exist{detail}; check the path (local or s3://bucket/key)"
        ) from None
    except (OSError, PermissionError) as exc:
        raise ManifestError(f"{uri}: cannot read the {what} file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # botocore errors: access denied, no such bucket, ...
        raise ManifestError(f"{uri}: cannot read the {what} file ({type(exc).__name__}: {exc})") from None


def read_manifest_text(uri: str, what: str = "manifest") -> str:
    data = read_manifest_bytes(uri, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{uri}: the {what} file is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None


def exists_quietly(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except Exception:
        return False


@dataclass
class RawRow:
    where: str  # "row 3" / "line 4" / "samples[2]": how the user finds it in the file
    image: Any
    labels: Any
    split: Any = None


def split_labels(value: Any, source: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ManifestError(
                    f"{source}: {where}: labels {text!r} look like a JSON list but do not parse; "
                    "write them as a|b|c or a valid JSON list"
                ) from None
        else:
            return [p.strip() for p in text.split("|") if p.strip()]
    if isinstance(value, list | tuple | np.ndarray):
        out = []
        for item in value:
            if not isinstance(item, str):
                raise ManifestError(
                    f"{source}: {where}: label {item!r} is not a string; labels are names like 'dog'"
                )
            if item.strip():
                out.append(item.strip())
        return out
    raise ManifestError(
        f"{source}: {where}: labels must be a list of strings or an 'a|b' string, got {type(value).__name__}"
    )


def parse_split(value: Any, source: str, where: str) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    if text not in SPLITS:
        hint = difflib.get_close_matches(text, SPLITS, n=1, cutoff=0.4)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ManifestError(
            f"{source}: {where}: split '{value}' is not one of {list(SPLITS)}{suggestion}; "
            "fix the value or leave it empty"
        )
    return text


def read_vocabulary(uri: str) -> list[str]:
    vocab: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(read_manifest_text(uri, "labels").splitlines(), start=1):
        label = line.strip()
        if not label:
            continue
        if "|" in label:
            raise ManifestError(f"{uri}: line {n}: label '{label}' contains '|', which separates labels")
        if label in seen:
            raise ManifestError(
                f"{uri}: line {n}: label '{label}' is listed twice (first on line {seen[label]}); remove one"
            )
        seen[label] = n
        vocab.append(label)
    if not vocab:
        raise ManifestError(f"{uri}: the labels file is empty; list one label per line or delete it")
    return vocab


def did_you_mean(label: str, vocab: Sequence[str]) -> str:
    hint = difflib.get_close_matches(label, list(vocab), n=1, cutoff=0.6)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def build_manifest(
    rows: Iterable[RawRow],
    *,
    source: str,
    base: str,
    vocabulary: list[str] | None,
    vocabulary_source: str | None,
) -> Manifest:
    images: list[str] = []
    labels: list[list[str]] = []
    splits: list[str | None] = []
    first_seen: dict[str, str] = {}
    vocab_index = {label: i for i, label in enumerate(vocabulary)} if vocabulary is not None else None
    for row in rows:
        image = row.image
        if image is None or (isinstance(image, float) and image != image) or not str(image).strip():
            raise ManifestError(f"{source}: {row.where}: the image value is empty; give a path or URI")
        image = str(image).strip()
        try:
            uri = storage.resolve(image, base)
        except ValueError as exc:
            raise ManifestError(f"{source}: {row.where}: {exc}") from None
        if uri in first_seen:
            raise ManifestError(
                f"{source}: {row.where}: duplicate image '{image}' (also on {first_seen[uri]}); "
                "list each image once with all its labels"
            )
        first_seen[uri] = row.where
        row_labels = split_labels(row.labels, source, row.where)
        if vocab_index is not None:
            for label in row_labels:
                if label not in vocab_index:
                    raise ManifestError(
                        f"{source}: {row.where}: label '{label}' is not in {vocabulary_source}"
                        f"{did_you_mean(label, vocabulary)}; fix the label or add it to {vocabulary_source}"
                    )
        images.append(uri)
        labels.append(row_labels)
        splits.append(parse_split(row.split, source, row.where))
    if not images:
        raise ManifestError(f"{source}: the manifest has zero rows; add at least one image row")
    if vocabulary is None:
        vocabulary = sorted({label for row_labels in labels for label in row_labels})
        vocab_index = {label: i for i, label in enumerate(vocabulary)}
    assert vocab_index is not None
    labels = [sorted(set(row_labels), key=vocab_index.__getitem__) for row_labels in labels]
    manifest = Manifest(
        images=images, labels=labels, splits=splits, vocabulary=list(vocabulary), source=source
    )
    counts = manifest.multi_hot().sum(axis=0) if vocabulary else np.zeros(0)
    unused = [label for label, c in zip(vocabulary, counts, strict=True) if c == 0]
    if unused:
        log.warning(
            "%s: %d label(s) of %s have no examples: %s; the model cannot learn them "
            "(add examples or remove them from %s)",
            source,
            len(unused),
            vocabulary_source,
            unused[:20],
            vocabulary_source,
        )
    return manifest


def require_columns(columns: Iterable[str], source: str, where: str = "header") -> None:
    present = list(columns)
    missing = [c for c in ("image", "labels") if c not in present]
    if missing:
        raise ManifestError(
            f"{source}: {where}: missing column(s) {missing} (found {present}); a manifest needs "
            "'image' and 'labels' columns and may have 'split'"
        )

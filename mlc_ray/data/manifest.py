"""Manifests: which images a job uses, their labels and splits, and the label vocabulary.

One ``load_manifest`` reads every supported layout, local or on S3 (through ``mlc_ray.storage``):

========================  ==================================================================
``*.csv``                 columns ``image``, ``labels`` ("a|b"; empty = no label; a JSON list
                          string also works), optional ``split`` (train/val/test)
``*.jsonl`` / ``*.ndjson`` one object per line, same keys; ``labels`` a list or "a|b" string
``*.parquet`` / ``*.pq``  same columns; ``labels`` list<string> or string
``*.json``                seed 002 (NUS-WIDE): ``{"samples": [{"image_name", "image_labels"}],
                          "labels": [...]}`` (``labels`` gives the vocabulary order)
a folder / an s3 prefix   seed 004: one subfolder per label, single-label images inside
any other file            seed 003 ``image_list`` ("NAME COUNT" per line) with its 0/1 label
                          matrix beside it (see ``find_image_label_file``)
========================  ==================================================================

Image paths that are not absolute URIs are relative to the manifest's folder and become absolute
(``/abs/path`` or ``s3://bucket/key``). The vocabulary is ``labels_uri`` if given, else ``labels.txt``
beside the manifest (one label per line, that order; for seed 002 the JSON's own ``labels`` list comes
first), else the sorted set of labels seen. Every row's labels are kept in vocabulary order, deduplicated.

Bad input fails fast with ``ManifestError`` naming the file, the row (1-based data row) and the fix:
missing column, unknown label (with a did-you-mean), unreadable file, duplicate image, zero rows.
A vocabulary label with no examples is a logged warning.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from mlc_ray.errors import ManifestError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
LABELS_FILE = "labels.txt"
_CSV_EXT = (".csv",)
_JSONL_EXT = (".jsonl", ".ndjson")
_PARQUET_EXT = (".parquet", ".pq")
_JSON_EXT = (".json",)


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
        from mlc_ray import storage

        ext = _extension(uri)
        with_split = self.has_splits
        if ext in _CSV_EXT:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["image", "labels", "split"] if with_split else ["image", "labels"])
            for image, labels, split in zip(self.images, self.labels, self.splits, strict=True):
                row = [image, "|".join(labels)]
                writer.writerow([*row, split or ""] if with_split else row)
            data = buf.getvalue().encode()
        elif ext in _JSONL_EXT:
            lines = []
            for image, labels, split in zip(self.images, self.labels, self.splits, strict=True):
                obj: dict[str, Any] = {"image": image, "labels": list(labels)}
                if with_split:
                    obj["split"] = split
                lines.append(json.dumps(obj, ensure_ascii=False))
            data = ("\n".join(lines) + "\n").encode()
        elif ext in _PARQUET_EXT:
            import pyarrow.parquet as pq

            table = self.to_table() if with_split else self.to_table().drop(["split"])
            buf_b = io.BytesIO()
            pq.write_table(table, buf_b)
            data = buf_b.getvalue()
        else:
            raise ValueError(f"{uri}: write a manifest as .csv, .jsonl or .parquet")
        storage.write_bytes(uri, data)
        if write_labels_file:
            storage.write_text(storage.join(_parent(uri), LABELS_FILE), "\n".join(self.vocabulary) + "\n")
        return uri


# ----------------------------------------------------------------------------------------------
# URI helpers


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _extension(uri: str) -> str:
    return posixpath.splitext(uri.rstrip("/"))[1].lower()


def _parent(uri: str) -> str:
    if _is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def _normalise_source(uri: str) -> str:
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if _is_s3(uri):
        return uri
    return os.path.abspath(uri)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _resolve_image(path: str, base: str) -> str:
    """An image reference -> absolute URI; relative paths are relative to ``base`` (the manifest folder)."""
    if path.startswith("file://"):
        return os.path.normpath(path[len("file://") :])
    if _is_s3(path):
        bucket, _, key = path[len("s3://") :].partition("/")
        return f"s3://{bucket}/{posixpath.normpath(key)}" if key else path
    if _SCHEME.match(path):
        raise ValueError(f"unsupported URI scheme in '{path}' (use a local path or s3://)")
    if os.path.isabs(path):
        return os.path.normpath(path)
    if _is_s3(base):
        bucket, _, prefix = base[len("s3://") :].partition("/")
        key = posixpath.normpath(posixpath.join(prefix, path))
        if key.startswith("../") or key == "..":
            raise ValueError(f"'{path}' points above the bucket root of {base}")
        return f"s3://{bucket}/{key}"
    return os.path.normpath(os.path.join(base, path))


def _read_bytes(uri: str, what: str = "manifest") -> bytes:
    from mlc_ray import storage

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


def _read_text(uri: str, what: str = "manifest") -> str:
    data = _read_bytes(uri, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{uri}: the {what} file is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None


def _exists(uri: str) -> bool:
    from mlc_ray import storage

    try:
        return storage.exists(uri)
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# raw rows -> Manifest


@dataclass
class _Row:
    where: str  # "row 3" / "line 4" / "samples[2]": how the user finds it in the file
    image: Any
    labels: Any
    split: Any = None


def _split_labels(value: Any, source: str, where: str) -> list[str]:
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


def _parse_split(value: Any, source: str, where: str) -> str | None:
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


def _read_vocabulary(uri: str) -> list[str]:
    vocab: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(_read_text(uri, "labels").splitlines(), start=1):
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


def _did_you_mean(label: str, vocab: Sequence[str]) -> str:
    hint = difflib.get_close_matches(label, list(vocab), n=1, cutoff=0.6)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def _build(
    rows: Iterable[_Row],
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
            uri = _resolve_image(image, base)
        except ValueError as exc:
            raise ManifestError(f"{source}: {row.where}: {exc}") from None
        if uri in first_seen:
            raise ManifestError(
                f"{source}: {row.where}: duplicate image '{image}' (also on {first_seen[uri]}); "
                "list each image once with all its labels"
            )
        first_seen[uri] = row.where
        row_labels = _split_labels(row.labels, source, row.where)
        if vocab_index is not None:
            for label in row_labels:
                if label not in vocab_index:
                    raise ManifestError(
                        f"{source}: {row.where}: label '{label}' is not in {vocabulary_source}"
                        f"{_did_you_mean(label, vocabulary)}; fix the label or add it to {vocabulary_source}"
                    )
        images.append(uri)
        labels.append(row_labels)
        splits.append(_parse_split(row.split, source, row.where))
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


def _require_columns(columns: Iterable[str], source: str, where: str = "header") -> None:
    present = list(columns)
    missing = [c for c in ("image", "labels") if c not in present]
    if missing:
        raise ManifestError(
            f"{source}: {where}: missing column(s) {missing} (found {present}); a manifest needs "
            "'image' and 'labels' columns and may have 'split'"
        )


# ----------------------------------------------------------------------------------------------
# readers: each yields _Row objects


def _csv_rows(uri: str) -> tuple[list[_Row], None]:
    text = _read_text(uri)
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if not fields:
        raise ManifestError(
            f"{uri}: the manifest has zero rows (no header either); expected 'image,labels[,split]'"
        )
    reader.fieldnames = fields
    _require_columns(fields, uri, "header (line 1)")
    rows = []
    for n, record in enumerate(reader, start=1):
        if None in record:  # more cells than header columns
            raise ManifestError(
                f"{uri}: row {n} (line {reader.line_num}): {len(fields) + len(record[None])} values for "
                f"{len(fields)} columns; quote values that contain commas"
            )
        if not any((v or "").strip() for v in record.values()):
            continue  # blank line
        rows.append(
            _Row(
                f"row {n} (line {reader.line_num})",
                record.get("image"),
                record.get("labels"),
                record.get("split"),
            )
        )
    return rows, None


def _jsonl_rows(uri: str) -> tuple[list[_Row], None]:
    rows = []
    n = 0
    for line_no, line in enumerate(_read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        n += 1
        where = f"row {n} (line {line_no})"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{uri}: {where}: not valid JSON ({exc.msg}); one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{uri}: {where}: expected a JSON object with 'image' and 'labels'")
        _require_columns(obj.keys(), uri, where)
        rows.append(_Row(where, obj.get("image"), obj.get("labels"), obj.get("split")))
    return rows, None


def _parquet_rows(uri: str) -> tuple[list[_Row], None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _read_bytes(uri)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{uri}: not a readable Parquet file ({exc})") from None
    _require_columns(table.column_names, uri, "schema")
    images = table.column("image").to_pylist()
    labels = table.column("labels").to_pylist()
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(images)
    return [
        _Row(f"row {i + 1}", im, ls, sp)
        for i, (im, ls, sp) in enumerate(zip(images, labels, splits, strict=True))
    ], None


def _nus_wide_rows(uri: str) -> tuple[list[_Row], list[str] | None]:
    try:
        obj = json.loads(_read_text(uri))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{uri}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(obj, dict) or "samples" not in obj:
        raise ManifestError(
            f"{uri}: missing key 'samples'; a .json manifest is seed 002's NUS-WIDE layout "
            '{"samples": [{"image_name": ..., "image_labels": [...]}], "labels": [...]}'
        )
    samples = obj["samples"]
    if not isinstance(samples, list):
        raise ManifestError(f"{uri}: 'samples' must be a list of objects")
    rows = []
    for i, sample in enumerate(samples):
        where = f"row {i + 1} (samples[{i}])"
        if not isinstance(sample, dict) or "image_name" not in sample or "image_labels" not in sample:
            raise ManifestError(f"{uri}: {where}: missing column 'image_name' or 'image_labels'")
        rows.append(_Row(where, sample["image_name"], sample["image_labels"], sample.get("split")))
    vocab = obj.get("labels")
    if vocab is not None:
        if not isinstance(vocab, list) or not all(isinstance(x, str) for x in vocab):
            raise ManifestError(f"{uri}: 'labels' must be a list of label names")
        duplicates = [x for x, c in Counter(vocab).items() if c > 1]
        if duplicates:
            raise ManifestError(f"{uri}: 'labels' lists {duplicates} more than once; remove the duplicates")
    return rows, vocab


def find_image_label_file(image_list_uri: str) -> str | None:
    """Seed 003's label matrix for an image list, in this order: the list's name with ``image_list``
    replaced by ``image_label`` (``train_image_list.txt`` -> ``train_image_label.txt``), then
    ``image_label.txt`` and ``image_label`` in the same folder. None when none exists."""
    folder, name = _parent(image_list_uri), posixpath.basename(image_list_uri.rstrip("/"))
    from mlc_ray import storage

    candidates = []
    if "image_list" in name:
        candidates.append(name.replace("image_list", "image_label"))
    candidates += ["image_label.txt", "image_label"]
    for candidate in dict.fromkeys(candidates):
        uri = storage.join(folder, candidate)
        if uri != image_list_uri and _exists(uri):
            return uri
    return None


def _seed003_rows(
    uri: str, image_label_uri: str | None, vocab: list[str] | None
) -> tuple[list[_Row], list[str]]:
    label_uri = image_label_uri or find_image_label_file(uri)
    if label_uri is None:
        raise ManifestError(
            f"{uri}: read as a seed 003 image list, but no label matrix was found beside it; put "
            "'image_label.txt' (or the list's name with image_list -> image_label) in the same folder, "
            "or pass image_label_uri="
        )
    list_lines = [(n, line) for n, line in enumerate(_read_text(uri).splitlines(), start=1) if line.strip()]
    label_lines = [
        (n, line)
        for n, line in enumerate(_read_text(label_uri, "image_label").splitlines(), start=1)
        if line.strip()
    ]
    if len(list_lines) != len(label_lines):
        raise ManifestError(
            f"{uri}: {len(list_lines)} images but {label_uri} has {len(label_lines)} label rows; "
            "each image line needs exactly one label line, in the same order"
        )
    width = None
    matrix: list[list[int]] = []
    for m, label_line in label_lines:
        values = label_line.split()
        if any(v not in ("0", "1") for v in values):
            raise ManifestError(
                f"{label_uri}: row {len(matrix) + 1} (line {m}): values must be 0 or 1, got {label_line!r}"
            )
        if width is None:
            width = len(values)
        elif len(values) != width:
            raise ManifestError(
                f"{label_uri}: row {len(matrix) + 1} (line {m}): {len(values)} values, but the first row has {width}"
            )
        matrix.append([int(v) for v in values])
    if vocab is None:
        vocab = [f"label_{i}" for i in range(width or 0)]
    elif width is not None and len(vocab) != width:
        raise ManifestError(
            f"{label_uri}: {width} label columns but the labels file lists {len(vocab)} labels; they must match"
        )
    rows = []
    for i, ((n, line), bits) in enumerate(zip(list_lines, matrix, strict=True)):
        parts = line.split()
        where = f"row {i + 1} (line {n})"
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ManifestError(f"{uri}: {where}: expected 'IMAGE_NAME LABEL_COUNT', got {line!r}")
        if len(parts) == 2 and int(parts[1]) != sum(bits):
            raise ManifestError(
                f"{uri}: {where}: says {parts[1]} labels but row {i + 1} of {label_uri} has {sum(bits)} ones; "
                "fix the count or the label row"
            )
        rows.append(_Row(where, parts[0], [vocab[j] for j, b in enumerate(bits) if b]))
    return rows, vocab


def _is_folder(uri: str) -> bool:
    if _is_s3(uri):
        return uri.endswith("/") or not _exists(uri)
    return os.path.isdir(uri)


def _folder_rows(uri: str) -> tuple[list[_Row], list[str]]:
    """Seed 004: ROOT/<label>/<image>; images deeper down count for the first-level folder."""
    from mlc_ray import storage

    root = uri.rstrip("/")
    by_label: dict[str, list[str]] = {}
    if _is_s3(root):
        prefix = root + "/"
        rels = (
            info.uri[len(prefix) :] for info in storage.iter_objects(prefix) if info.uri.startswith(prefix)
        )
    else:
        rels = (
            os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            for d, _, files in os.walk(root)
            for f in files
        )
    for rel in rels:
        parts = rel.split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue  # files in the root (labels.txt, README) and hidden files
        by_label.setdefault(parts[0], [])
        if parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            by_label[parts[0]].append(rel)
    if not by_label:
        raise ManifestError(
            f"{uri}: no such manifest file, and no label subfolders under it; a folder manifest is "
            "ROOT/<label>/<image> (seed 004)"
        )
    rows = []
    for label in sorted(by_label):
        for rel in sorted(by_label[label]):
            rows.append(_Row(f"row {len(rows) + 1} ({rel})", rel, [label]))
    return rows, sorted(by_label)


# ----------------------------------------------------------------------------------------------
# public API


def load_manifest(
    uri: str | os.PathLike, *, labels_uri: str | None = None, image_label_uri: str | None = None
) -> Manifest:
    """Read a manifest in any supported layout (see the module docstring), local or s3://.

    ``labels_uri``: the vocabulary file (default: ``labels.txt`` beside the manifest, if present).
    ``image_label_uri``: seed 003's label matrix (default: found by ``find_image_label_file``).
    """
    from mlc_ray import storage

    source = _normalise_source(str(uri))
    ext = _extension(source)
    folder = ext not in (*_CSV_EXT, *_JSONL_EXT, *_PARQUET_EXT, *_JSON_EXT) and _is_folder(source)
    if folder:
        source = source.rstrip("/")
        base = source
        beside = storage.join(source, LABELS_FILE)
    else:
        base = _parent(source)
        beside = storage.join(base, LABELS_FILE)
    vocab: list[str] | None = None
    vocab_name: str | None = None
    if labels_uri is not None:
        vocab_name = str(labels_uri)
        vocab = _read_vocabulary(vocab_name)
    elif _exists(beside):
        vocab_name = beside
        vocab = _read_vocabulary(beside)

    if folder:
        rows, folder_labels = _folder_rows(source)
        if vocab is not None:
            extra = [x for x in folder_labels if x not in vocab]
            if extra:
                raise ManifestError(
                    f"{source}: folder(s) {extra} are not labels in {vocab_name}"
                    f"{_did_you_mean(extra[0], vocab)}; rename the folder or add the label"
                )
        else:
            vocab, vocab_name = folder_labels, f"the label folders of {source}"
    elif ext in _CSV_EXT:
        rows, _ = _csv_rows(source)
    elif ext in _JSONL_EXT:
        rows, _ = _jsonl_rows(source)
    elif ext in _PARQUET_EXT:
        rows, _ = _parquet_rows(source)
    elif ext in _JSON_EXT:
        rows, json_vocab = _nus_wide_rows(source)
        if labels_uri is None and json_vocab is not None:
            vocab, vocab_name = list(json_vocab), f"the 'labels' list of {source}"
    else:
        rows, vocab = _seed003_rows(source, image_label_uri, vocab)
        vocab_name = vocab_name or f"the label columns of {source}"
    return _build(rows, source=source, base=base, vocabulary=vocab, vocabulary_source=vocab_name)


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


@dataclass
class LabelStatistics:
    """Counts per label, label cardinality and the commonest label pairs of a manifest."""

    source: str
    num_images: int
    vocabulary: list[str]
    counts: dict[str, int]
    cardinality: float  # mean labels per image
    num_unlabeled: int
    top_pairs: list[tuple[tuple[str, str], int]]
    split_counts: dict[str, int]

    def format(self, max_pairs: int | None = None) -> str:
        """A plain-text table (the jobs log it)."""
        lines = [
            f"manifest {self.source}: {self.num_images} images, {len(self.vocabulary)} labels, "
            f"{self.cardinality:.2f} labels/image, {self.num_unlabeled} without labels",
        ]
        if self.split_counts:
            lines.append("splits: " + ", ".join(f"{k}={v}" for k, v in self.split_counts.items()))
        width = max([len("label"), *(len(x) for x in self.vocabulary)])
        lines.append(f"{'label':<{width}}  {'images':>7}  {'share':>6}")
        for label in self.vocabulary:
            c = self.counts[label]
            share = c / self.num_images if self.num_images else 0.0
            lines.append(f"{label:<{width}}  {c:>7d}  {share:>6.1%}")
        pairs = self.top_pairs if max_pairs is None else self.top_pairs[:max_pairs]
        if pairs:
            lines.append("top co-occurring pairs:")
            for (a, b), c in pairs:
                lines.append(f"  {a} + {b}: {c}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def label_statistics(manifest: Manifest, top_pairs: int = 10) -> LabelStatistics:
    targets = manifest.multi_hot().astype(np.int64)
    counts = targets.sum(axis=0) if len(manifest) else np.zeros(len(manifest.vocabulary), dtype=np.int64)
    per_image = targets.sum(axis=1)
    pairs: Counter[tuple[str, str]] = Counter()
    for labels in manifest.labels:
        pairs.update(combinations(labels, 2))  # labels are already in vocabulary order
    splits = Counter(s or "unset" for s in manifest.splits) if manifest.has_splits else Counter()
    index = {label: i for i, label in enumerate(manifest.vocabulary)}  # ties: vocabulary order
    return LabelStatistics(
        source=manifest.source,
        num_images=len(manifest),
        vocabulary=list(manifest.vocabulary),
        counts={label: int(c) for label, c in zip(manifest.vocabulary, counts, strict=True)},
        cardinality=float(per_image.mean()) if len(manifest) else 0.0,
        num_unlabeled=int((per_image == 0).sum()),
        top_pairs=sorted(pairs.items(), key=lambda kv: (-kv[1], index[kv[0][0]], index[kv[0][1]]))[
            :top_pairs
        ],
        split_counts={k: splits[k] for k in (*SPLITS, "unset") if splits.get(k)},
    )

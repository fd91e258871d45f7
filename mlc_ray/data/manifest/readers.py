"""One reader per manifest format; each returns its ``RawRow``s (and a vocabulary when the format has one).

========================  =====================  ==========================================
format                    reader                 vocabulary it brings
========================  =====================  ==========================================
``*.csv``                 ``csv_rows``           --
``*.jsonl`` / ``*.ndjson`` ``jsonl_rows``         --
``*.parquet`` / ``*.pq``  ``parquet_rows``       --
``*.json`` (seed 002)     ``nus_wide_rows``      the JSON's ``labels`` list, if any
folder/prefix (seed 004)  ``folder_rows``        the label folders
image list (seed 003)     ``seed003_rows``       labels.txt, else ``label_0``..``label_{L-1}``
========================  =====================  ==========================================

``mlc_ray.data.manifest.load.load_manifest`` picks the reader by extension.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections import Counter

from mlc_ray import storage
from mlc_ray.data.manifest.model import IMAGE_EXTENSIONS
from mlc_ray.data.manifest.rows import (
    RawRow,
    exists_quietly,
    read_manifest_bytes,
    read_manifest_text,
    require_columns,
)
from mlc_ray.errors import ManifestError


def csv_rows(uri: str) -> tuple[list[RawRow], None]:
    text = read_manifest_text(uri)
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if not fields:
        raise ManifestError(
            f"{uri}: the manifest has zero rows (no header either); expected 'image,labels[,split]'"
        )
    reader.fieldnames = fields
    require_columns(fields, uri, "header (line 1)")
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
            RawRow(
                f"row {n} (line {reader.line_num})",
                record.get("image"),
                record.get("labels"),
                record.get("split"),
            )
        )
    return rows, None


def jsonl_rows(uri: str) -> tuple[list[RawRow], None]:
    rows = []
    n = 0
    for line_no, line in enumerate(read_manifest_text(uri).splitlines(), start=1):
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
        require_columns(obj.keys(), uri, where)
        rows.append(RawRow(where, obj.get("image"), obj.get("labels"), obj.get("split")))
    return rows, None


def parquet_rows(uri: str) -> tuple[list[RawRow], None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_manifest_bytes(uri)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{uri}: not a readable Parquet file ({exc})") from None
    require_columns(table.column_names, uri, "schema")
    images = table.column("image").to_pylist()
    labels = table.column("labels").to_pylist()
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(images)
    return [
        RawRow(f"row {i + 1}", im, ls, sp)
        for i, (im, ls, sp) in enumerate(zip(images, labels, splits, strict=True))
    ], None


def nus_wide_rows(uri: str) -> tuple[list[RawRow], list[str] | None]:
    try:
        obj = json.loads(read_manifest_text(uri))
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
        rows.append(RawRow(where, sample["image_name"], sample["image_labels"], sample.get("split")))
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
    folder, name = storage.parent(image_list_uri), posixpath.basename(image_list_uri.rstrip("/"))
    candidates = []
    if "image_list" in name:
        candidates.append(name.replace("image_list", "image_label"))
    candidates += ["image_label.txt", "image_label"]
    for candidate in dict.fromkeys(candidates):
        uri = storage.join(folder, candidate)
        if uri != image_list_uri and exists_quietly(uri):
            return uri
    return None


def seed003_rows(
    uri: str, image_label_uri: str | None, vocab: list[str] | None
) -> tuple[list[RawRow], list[str]]:
    label_uri = image_label_uri or find_image_label_file(uri)
    if label_uri is None:
        raise ManifestError(
            f"{uri}: read as a seed 003 image list, but no label matrix was found beside it; put "
            "'image_label.txt' (or the list's name with image_list -> image_label) in the same folder, "
            "or pass image_label_uri="
        )
    list_lines = [
        (n, line) for n, line in enumerate(read_manifest_text(uri).splitlines(), start=1) if line.strip()
    ]
    label_lines = [
        (n, line)
        for n, line in enumerate(read_manifest_text(label_uri, "image_label").splitlines(), start=1)
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
        rows.append(RawRow(where, parts[0], [vocab[j] for j, b in enumerate(bits) if b]))
    return rows, vocab


def is_folder(uri: str) -> bool:
    if storage.is_s3(uri):
        return uri.endswith("/") or not exists_quietly(uri)
    return os.path.isdir(uri)


def folder_rows(uri: str) -> tuple[list[RawRow], list[str]]:
    """Seed 004: ROOT/<label>/<image>; images deeper down count for the first-level folder."""
    root = uri.rstrip("/")
    by_label: dict[str, list[str]] = {}
    if storage.is_s3(root):
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
            rows.append(RawRow(f"row {len(rows) + 1} ({rel})", rel, [label]))
    return rows, sorted(by_label)

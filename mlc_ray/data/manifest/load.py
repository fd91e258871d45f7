"""``load_manifest``: one entry point for every manifest layout, local or s3:// (see the package docstring)."""

from __future__ import annotations

import os

from mlc_ray import storage
from mlc_ray.data.manifest.model import (
    CSV_EXT,
    JSON_EXT,
    JSONL_EXT,
    LABELS_FILE,
    PARQUET_EXT,
    Manifest,
    extension,
)
from mlc_ray.data.manifest.readers import (
    csv_rows,
    folder_rows,
    is_folder,
    jsonl_rows,
    nus_wide_rows,
    parquet_rows,
    seed003_rows,
)
from mlc_ray.data.manifest.rows import build_manifest, did_you_mean, exists_quietly, read_vocabulary
from mlc_ray.errors import ManifestError


def load_manifest(
    uri: str | os.PathLike, *, labels_uri: str | None = None, image_label_uri: str | None = None
) -> Manifest:
    """Read a manifest in any supported layout (see the module docstring), local or s3://.

    ``labels_uri``: the vocabulary file (default: ``labels.txt`` beside the manifest, if present).
    ``image_label_uri``: seed 003's label matrix (default: found by ``find_image_label_file``).
    """
    source = storage.absolute(str(uri))
    ext = extension(source)
    folder = ext not in (*CSV_EXT, *JSONL_EXT, *PARQUET_EXT, *JSON_EXT) and is_folder(source)
    if folder:
        source = source.rstrip("/")
        base = source
        beside = storage.join(source, LABELS_FILE)
    else:
        base = storage.parent(source)
        beside = storage.join(base, LABELS_FILE)
    vocab: list[str] | None = None
    vocab_name: str | None = None
    if labels_uri is not None:
        vocab_name = str(labels_uri)
        vocab = read_vocabulary(vocab_name)
    elif exists_quietly(beside):
        vocab_name = beside
        vocab = read_vocabulary(beside)

    if folder:
        rows, folder_labels = folder_rows(source)
        if vocab is not None:
            extra = [x for x in folder_labels if x not in vocab]
            if extra:
                raise ManifestError(
                    f"{source}: folder(s) {extra} are not labels in {vocab_name}"
                    f"{did_you_mean(extra[0], vocab)}; rename the folder or add the label"
                )
        else:
            vocab, vocab_name = folder_labels, f"the label folders of {source}"
    elif ext in CSV_EXT:
        rows, _ = csv_rows(source)
    elif ext in JSONL_EXT:
        rows, _ = jsonl_rows(source)
    elif ext in PARQUET_EXT:
        rows, _ = parquet_rows(source)
    elif ext in JSON_EXT:
        rows, json_vocab = nus_wide_rows(source)
        if labels_uri is None and json_vocab is not None:
            vocab, vocab_name = list(json_vocab), f"the 'labels' list of {source}"
    else:
        rows, vocab = seed003_rows(source, image_label_uri, vocab)
        vocab_name = vocab_name or f"the label columns of {source}"
    return build_manifest(rows, source=source, base=base, vocabulary=vocab, vocabulary_source=vocab_name)

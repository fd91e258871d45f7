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

One module per responsibility, re-exported here: ``model`` (``Manifest`` and its writer), ``rows``
(raw rows -> validated ``Manifest``), ``readers`` (one per format), ``load`` (``load_manifest``),
``split`` (``split_train_val``), ``stats`` (``label_statistics``). URIs go through ``mlc_ray.storage``.
"""

from mlc_ray.data.manifest.load import load_manifest
from mlc_ray.data.manifest.model import IMAGE_EXTENSIONS, LABELS_FILE, SPLITS, Manifest
from mlc_ray.data.manifest.readers import find_image_label_file
from mlc_ray.data.manifest.split import split_train_val
from mlc_ray.data.manifest.stats import LabelStatistics, label_statistics
from mlc_ray.errors import ManifestError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABELS_FILE",
    "SPLITS",
    "LabelStatistics",
    "Manifest",
    "ManifestError",
    "find_image_label_file",
    "label_statistics",
    "load_manifest",
    "split_train_val",
]

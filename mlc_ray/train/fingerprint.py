"""What a training run was started with, so that resuming it with other settings is refused.

Ray Train resumes a run from its latest checkpoint whenever the same ``run_name`` and ``storage_path``
come again, whatever else changed: another manifest, model or image size would silently continue
the old weights on new data (or fail deep inside a worker on a shape mismatch). So the first start
of a run writes ``<storage_path>/<run_name>/mlc_ray_fingerprint.json`` (before any worker starts) with
every setting that makes it a different training run; a later start compares, and a difference is a
``ConfigError`` naming each changed setting and the two ways out (a new ``--run-name``, or
``--resume-changed`` to resume anyway, which records the new fingerprint).

Settings that only change how long or how fast a run trains (epochs, workers, GPU, lr, ...) are not
in it: training a finished run for more epochs is a resume a user means.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from mlc_ray.config import ConfigError

__all__ = ["FINGERPRINT_FILE", "run_fingerprint", "check_run_fingerprint"]

log = logging.getLogger(__name__)
FINGERPRINT_FILE = "mlc_ray_fingerprint.json"


def run_fingerprint(cfg: Any, data: Any) -> dict[str, Any]:
    """The settings that make a training run what it is (``cfg``: TrainConfig, ``data``: TrainData)."""
    labels = list(data.vocabulary)
    return {
        "train_manifest_sha256": data.train.sha256,
        "val_manifest_sha256": data.val.sha256,
        "labels_sha256": hashlib.sha256(json.dumps(labels).encode()).hexdigest(),
        "num_labels": len(labels),
        "model": cfg.model,
        "width": float(cfg.width),
        "dropout": float(cfg.dropout),
        "image_size": int(cfg.image_size),
        "normalization": cfg.normalization,
        "loss": cfg.loss,
        "label_smoothing": float(cfg.label_smoothing),
        "pos_weight": bool(cfg.pos_weight),
        "pretrained": cfg.pretrained,
        "init_from": cfg.init_from,
    }


def check_run_fingerprint(cfg: Any, fingerprint: dict[str, Any]) -> None:
    """Record ``fingerprint`` for a new run; for an existing one, refuse a different one (see module)."""
    from mlc_ray import storage

    storage.check_local_dir(cfg.storage_path, "--storage-path")
    uri = storage.join(cfg.run_dir, FINGERPRINT_FILE)
    try:
        saved = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        saved = None
    except OSError as exc:  # e.g. a file where a directory of the path should be
        raise _unwritable(cfg, uri, exc) from None
    except ValueError:
        saved = {}  # damaged: treat every setting as changed
    if saved is not None and saved != fingerprint:
        changed = [
            f"{key} {_short(saved.get(key))} -> {_short(fingerprint.get(key))}"
            for key in sorted(set(saved) | set(fingerprint))
            if saved.get(key) != fingerprint.get(key)
        ]
        if not cfg.resume_changed:
            raise ConfigError(
                f"--run-name {cfg.run_name}: this run in {cfg.storage_path} was started with other "
                f"settings ({'; '.join(changed)}); start a new run with another --run-name, or pass "
                "--resume-changed (resume_changed: true) to resume its checkpoint anyway"
            )
        log.warning("resuming run %s with changed settings (--resume-changed): %s", cfg.run_name, changed)
    if saved != fingerprint:
        try:  # the run's first write to its storage: a directory that cannot be made is the user's to fix
            storage.write_text(uri, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise _unwritable(cfg, uri, exc) from None


def _unwritable(cfg: Any, uri: str, exc: OSError) -> ConfigError:
    return ConfigError(
        f"--storage-path {cfg.storage_path}: cannot write this run's files there ({exc.filename or uri}: "
        f"{exc.strerror or exc}); give a directory this job can create and write"
    )


def _short(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text

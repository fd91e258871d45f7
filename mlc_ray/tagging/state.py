"""Run identity and resumable state of a tagging run, and the index that ``--incremental`` checks.

A run's identity is every setting that changes a row, unless ``--run-id`` names it:
``row_affecting_settings`` collects them in one dict (model version, thresholds sha256, backend,
precision, preprocessing, input, output; tag-time options join it as they are added) and
``default_run_id`` hashes that dict, so running the same command again *resumes* the same run while
``--precision int8`` after an fp32 run, a re-calibrated model or another backend is a new run. The
settings are kept in the run's state: a resume under an explicit ``--run-id`` with other settings is
refused, naming them. Its state lives in ``<output>/_runs/<run_id>/``:

* ``state.json`` — the run's start date (the ``dt`` partition every file of the run goes to, kept
  so a run resumed after midnight stays whole), the pinned model, whether the listing finished and
  how many shards/images it produced;
* ``shards/shard-NNNNNN.json`` — the shard descriptors (``inputs.ShardStore``);
* ``_SUCCESS`` — the summary JSON of the finished run (counts, errors by code, timings).

``TaggedIndex`` is what ``--incremental`` compares against: the set of (image_uri, source_etag)
already tagged by the same model name and version, read from the table's Parquet files (only those
columns, streamed batch by batch) and held as one sorted ``uint64`` array of 64-bit hashes — 8 bytes
per tagged image (10 M images = 80 MB), whatever the URI lengths. Rows whose error is
``unreadable`` are not counted as tagged: a transient read failure is retried by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mlc_ray.errors import UserError

__all__ = [
    "RunState",
    "row_affecting_settings",
    "default_run_id",
    "changed_settings",
    "run_dir",
    "TaggedIndex",
    "key_hashes",
]

log = logging.getLogger(__name__)
STATE_FORMAT = 1


def row_affecting_settings(
    *,
    model_pinned: str,
    thresholds_sha256: str,
    backend: str,
    precision: str,
    preprocess: Mapping[str, Any],
    input_uri: str,
    output_uri: str,
    tag_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Every setting that changes what a row holds: the run identity. ``tag_options`` are the
    tag-time options (``TagOptions.to_dict()``: min score, top-k, label subsets), kept out of the
    identity when none is given so that runs started before they existed still resume; ``options``
    are any other setting that changes scores; add each new one here, by keyword, JSON-serialisable."""
    if tag_options:
        options["tag_options"] = dict(tag_options)
    return {
        "model": model_pinned,
        "thresholds_sha256": thresholds_sha256,
        "backend": backend,
        "precision": precision,
        "preprocess_sha256": hashlib.sha256(
            json.dumps(dict(preprocess), sort_keys=True).encode()
        ).hexdigest(),
        "input": input_uri.rstrip("/"),
        "output": output_uri.rstrip("/"),
        **options,
    }


def default_run_id(settings: Mapping[str, Any]) -> str:
    """Hash of the run identity (``row_affecting_settings``): same settings -> same run id."""
    text = json.dumps(dict(settings), sort_keys=True, default=str)
    return "r" + hashlib.sha256(text.encode()).hexdigest()[:12]


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for each row-affecting setting that differs (a state without any: none)."""
    if not saved:
        return []
    return [
        f"{key}: {saved.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def run_dir(output: str, run_id: str) -> str:
    from mlc_ray import storage

    return storage.join(output, "_runs", run_id)


@dataclass
class RunState:
    """What a resumed run must reuse: its ``dt`` partition, model pin and shard listing."""

    run_id: str
    dt: str  # YYYY-MM-DD, the run's start date (UTC)
    started_at: str  # ISO time of the first start
    model: str  # pinned model URI (models:/NAME/VERSION or bundle dir)
    input: str
    output: str
    listing_complete: bool = False
    n_shards: int = 0
    n_images: int = 0
    attempts: int = 1  # how many times this run was started (1 = never resumed)
    config: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # row_affecting_settings: what the run id hashes
    format_version: int = STATE_FORMAT

    @staticmethod
    def uri(output: str, run_id: str) -> str:
        from mlc_ray import storage

        return storage.join(run_dir(output, run_id), "state.json")

    @classmethod
    def new(
        cls, *, run_id: str, model: str, input: str, output: str, config: dict, settings: dict | None = None
    ) -> RunState:
        now = datetime.now(UTC)
        return cls(
            run_id=run_id,
            dt=now.strftime("%Y-%m-%d"),
            started_at=now.isoformat(timespec="seconds"),
            model=model,
            input=input,
            output=output,
            config=config,
            settings=dict(settings or {}),
        )

    @classmethod
    def load(cls, output: str, run_id: str) -> RunState | None:
        """The saved state, or None when this run never started."""
        from mlc_ray import storage

        uri = cls.uri(output, run_id)
        try:
            data = json.loads(storage.read_text(uri))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ValueError(f"{uri}: damaged run state ({exc}); delete it to restart run {run_id}") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> None:
        from mlc_ray import storage

        uri = self.uri(self.output, self.run_id)
        try:
            storage.write_text(uri, json.dumps(asdict(self), indent=2) + "\n")
        except OSError as exc:
            if storage.is_s3(uri):  # storage's own S3 errors already name the URI and the fix
                raise
            raise UserError(
                f"--output {self.output}: cannot write the run's state ({exc.filename or uri}: "
                f"{exc.strerror or exc})"
            ) from None


def key_hashes(uris: list[str], etags: list[str | None]) -> np.ndarray:
    """64-bit hashes of (uri, etag) pairs (blake2b, 8 bytes): what TaggedIndex stores."""
    out = np.empty(len(uris), dtype=np.uint64)
    for i, (uri, etag) in enumerate(zip(uris, etags, strict=True)):
        digest = hashlib.blake2b(f"{uri}\x00{etag or ''}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


class TaggedIndex:
    """Sorted hashes of the (image_uri, source_etag) pairs one model version has already tagged."""

    def __init__(self, hashes: np.ndarray, *, by_uri: bool = False) -> None:
        self.hashes = np.unique(np.asarray(hashes, dtype=np.uint64))
        self.by_uri = by_uri  # compare URIs only (manifest inputs: the listing knows no ETags)

    def __len__(self) -> int:
        return int(self.hashes.size)

    @classmethod
    def from_table(
        cls, output: str, model_name: str, model_version: str, *, by_uri: bool = False
    ) -> TaggedIndex:
        """Stream the table under ``output`` (only 3 columns, rows of this model version) and keep the
        hashes of the tagged images; ``by_uri`` ignores ETags (for manifest inputs)."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        from mlc_ray import storage

        fs, path = storage.arrow_filesystem(output)
        try:
            dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        except (FileNotFoundError, OSError) as exc:
            log.info("incremental: no existing table at %s (%s); every image is new", output, exc)
            return cls(np.zeros(0, dtype=np.uint64), by_uri=by_uri)
        names = set(dataset.schema.names)
        if not {"image_uri", "source_etag", "model_name", "model_version", "error"} <= names:
            return cls(np.zeros(0, dtype=np.uint64), by_uri=by_uri)
        filt = (pc.field("model_name") == model_name) & (pc.field("model_version") == model_version)
        chunks = []
        for batch in dataset.to_batches(
            columns=["image_uri", "source_etag", "error"], filter=filt, batch_size=65_536
        ):
            errors = batch.column("error").to_pylist()
            keep = [not (e or "").startswith("unreadable") for e in errors]
            uris = [u for u, k in zip(batch.column("image_uri").to_pylist(), keep, strict=True) if k]
            etags = [t for t, k in zip(batch.column("source_etag").to_pylist(), keep, strict=True) if k]
            chunks.append(key_hashes(uris, [None] * len(uris) if by_uri else etags))
        return cls(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64), by_uri=by_uri)

    def contains(self, uris: list[str], etags: list[str | None]) -> np.ndarray:
        """Boolean mask: which (uri, etag) pairs are already tagged."""
        if not uris or self.hashes.size == 0:
            return np.zeros(len(uris), dtype=bool)
        h = key_hashes(uris, [None] * len(uris) if self.by_uri else etags)
        pos = np.searchsorted(self.hashes, h)
        pos = np.minimum(pos, self.hashes.size - 1)
        return self.hashes[pos] == h

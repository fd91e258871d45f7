"""Resolve a model URI to one concrete version and its verified local files (cached per version).

``models:/NAME@ALIAS`` is pinned to the version the alias points at *now*, once; the files are
cached under ``cache_dir/NAME/VERSION/artifacts`` and checked against their sha256 tags on every
resolve. An s3:// bundle directory is cached by content (its ``sha256.json``, or its listing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mlc_ray import bundle as bundle_layout
from mlc_ray.errors import UserError
from mlc_ray.registry.artifacts import (
    MODEL_ARTIFACT_SUBDIR,
    SHA_TAG_PREFIX,
    bundle_artifacts,
    local_bundle_dir,
    verify_artifacts,
)
from mlc_ray.registry.versions import ArtifactIntegrityError, get_version

log = logging.getLogger("mlc_ray.registry")


@dataclass(frozen=True)
class ResolvedModel:
    """A model pinned to one concrete version, with its verified files in ``local_dir``."""

    name: str | None  # registered model name; None for a plain bundle directory
    version: str | None  # concrete version the alias pointed at when resolved
    alias: str | None  # the alias the URI named, if any
    local_dir: str  # a local bundle directory: model.onnx, thresholds.json, labels.json, ...
    uri: str  # what the user asked for
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def pinned_uri(self) -> str:
        """``models:/NAME/VERSION`` (or the bundle directory): what a run should record."""
        return f"models:/{self.name}/{self.version}" if self.name else self.uri

    def sha256(self, file: str) -> str | None:
        return self.tags.get(f"{SHA_TAG_PREFIX}{file}")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise UserError(f"bad model URI '{uri}': use models:/NAME@ALIAS (e.g. @champion) or models:/NAME/VERSION")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLC_RAY_MODEL_CACHE", Path.home() / ".cache" / "mlc_ray" / "models"))


def _download_version(name: str, version: str, target: Path) -> None:
    """Download the version's logged model into ``target`` (atomically: temp dir, then rename)."""
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> ResolvedModel:
    """Pin ``uri`` to one version and return its verified local files (downloaded once per version).

    ``uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a bundle directory (local or
    s3://). Files are cached under ``cache_dir/NAME/VERSION`` (default ``~/.cache/mlc_ray/models``,
    or ``$MLC_RAY_MODEL_CACHE``); a cached copy that no longer matches the version's sha256 tags is
    downloaded again, and a download that does not match raises ``ArtifactIntegrityError``. An
    s3:// bundle is cached by content: every resolve reads its ``sha256.json`` (the bundle's manifest
    of hashes) and checks the cached files against it, so a bundle re-exported under the same
    prefix is downloaded again; a bundle written before manifests existed is compared by its
    listing (name, size, ETag) instead.
    """
    from mlc_ray import storage

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not uri.startswith("models:/"):
        if storage.is_s3(uri):
            local_dir = _cached_s3_bundle(uri, cache)
        else:
            local_dir = Path(uri.removeprefix("file://")).expanduser()
        bundle_artifacts(local_dir)  # required files present, clear error otherwise
        return ResolvedModel(None, None, None, str(local_dir.resolve()), uri, {})

    name, version, alias = parse_model_uri(uri)
    mv = get_version(name, version, alias)
    version = str(mv.version)
    tags = {str(k): str(v) for k, v in (mv.tags or {}).items()}
    where = f"{name} version {version}"
    target = cache / name / version
    bundle_dir = target / MODEL_ARTIFACT_SUBDIR
    if bundle_dir.is_dir():
        try:
            verify_artifacts(bundle_dir, tags, where=where)
            log.info("model %s -> %s (cached at %s)", uri, where, bundle_dir)
            return ResolvedModel(name, version, alias, str(bundle_dir), uri, tags)
        except ArtifactIntegrityError as exc:
            log.warning("cached copy of %s is stale or damaged (%s); downloading again", where, exc)
    _download_version(name, version, target)
    verify_artifacts(bundle_dir, tags, where=where)
    log.info("model %s -> %s (downloaded to %s, sha256 verified)", uri, where, bundle_dir)
    return ResolvedModel(name, version, alias, str(bundle_dir), uri, tags)


def _s3_listing(uri: str) -> dict[str, list]:
    """name -> [size, etag] of the bundle's top-level objects (what a legacy bundle is keyed by)."""
    from mlc_ray import storage

    prefix = uri.rstrip("/") + "/"
    listing = {}
    for obj in storage.iter_objects(prefix):
        rel = obj.uri[len(prefix) :]
        if rel and "/" not in rel:
            listing[rel] = [getattr(obj, "size", None), getattr(obj, "etag", None)]
    return listing


def _cached_s3_bundle(uri: str, cache: Path) -> Path:
    """The local copy of an s3:// bundle, checked against the bundle's current content on every call."""
    from mlc_ray import storage

    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    target = cache / "_bundles" / key
    stamp = target.parent / f"{key}.listing.json"  # beside the copy: the bundle dir holds bundle files only
    manifest_uri = storage.join(uri, bundle_layout.SHA256_MANIFEST)
    try:
        expected = bundle_layout.parse_manifest(storage.read_text(manifest_uri), manifest_uri)
    except FileNotFoundError:
        expected = None
    if expected is not None:
        if target.is_dir():
            cached = bundle_layout.ModelBundle(target)
            try:
                cached.verify(expected)
                extra = sorted(set(cached.present()) - set(expected))
                if not extra:
                    log.info("model bundle %s: cached copy matches its sha256.json (%s)", uri, target)
                    return target
                log.info("model bundle %s no longer has %s; downloading again", uri, ", ".join(extra))
            except bundle_layout.BundleIntegrityError as exc:
                log.info("model bundle %s changed since it was cached (%s); downloading again", uri, exc)
        fingerprint = None
    else:
        fingerprint = _s3_listing(uri)
        if target.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
            return target
        log.info("model bundle %s has no sha256.json: keyed by its listing (size, ETag)", uri)
    tmp = target.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with local_bundle_dir(uri) as local:
            shutil.copytree(local, tmp)
        if expected is not None:
            try:
                bundle_layout.ModelBundle(tmp).verify(expected)
            except bundle_layout.BundleIntegrityError as exc:
                raise ArtifactIntegrityError(
                    f"{uri}: the downloaded files do not match the bundle's sha256.json ({exc}); if the "
                    "bundle is being re-exported right now, run again when the export has finished"
                ) from None
        stamp.unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        if fingerprint is not None:
            stamp.write_text(json.dumps(fingerprint, sort_keys=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

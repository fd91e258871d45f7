"""The MLflow model registry: register a model bundle, resolve a model URI, promote on evidence.

A registered model version is one model bundle (see ``docs/internals.md``) logged as an MLflow
pyfunc model (``mlc_ray/pyfunc_model.py``, "models from code") whose pyfunc ``artifacts`` are the
bundle's files, with tags that make it auditable and verifiable:

* ``sha256.<file>`` for every bundle file (``resolve_model`` refuses a download that differs);
* ``training_run_id``, ``manifest_sha256``/``manifest_uri`` (when training passes them),
  ``command_line``, ``git_commit``, ``metric.<name>`` for the scalar validation metrics;
* the held-out evidence (``TrainingEvidence``): ``eval_data_uri`` (the ``--val-data`` manifest, or
  the seeded split's val rows logged as ``evidence/val_manifest.csv``), ``eval_data_sha256``, and
  ``train_images_uri`` (``evidence/train_images.csv``: URI + sha256 of every training image).

A new version gets alias ``challenger``; ``promote`` moves ``champion`` (and keeps
``previous-champion``) only when the candidate beats the champion on the same evaluation data,
each at its own thresholds, and writes ``promotion.*`` audit tags on both versions either way.
The evaluation data defaults to the candidate's ``eval_data_uri``; evaluation data that contains
the candidate's training images (same URI or same bytes) is refused unless explicitly allowed.
Jobs resolve an alias to a concrete version once, at start (``resolve_model``), and use that
version for the whole run.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from mlc_ray import bundle as bundle_layout
from mlc_ray.cli import UserError

__all__ = [
    "ARTIFACT_FILES",
    "CHAMPION",
    "CHALLENGER",
    "PREVIOUS_CHAMPION",
    "ArtifactIntegrityError",
    "ModelNotFoundError",
    "PromotionDecision",
    "ResolvedModel",
    "TrainingEvidence",
    "default_cache_dir",
    "parse_model_uri",
    "promote",
    "register_bundle",
    "resolve_model",
    "rollback",
    "verify_artifacts",
]

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
PROMOTED_FROM_TAG = "promoted_from"  # on a production version copied from a staging model

# pyfunc artifact key -> bundle file (mlc_ray.bundle's one list). Extra regular files in the bundle
# are logged too (key = name).
ARTIFACT_FILES: dict[str, str] = {key: name for name, key in bundle_layout.PYFUNC_KEYS.items()}
REQUIRED_FILES = bundle_layout.REQUIRED_FOR_INFERENCE
# Small files also logged as plain run artifacts, so they are readable in the MLflow UI.
UI_FILES = (
    bundle_layout.THRESHOLDS,
    bundle_layout.LABELS,
    bundle_layout.PREPROCESS,
    bundle_layout.METRICS,
    bundle_layout.MODEL_JSON,
)
SHA_TAG_PREFIX = "sha256."
MODEL_ARTIFACT_SUBDIR = "artifacts"  # where pyfunc puts `artifacts=` files inside the logged model
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_EXPERIMENT = "mlc_ray-registry"
EVIDENCE_DIR = "evidence"  # run artifact folder of the evaluation data and the training-image list
EVAL_DATA_TAG = "eval_data_uri"
EVAL_DATA_SHA_TAG = "eval_data_sha256"
TRAIN_IMAGES_TAG = "train_images_uri"
MAX_TAG_VALUE = 5000  # MLflow's limit on a model version tag value


class ModelNotFoundError(UserError):
    """Unknown registered model, version or alias; the message lists what exists."""


class ArtifactIntegrityError(UserError):
    """A downloaded artifact does not match its sha256 tag: the version must not be used."""

    exit_code = 4


# --------------------------------------------------------------------------------------------- utils


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in (
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "INVALID_PARAMETER_VALUE",
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _acting_user() -> str:
    """Who acts on the registry: the MLflow user when the server authenticates, else the OS user."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return f"{getpass.getuser()} (local)"
    except (KeyError, OSError):
        return "unknown"


def _git_commit() -> str | None:
    """HEAD of the checkout this package runs from (with '-dirty' if it has local changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def _clip(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))] = float(value)
    return out


# --------------------------------------------------------------------------------------------- register


@contextmanager
def _local_bundle(bundle_dir: str) -> Iterator[Path]:
    """The bundle as a local directory (an s3:// bundle is downloaded to a temporary one)."""
    from mlc_ray import storage

    if not storage.is_s3(bundle_dir):
        path = Path(bundle_dir.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise UserError(f"model bundle {bundle_dir} does not exist (train/export write one)")
    with bundle_layout.local_bundle(bundle_dir) as local:
        yield local.root


def _bundle_artifacts(local: Path) -> dict[str, Path]:
    """pyfunc artifact key -> file, for every regular file at the top of the bundle."""
    missing = [f for f in REQUIRED_FILES if not (local / f).is_file()]
    if missing:
        raise UserError(f"model bundle {local} lacks {', '.join(missing)}: export/calibrate the bundle first")
    by_file = {v: k for k, v in ARTIFACT_FILES.items()}
    artifacts = {}
    for path in sorted(local.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        artifacts[by_file.get(path.name, re.sub(r"[^A-Za-z0-9_]", "_", path.name))] = path
    return artifacts


def _signature_and_example(local: Path) -> tuple[Any, Any]:
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

    inputs = Schema([ColSpec(DataType.string, "image")])
    outputs = Schema(
        [
            ColSpec(DataType.string, "image", required=False),
            ColSpec(Array(DataType.string), "labels"),
            ColSpec(
                Array(Object([Property("label", DataType.string), Property("score", DataType.float)])),
                "scores",
            ),
            ColSpec(DataType.string, "error", required=False),
        ]
    )
    # MLflow stores the example as JSON beside the model and runs it through predict() when
    # logging. No image URI resolves everywhere, so the example is a relative path that resolves
    # nowhere: it documents the input and comes back as a row with `error` set, without network.
    example = pd.DataFrame({"image": ["images/example.jpg"]})
    return ModelSignature(inputs=inputs, outputs=outputs), example


def _pip_requirements() -> list[str]:
    from importlib import metadata

    reqs = []
    for dist in ("mlflow", "onnxruntime", "numpy", "pandas", "pillow", "pyarrow", "boto3"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    try:
        reqs.append(f"mlc_ray=={metadata.version('mlc_ray')}")
    except metadata.PackageNotFoundError:
        reqs.append("mlc_ray")
    return reqs


@contextmanager
def _run_for(run_id: str | None, name: str) -> Iterator[tuple[Any, bool]]:
    """The MLflow run to log into: the training run (resumed if finished) or a new one."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and (run_id is None or active.info.run_id == run_id):
        yield active, False
        return
    if run_id is not None:
        try:
            _client().get_run(run_id)
        except MlflowException as exc:
            if not _is_not_found(exc):
                raise
            raise UserError(f"training run {run_id} not found at {mlflow.get_tracking_uri()}") from exc
        with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
            yield run, False
        return
    # An explicit experiment id, not mlflow.set_experiment(): registering must not change the
    # caller's active experiment.
    experiment_name = os.environ.get("MLC_RAY_REGISTRY_EXPERIMENT", DEFAULT_EXPERIMENT)
    experiment = _client().get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else _client().create_experiment(experiment_name)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"register-{name}", nested=active is not None
    ) as run:
        yield run, True


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


def _hash_images(uris: list[str]) -> list[str]:
    """sha256 of each image's bytes ('' for one that cannot be read), read 8 at a time."""
    from mlc_ray.evaluation import _read_all

    return [hashlib.sha256(data).hexdigest() if data is not None else "" for data in _read_all(uris)]


def _log_evidence(evidence: TrainingEvidence, run_id: str, tmp: Path) -> dict[str, str]:
    """Log the evidence files into the active run ``run_id``; return the version tags naming them."""
    import csv

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
            writer.writerows(zip(images, _hash_images(images), strict=True))
        mlflow.log_artifact(str(path), artifact_path=EVIDENCE_DIR)
        tags[TRAIN_IMAGES_TAG] = f"{base}/train_images.csv"
    return tags


def register_bundle(
    bundle_dir: str | os.PathLike[str],
    name: str,
    *,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    command_line: str | None = None,
    alias: str | None = CHALLENGER,
    evidence: TrainingEvidence | None = None,
) -> Any:
    """Log the bundle as a pyfunc model, register it as a new version of ``name``, tag it, alias it.

    ``run_id`` is the training run (the model is logged into it); without it a ``register-NAME``
    run is created. ``tags`` are added to the version (training passes ``manifest_sha256`` and
    ``manifest_uri``); ``command_line`` defaults to this process's argv. ``evidence`` (training
    passes it) logs the evaluation data and the training-image list that promotion uses. Returns the
    ``mlflow.entities.model_registry.ModelVersion`` (with its tags).
    """
    import mlflow

    bundle_dir = str(bundle_dir)
    with _local_bundle(bundle_dir) as local:
        artifacts = _bundle_artifacts(local)
        shas = {path.name: _sha256_file(path) for path in artifacts.values()}
        bundle = bundle_layout.ModelBundle(local)
        metrics: dict[str, Any] = bundle.metrics() if bundle.has(bundle_layout.METRICS) else {}
        scalar_metrics = _scalar_metrics(metrics)

        version_tags: dict[str, str] = {f"{SHA_TAG_PREFIX}{f}": sha for f, sha in shas.items()}
        version_tags["bundle_uri"] = bundle_dir
        version_tags["command_line"] = command_line or shlex.join([sys.executable, *sys.argv])
        commit = _git_commit()
        if commit:
            version_tags["git_commit"] = commit
        for key, value in scalar_metrics.items():
            version_tags[f"metric.{key}"] = f"{value:.6g}"
        if bundle.has(bundle_layout.MODEL_JSON):
            model_cfg = bundle.model_spec()
            for key in ("arch", "manifest_sha256", "manifest_uri"):
                if key in model_cfg:
                    version_tags[key] = str(model_cfg[key])
        for key, value in (tags or {}).items():
            version_tags[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)

        signature, example = _signature_and_example(local)
        with _run_for(run_id, name) as (run, new_run):
            version_tags["training_run_id"] = str(
                run_id or version_tags.get("training_run_id", run.info.run_id)
            )
            for fname in UI_FILES:
                if (local / fname).is_file():
                    mlflow.log_artifact(str(local / fname), artifact_path="bundle")
            if new_run and scalar_metrics:
                mlflow.log_metrics(scalar_metrics)
            if evidence is not None:
                with tempfile.TemporaryDirectory(prefix="mlc_ray-evidence-") as evidence_tmp:
                    version_tags.update(_log_evidence(evidence, run.info.run_id, Path(evidence_tmp)))
            mlflow.set_tags({"mlc_ray.registered_model": name, "mlc_ray.bundle_uri": bundle_dir})
            with warnings.catch_warnings():
                # predict() has no type hints on purpose (see pyfunc_model.py); MLflow nags about it.
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_FILE),
                    artifacts={key: str(path) for key, path in artifacts.items()},
                    signature=signature,
                    input_example=example,
                    pip_requirements=_pip_requirements(),
                    registered_model_name=name,
                )
        version = str(info.registered_model_version)
        client = _client()
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, key, _clip(value))
        if alias:
            client.set_registered_model_alias(name, alias, version)
        log.info(
            "registered %s version %s (%s) from %s%s",
            name,
            version,
            info.model_uri,
            bundle_dir,
            f"; alias '{alias}'" if alias else "",
        )
        return client.get_model_version(name, version)


# --------------------------------------------------------------------------------------------- resolve


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


def _aliases(name: str) -> dict[str, str]:
    """alias -> version for a registered model (search_model_versions() leaves aliases empty)."""
    model = _client().get_registered_model(name)
    aliases = getattr(model, "aliases", None) or {}
    return {str(k): str(v) for k, v in dict(aliases).items()}


def _known_models() -> list[str]:
    try:
        return sorted(m.name for m in _client().search_registered_models(max_results=50))
    except Exception:  # listing is a courtesy in an error message; never mask the real error
        return []


def _require_model(name: str) -> None:
    """ModelNotFoundError listing the registered models when ``name`` is not one of them."""
    import mlflow

    try:
        _client().get_registered_model(name)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        known = _known_models()
        raise ModelNotFoundError(
            f"no registered model '{name}' at {mlflow.get_tracking_uri()}; "
            f"registered models: {', '.join(known) if known else '(none)'}"
        ) from exc


def _get_version(name: str, version: str | None, alias: str | None) -> Any:
    """The ModelVersion for a version number or an alias, or ModelNotFoundError listing what exists."""
    _require_model(name)
    client = _client()
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        aliases = _aliases(name)
        listed = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "(none)"
        what = f"alias '@{alias}'" if alias is not None else f"version {version}"
        raise ModelNotFoundError(f"model '{name}' has no {what}; aliases: {listed}") from exc


def verify_artifacts(local_dir: str | os.PathLike[str], tags: Mapping[str, str], *, where: str = "") -> None:
    """Check every ``sha256.<file>`` tag against the file in ``local_dir``; raise naming the first bad file."""
    local_dir = Path(local_dir)
    expected = {k[len(SHA_TAG_PREFIX) :]: v for k, v in tags.items() if k.startswith(SHA_TAG_PREFIX)}
    if not expected:
        raise ArtifactIntegrityError(
            f"{where or local_dir}: no sha256.<file> tags; only versions registered by mlc_ray can be verified"
        )
    for file, sha in sorted(expected.items()):
        path = local_dir / file
        if not path.is_file():
            raise ArtifactIntegrityError(f"{where}: artifact {file} is missing from the downloaded model")
        actual = _sha256_file(path)
        if actual != sha:
            raise ArtifactIntegrityError(
                f"{where}: artifact {file} does not match its sha256 tag (expected {sha[:12]}..., "
                f"got {actual[:12]}...): the stored file was changed after registration; refusing to use it"
            )


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
        _bundle_artifacts(local_dir)  # required files present, clear error otherwise
        return ResolvedModel(None, None, None, str(local_dir.resolve()), uri, {})

    name, version, alias = parse_model_uri(uri)
    mv = _get_version(name, version, alias)
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
        with _local_bundle(uri) as local:
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


# --------------------------------------------------------------------------------------------- promote


@dataclass
class PromotionDecision:
    """What promotion decided and why; ``report()`` is the one-screen summary the job prints."""

    name: str
    action: str  # "promote" | "rollback"
    promoted: bool  # champion moved (or would move, under dry_run)
    reason: str
    candidate_version: str | None = None
    champion_version: str | None = None  # champion before the decision
    metric: str = "macro_f1"
    candidate_value: float | None = None
    champion_value: float | None = None
    min_delta: float = 0.0
    max_label_drop: float = 0.03
    label_drops: dict[str, float] = field(default_factory=dict)  # label -> champion F1 - candidate F1 (> 0)
    eval_data: str | None = None
    n_images: int = 0
    n_errors: int = 0
    train_overlap: str = ""  # how many eval images the candidate was trained on, and how that was checked
    dry_run: bool = False
    candidate_source: str | None = None  # models:/STAGING/VERSION when the candidate is another model's
    # further evidence a promote() gate attached (the shadow comparison, mlc_ray/shadow.py): objects
    # with report_lines() -> list[str], audit_tags() -> dict (latest tags) and history() -> dict
    # (short entries for the promotion.log record)
    evidence: list[Any] = field(default_factory=list)
    at: str = field(default_factory=_now_utc)
    by: str = field(default_factory=_acting_user)
    _event_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6], repr=False)
    _seq: int = field(default_factory=time.time_ns, repr=False)  # orders events within one second

    @property
    def exit_code(self) -> int:
        return 0 if self.promoted else 3

    def report(self) -> str:
        lines = []
        if self.action == "rollback":
            lines.append(f"rollback of '{self.name}'{' (dry run)' if self.dry_run else ''}")
        else:
            champ = f"v{self.champion_version} (champion)" if self.champion_version else "no champion yet"
            cand = f"v{self.candidate_version}"
            if self.candidate_source:
                cand = self.candidate_source + (
                    f" (copied as v{self.candidate_version})" if self.promoted and not self.dry_run else ""
                )
            lines.append(
                f"promotion of '{self.name}' {cand} vs {champ}{' (dry run)' if self.dry_run else ''}"
            )
            if self.eval_data:
                lines.append(
                    f"eval data  {self.eval_data}: {self.n_images} images, {self.n_errors} unreadable"
                )
            if self.train_overlap:
                lines.append(f"held out   {self.train_overlap}")
            if self.candidate_value is not None:
                cand = f"{self.candidate_value:.4f}"
                champ_v = "-" if self.champion_value is None else f"{self.champion_value:.4f}"
                delta = (
                    ""
                    if self.champion_value is None
                    else f"  delta {self.candidate_value - self.champion_value:+.4f} (needs >= {self.min_delta:+.4f})"
                )
                lines.append(f"{self.metric:<10} candidate {cand}  champion {champ_v}{delta}")
            if self.label_drops:
                worst = sorted(self.label_drops.items(), key=lambda kv: -kv[1])[:8]
                drops = ", ".join(f"{label} -{d:.3f}" for label, d in worst)
                lines.append(f"F1 drops   (limit {self.max_label_drop:.3f}): {drops}")
        for item in self.evidence:
            lines.extend(item.report_lines())
        verdict = "PROMOTED" if self.promoted else "REFUSED"
        if self.action == "rollback":
            verdict = "ROLLED BACK" if self.promoted else "NOT ROLLED BACK"
        if self.dry_run:
            verdict = f"would be {verdict.lower()} (dry run: nothing changed)"
        lines.append(f"decision   {verdict}: {self.reason}")
        return "\n".join(lines)

    def audit_tags(self, role: str) -> dict[str, str]:
        tags = {
            "promotion.at": self.at,
            "promotion.action": self.action,
            "promotion.role": role,
            "promotion.decision": "promoted" if self.promoted else "refused",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.candidate_version": str(self.candidate_version or ""),
            "promotion.champion_version": str(self.champion_version or ""),
            "promotion.by": self.by,
        }
        if self.candidate_source:
            tags["promotion.candidate_source"] = self.candidate_source
        if self.action == "rollback":
            tags["promotion.decision"] = "rolled-back" if self.promoted else "refused"
        if self.candidate_value is not None:
            tags["promotion.candidate_value"] = f"{self.candidate_value:.6f}"
        if self.champion_value is not None:
            tags["promotion.champion_value"] = f"{self.champion_value:.6f}"
        if self.eval_data:
            tags["promotion.eval_data"] = self.eval_data
        if self.train_overlap:
            tags["promotion.train_overlap"] = self.train_overlap
        # One history entry per event, so earlier decisions are not overwritten by later ones.
        history_key = f"promotion.log.{self.at.replace(':', '').replace('-', '')}.{self._event_id}"
        record = {k: tags[k] for k in tags if k not in ("promotion.at",)}
        record["promotion.seq"] = str(self._seq)
        for item in self.evidence:
            tags.update(item.audit_tags())
            record.update(item.history())
        tags[history_key] = json.dumps(record, sort_keys=True, separators=(",", ":"))
        return tags


def _write_audit(decision: PromotionDecision, roles: Mapping[str, str | tuple[str, str] | None]) -> None:
    """``roles``: role -> version of ``decision.name``, or (model, version) for another model's."""
    client = _client()
    for role, where in roles.items():
        if where is None:
            continue
        model, version = where if isinstance(where, tuple) else (decision.name, where)
        for key, value in decision.audit_tags(role).items():
            client.set_model_version_tag(model, version, key, _clip(value))


def _fetch_evidence_file(uri: str, dst: Path) -> str:
    """A ``runs:/RUN/evidence/FILE`` artifact downloaded into ``dst`` (any other URI is returned as is)."""
    import mlflow

    if not uri.startswith("runs:/"):
        return uri
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot download {uri} from {mlflow.get_tracking_uri()}: {exc}") from exc


def _load_eval_manifest(uri: str) -> Any:
    """The evaluation manifest at ``uri``; a ``runs:/`` one comes with its labels.txt."""
    from mlc_ray.data.manifest import load_manifest

    if not uri.startswith("runs:/"):
        return load_manifest(uri)
    with tempfile.TemporaryDirectory(prefix="mlc_ray-eval-data-") as tmp:
        local = _fetch_evidence_file(uri, Path(tmp))
        labels = _fetch_evidence_file(uri.rsplit("/", 1)[0] + "/labels.txt", Path(tmp))
        return load_manifest(local, labels_uri=labels)


@dataclass(frozen=True)
class _Overlap:
    checked: bool  # False: the version records no training-image list
    by_uri: int = 0
    by_content: int = 0  # same bytes under another URI

    @property
    def count(self) -> int:
        return self.by_uri + self.by_content


def _training_overlap(tags: Mapping[str, str], manifest: Any, images: list[bytes | None]) -> _Overlap:
    """How many evaluation images are the candidate's training images, by URI or by sha256 of the bytes."""
    import csv

    uri = tags.get(TRAIN_IMAGES_TAG)
    if not uri:
        return _Overlap(checked=False)
    with (
        tempfile.TemporaryDirectory(prefix="mlc_ray-train-images-") as tmp,
        open(_fetch_evidence_file(uri, Path(tmp)), newline="") as handle,
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
    return _Overlap(checked=True, by_uri=by_uri, by_content=by_content)


def _select_eval_rows(manifest: Any, split: str) -> Any:
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


def promote(
    name: str,
    eval_data: str | None = None,
    *,
    candidate: str = CHALLENGER,
    metric: str = "macro_f1",
    min_delta: float = 0.0,
    max_label_drop: float = 0.03,
    split: str = "auto",
    dry_run: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    allow_train_overlap: bool = False,
    gate: Callable[[PromotionDecision], None] | None = None,
) -> PromotionDecision:
    """Evaluate ``candidate`` (a version number or an alias) and the champion on the same data.

    The champion alias moves to the candidate only if its ``metric`` is >= the champion's +
    ``min_delta`` and no label's F1 drops by more than ``max_label_drop``; the old champion keeps
    alias ``previous-champion`` and ``challenger`` is removed from the promoted version. Both
    versions get ``promotion.*`` audit tags (not under ``dry_run``). A version whose artifacts
    do not match their sha256 tags raises ``ArtifactIntegrityError`` (the refusal is tagged too).
    ``eval_data`` defaults to the candidate's recorded evaluation data (tag ``eval_data_uri``: its
    ``--val-data`` manifest or its split's val rows); a version registered without one falls back
    to the val rows of its training manifest (tag ``manifest_uri``), which must then have a split
    column. Evaluation data holding any of the candidate's training images (same URI or same
    bytes, tag ``train_images_uri``) is a ``UserError`` naming the count, unless
    ``allow_train_overlap``; the decision's report and audit tags then say so. ``gate`` (the
    shadow comparison, ``mlc_ray.shadow.shadow_gate``) runs after the labelled evaluation, before
    any alias moves: it may turn the decision into a refusal and attaches its figures
    (``decision.evidence``) to the report and the audit tags.
    """
    from mlc_ray.evaluation import _read_all, evaluate_bundle

    # A candidate ``models:/STAGING@ALIAS`` (or ``/VERSION``) lives in another registered model: the
    # staging model training writes to, where the server lets only promotion edit ``name``. It is
    # evaluated there and, if it wins, copied into ``name`` (copy_model_version) before @champion moves.
    cand_model = name
    if candidate.startswith("models:/"):
        cand_model, ref_version, ref_alias = parse_model_uri(candidate)
        cand_mv = _get_version(cand_model, ref_version, ref_alias)
    else:
        cand_mv = _get_version(
            name, candidate if candidate.isdigit() else None, None if candidate.isdigit() else candidate
        )
    cand_version = str(cand_mv.version)
    cross = cand_model != name
    cand_source = f"models:/{cand_model}/{cand_version}" if cross else None
    if cross:
        _require_model(name)
    aliases = _aliases(name)
    champ_version = aliases.get(CHAMPION)
    decision = PromotionDecision(
        name=name,
        action="promote",
        promoted=False,
        reason="",
        candidate_version=cand_version,
        champion_version=champ_version,
        metric=metric,
        min_delta=min_delta,
        max_label_drop=max_label_drop,
        dry_run=dry_run,
        candidate_source=cand_source,
    )
    if cross and champ_version:
        champ_source = (_client().get_model_version(name, champ_version).tags or {}).get(PROMOTED_FROM_TAG)
        if champ_source == cand_source:
            decision.reason = f"{cand_source} is already the champion (v{champ_version}); nothing to do"
            decision.promoted = True
            decision.candidate_version = champ_version
            return decision
    if not cross and champ_version == cand_version:
        decision.reason = f"v{cand_version} is already the champion; nothing to do"
        decision.promoted = True
        return decision

    cand_tags = {str(k): str(v) for k, v in (cand_mv.tags or {}).items()}
    eval_uri = eval_data or cand_tags.get(EVAL_DATA_TAG) or cand_tags.get("manifest_uri")
    if not eval_uri:
        raise UserError(
            f"no --eval-data given and {name} v{cand_version} records no evaluation data "
            f"('{EVAL_DATA_TAG}' tag); pass --eval-data MANIFEST held out from its training"
        )
    full = _load_eval_manifest(eval_uri)
    if not eval_data and EVAL_DATA_TAG not in cand_tags and split == "auto" and not full.has_splits:
        raise UserError(
            f"{name} v{cand_version} records no evaluation data and its training manifest {eval_uri} has "
            "no split column, so any of its rows may be a training image; pass --eval-data MANIFEST "
            "held out from its training"
        )
    manifest = _select_eval_rows(full, split)
    decision.eval_data = f"{eval_uri} [{split}]"
    images = _read_all(manifest.images)
    overlap = _training_overlap(cand_tags, manifest, images)
    if not overlap.checked:
        decision.train_overlap = f"not checked: v{cand_version} records no training-image list"
    elif overlap.count == 0:
        decision.train_overlap = (
            f"0 of {len(manifest)} evaluation images are training images of v{cand_version} "
            "(checked by URI and sha256)"
        )
    else:
        counted = (
            f"{overlap.count} of {len(manifest)} evaluation images are training images of "
            f"v{cand_version} ({overlap.by_uri} same URI, {overlap.by_content} same content)"
        )
        if not allow_train_overlap:
            raise UserError(
                f"evaluation data {eval_uri} [{split}]: {counted}; promote on data held out from training "
                "(the version's own: leave out --eval-data), or pass --allow-train-overlap"
            )
        decision.train_overlap = f"{counted}; allowed by --allow-train-overlap: NOT a held-out comparison"
        log.warning("promotion on evaluation data that overlaps training: %s", counted)

    with tempfile.TemporaryDirectory(prefix="mlc_ray-promote-") as tmp:
        # A fresh download (not the shared cache) so what is verified is what the registry holds now.
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        try:
            cand = resolve_model(f"models:/{cand_model}/{cand_version}", cache_dir=cache)
            champ = (
                resolve_model(f"models:/{name}/{champ_version}", cache_dir=cache) if champ_version else None
            )
        except ArtifactIntegrityError as exc:
            decision.reason = f"integrity check failed: {exc}"
            if not dry_run:
                _write_audit(decision, {"candidate": (cand_model, cand_version), "champion": champ_version})
            raise
        cand_eval = evaluate_bundle(cand.local_dir, manifest, batch_size=batch_size, images=images)
        decision.candidate_value = cand_eval.metric(metric)
        decision.n_images, decision.n_errors = cand_eval.n_images, cand_eval.n_errors
        if champ is None:
            decision.promoted = True
            decision.reason = f"first promotion: '{name}' had no champion, v{cand_version} becomes champion"
        else:
            champ_eval = evaluate_bundle(champ.local_dir, manifest, batch_size=batch_size, images=images)
            decision.champion_value = champ_eval.metric(metric)
            for label, f1 in champ_eval.per_label_f1.items():
                drop = f1 - cand_eval.per_label_f1.get(label, 0.0)
                if drop > 0:
                    decision.label_drops[label] = drop
            too_low = decision.candidate_value < decision.champion_value + min_delta
            dropped = {k: v for k, v in decision.label_drops.items() if v > max_label_drop + 1e-12}
            if too_low:
                decision.reason = (
                    f"{metric} {decision.candidate_value:.4f} < champion {decision.champion_value:.4f} "
                    f"+ min delta {min_delta:.4f}"
                )
            elif dropped:
                worst = max(dropped, key=dropped.__getitem__)
                decision.reason = (
                    f"F1 of {len(dropped)} label(s) drops by more than {max_label_drop:.3f} "
                    f"(worst: '{worst}' -{dropped[worst]:.3f})"
                )
            else:
                decision.promoted = True
                decision.reason = (
                    f"{metric} {decision.candidate_value:.4f} >= champion {decision.champion_value:.4f} "
                    f"+ {min_delta:.4f} and no label drops more than {max_label_drop:.3f}"
                )

    if gate is not None:
        gate(decision)
    if dry_run:
        return decision
    client = _client()
    staged: dict[str, str | tuple[str, str] | None] = {}
    if decision.promoted:
        if cross:
            # The copy carries the staging version's tags (sha256.*, manifest, lineage) and its artifacts.
            staged["staged-candidate"] = (cand_model, cand_version)
            copied = client.copy_model_version(cand_source, name)
            cand_version = decision.candidate_version = str(copied.version)
            client.set_model_version_tag(name, cand_version, PROMOTED_FROM_TAG, cand_source)
        if champ_version:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champ_version)
        client.set_registered_model_alias(name, CHAMPION, cand_version)
        if not cross and aliases.get(CHALLENGER) == cand_version:
            client.delete_registered_model_alias(name, CHALLENGER)
        log.info(
            "%s: champion %s -> v%s%s",
            name,
            f"v{champ_version}" if champ_version else "(none)",
            cand_version,
            f" (copied from {cand_source})" if cross else "",
        )
    candidate_where = (cand_model, cand_version) if cross and not decision.promoted else cand_version
    _write_audit(decision, {"candidate": candidate_where, "champion": champ_version, **staged})
    return decision


def rollback(
    name: str, *, dry_run: bool = False, cache_dir: str | os.PathLike[str] | None = None
) -> PromotionDecision:
    """Make ``previous-champion`` the champion again (verified first); the two aliases swap."""
    _require_model(name)
    aliases = _aliases(name)
    previous, current = aliases.get(PREVIOUS_CHAMPION), aliases.get(CHAMPION)
    if previous is None:
        listed = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "(none)"
        raise UserError(
            f"model '{name}' has no '{PREVIOUS_CHAMPION}' alias to roll back to; aliases: {listed}"
        )
    decision = PromotionDecision(
        name=name,
        action="rollback",
        promoted=True,
        reason=f"champion v{current} -> v{previous} (previous-champion); previous-champion -> v{current}",
        candidate_version=previous,
        champion_version=current,
        dry_run=dry_run,
    )
    with tempfile.TemporaryDirectory(prefix="mlc_ray-rollback-") as tmp:
        try:
            resolve_model(f"models:/{name}/{previous}", cache_dir=cache_dir or tmp)
        except ArtifactIntegrityError as exc:
            decision.promoted = False
            decision.reason = f"integrity check failed: {exc}"
            if not dry_run:
                _write_audit(decision, {"candidate": previous, "champion": current})
            raise
    if dry_run:
        return decision
    client = _client()
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current)
    else:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    _write_audit(decision, {"candidate": previous, "champion": current})
    log.info("%s: rolled back champion v%s -> v%s", name, current, previous)
    return decision

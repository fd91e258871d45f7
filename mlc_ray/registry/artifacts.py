"""Which bundle files a model version holds, and the sha256 check every download goes through.

The files are ``mlc_ray.bundle``'s one list; each is a pyfunc artifact of the logged model
(``artifacts/`` inside it) and carries a ``sha256.<file>`` version tag that ``verify_artifacts``
checks.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mlc_ray import bundle as bundle_layout
from mlc_ray.errors import UserError
from mlc_ray.registry.versions import ArtifactIntegrityError

# pyfunc artifact key -> bundle file (mlc_ray.bundle's one list). Extra regular files in the bundle
# are logged too (key = name).
ARTIFACT_FILES: dict[str, str] = {key: name for name, key in bundle_layout.PYFUNC_KEYS.items()}
REQUIRED_FILES = bundle_layout.REQUIRED_FOR_INFERENCE
SHA_TAG_PREFIX = "sha256."
MODEL_ARTIFACT_SUBDIR = "artifacts"  # where pyfunc puts `artifacts=` files inside the logged model


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def local_bundle_dir(bundle_dir: str) -> Iterator[Path]:
    """The bundle as a local directory (an s3:// bundle is downloaded to a temporary one)."""
    from mlc_ray import storage

    if not storage.is_s3(bundle_dir):
        path = Path(bundle_dir.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise UserError(f"model bundle {bundle_dir} does not exist (train/export write one)")
    with bundle_layout.local_bundle(bundle_dir) as local:
        yield local.root


def bundle_artifacts(local: Path) -> dict[str, Path]:
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
        actual = sha256_file(path)
        if actual != sha:
            raise ArtifactIntegrityError(
                f"{where}: artifact {file} does not match its sha256 tag (expected {sha[:12]}..., "
                f"got {actual[:12]}...): the stored file was changed after registration; refusing to use it"
            )

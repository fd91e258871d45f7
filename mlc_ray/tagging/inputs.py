"""What a tagging run reads: list the input as a stream and cut it into fixed-size, named shards.

The input is a prefix (``s3://bucket/photos/`` or a local folder: every image under it, chosen by
extension) or a manifest file (csv/jsonl/parquet: its ``image`` column). Keys arrive as a stream
of pages (``storage.iter_pages``) and leave as ``Shard`` objects of ``shard_size`` keys; nothing
ever holds the whole listing, so the driver's memory is flat however many keys there are.

A shard's identity is its index in listing order plus a digest of its keys and ETags; the output
file name is derived from both (``table.shard_file_name``), so the same listing gives the same
names. Shards are persisted as small descriptor files in the run's state directory
(``ShardStore``), so a resumed run reuses exactly the shards it started with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mlc_ray.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_SUFFIXES",
    "InputKey",
    "Shard",
    "is_manifest",
    "iter_input_keys",
    "iter_shards",
    "ShardStore",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class InputKey:
    """One image to tag: its URI and, when the listing knows it, its ETag (else filled at read time)."""

    uri: str
    etag: str | None = None


@dataclass(frozen=True)
class Shard:
    """``shard_size`` consecutive keys of the listing, with a deterministic index and digest."""

    index: int
    uris: tuple[str, ...]
    etags: tuple[str | None, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for uri, etag in zip(self.uris, self.etags, strict=True):
            h.update(f"{uri}\t{etag or ''}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.uris)

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "uris": list(self.uris), "etags": list(self.etags)})

    @classmethod
    def from_json(cls, text: str) -> Shard:
        data = json.loads(text)
        return cls(int(data["index"]), tuple(data["uris"]), tuple(data["etags"]))


def is_manifest(uri: str) -> bool:
    """A file with a manifest extension is a manifest; anything else is a prefix of images."""
    return uri.rstrip("/").lower().endswith(MANIFEST_SUFFIXES)


def iter_input_keys(uri: str, *, page_size: int = 1000) -> Iterator[list[InputKey]]:
    """Pages of images to tag, in a deterministic order (listing order / manifest order).

    A prefix yields every object under it whose name ends in an image extension; a manifest yields
    its ``image`` column (URIs resolved against the manifest's folder). A prefix with no images is
    a ``FileNotFoundError`` naming it (usually a typo in the bucket or prefix).
    """
    from mlc_ray import storage

    if is_manifest(uri):
        from mlc_ray.data.manifest import load_manifest

        manifest = load_manifest(uri)  # a manifest is a file the user wrote: it fits in memory
        images = list(manifest.images)
        del manifest
        if not images:
            raise FileNotFoundError(f"manifest {uri} lists no images")
        for start in range(0, len(images), page_size):
            yield [InputKey(u) for u in images[start : start + page_size]]
        return

    if not storage.is_s3(uri) and os.path.isfile(uri.removeprefix("file://")):
        raise UserError(
            f"--input {uri}: a file, not a folder of images or a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
    any_key = False
    for page in storage.iter_pages(uri, page_size=page_size, suffixes=IMAGE_SUFFIXES):
        keys = [InputKey(info.uri, info.etag or None) for info in page]
        if keys:
            any_key = True
            yield keys
    if not any_key:
        raise FileNotFoundError(
            f"no images under {uri} (looked for {', '.join(IMAGE_SUFFIXES)}); check the prefix"
        )


def iter_shards(
    pages: Iterable[list[InputKey]], shard_size: int, *, limit: int | None = None
) -> Iterator[Shard]:
    """Cut a stream of pages into shards of ``shard_size`` keys (the last may be shorter).

    Holds at most one shard's keys plus one page; stops after ``limit`` keys.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    index, uris, etags, total = 0, [], [], 0
    for page in pages:
        for key in page:
            if limit is not None and total >= limit:
                break
            uris.append(key.uri)
            etags.append(key.etag)
            total += 1
            if len(uris) == shard_size:
                yield Shard(index, tuple(uris), tuple(etags))
                index, uris, etags = index + 1, [], []
        if limit is not None and total >= limit:
            break
    if uris:
        yield Shard(index, tuple(uris), tuple(etags))


class ShardStore:
    """Shard descriptors of one run, one small JSON file each under ``<state_dir>/shards/``."""

    def __init__(self, state_dir: str) -> None:
        from mlc_ray import storage

        self.state_dir = state_dir
        self.dir = storage.join(state_dir, "shards")

    def uri(self, index: int) -> str:
        from mlc_ray import storage

        return storage.join(self.dir, f"shard-{index:06d}.json")

    def put(self, shard: Shard) -> None:
        from mlc_ray import storage

        storage.write_text(self.uri(shard.index), shard.to_json())

    def get(self, index: int) -> Shard:
        from mlc_ray import storage

        shard = Shard.from_json(storage.read_text(self.uri(index)))
        if shard.index != index:
            raise ValueError(f"{self.uri(index)}: holds shard {shard.index}, expected {index}")
        return shard

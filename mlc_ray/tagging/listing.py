"""Stage [2]: the run's identity and state, and the listing of its input into shards.

``open_run`` derives the run id from the row-affecting settings (``state.py``) unless ``--run-id``
names it, starts a new ``RunState`` or resumes the saved one (refusing another model or other
settings under the same explicit run id). ``list_run`` streams the listing as pages, cuts it into
shards of ``shard_size`` keys and persists each shard's descriptor under
``<output>/_runs/<run_id>/shards/`` (driver memory: one shard); a resumed run whose listing finished
reads the digests back instead. ``--incremental`` drops keys whose (uri, etag) this model version
already tagged (``TaggedIndex``); a local file listed without an ETag is compared by content hash.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mlc_ray.cli import UserError
from mlc_ray.tagging.config import TagConfig
from mlc_ray.tagging.inputs import ShardStore, is_manifest, iter_input_keys, iter_shards
from mlc_ray.tagging.resolve import TagModel
from mlc_ray.tagging.state import (
    RunState,
    TaggedIndex,
    changed_settings,
    default_run_id,
    key_hashes,
    run_dir,
)

__all__ = ["open_run", "list_run", "list_shards", "finished_run_notice"]

log = logging.getLogger(__name__)


def open_run(cfg: TagConfig, model: TagModel, input_uri: str, settings: dict[str, Any]) -> RunState:
    """The run's state: new (not saved yet) or the saved one, resumed (its attempt counted)."""
    from mlc_ray import storage
    from mlc_ray.config import config_to_dict

    storage.check_local_dir(cfg.output, "--output")
    run_id = cfg.run_id or default_run_id(settings)
    if cfg.incremental and cfg.run_id is None:
        # each scheduled incremental run is its own run; a killed one is redone by the next
        run_id += "-i" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    state = RunState.load(cfg.output, run_id)
    if state is None:
        # saved by list_shards with the first shard: an input that lists nothing (wrong URI,
        # missing bucket, empty prefix) fails the job without leaving anything under the output
        return RunState.new(
            run_id=run_id,
            model=model.pinned,
            input=input_uri,
            output=cfg.output,
            config=config_to_dict(cfg),
            settings=settings,
        )
    if state.model != model.pinned:
        raise UserError(
            f"run {run_id} was started with {state.model}, not {model.pinned}; use another --run-id"
        )
    changed = changed_settings(state.settings, settings)
    if changed:  # only under an explicit --run-id: a default run id is the hash of the settings
        raise UserError(
            f"--run-id {run_id}: the run was started with other row-affecting settings "
            f"({'; '.join(changed)}); its rows would mix both: use another --run-id"
        )
    state.attempts += 1
    state.save()
    log.info("resuming run %s (attempt %d, dt=%s)", run_id, state.attempts, state.dt)
    return state


def list_run(
    cfg: TagConfig, input_uri: str, state: RunState, model: TagModel
) -> tuple[ShardStore, list[str]]:
    """The run's shard store and the digest per shard: listed now, or read back when an earlier
    attempt finished the listing."""
    from mlc_ray import storage

    store = ShardStore(run_dir(cfg.output, state.run_id))
    if state.listing_complete:
        digests = json.loads(storage.read_text(storage.join(store.dir, "index.json")))["digests"]
    else:
        digests = list_shards(cfg, input_uri, state, store, model)
    return store, digests


def list_shards(
    cfg: TagConfig, input_uri: str, state: RunState, store: ShardStore, model: TagModel
) -> list[str]:
    """[2] stream the listing into shard descriptors; returns the digest per shard (small)."""
    pages: Iterator[list] = iter_input_keys(input_uri)
    if cfg.incremental:
        index = TaggedIndex.from_table(cfg.output, model.name, model.version, by_uri=is_manifest(input_uri))
        log.info("incremental: %d images already tagged by %s v%s", len(index), model.name, model.version)
        pages = _filter_pages(pages, index)
    digests: list[str] = []
    n_images = 0
    for shard in iter_shards(pages, cfg.shard_size, limit=cfg.limit):
        if not digests:
            state.save()  # the input exists: from here on the run is resumable
        store.put(shard)
        digests.append(shard.digest)
        n_images += len(shard)
        if len(digests) % 100 == 0:
            log.info("listed %d shards (%d images) so far", len(digests), n_images)
    from mlc_ray import storage

    storage.write_text(
        storage.join(store.dir, "index.json"), json.dumps({"digests": digests, "images": n_images})
    )
    state.listing_complete, state.n_shards, state.n_images = True, len(digests), n_images
    state.save()
    return digests


def _filter_pages(pages: Iterator[list], index: TaggedIndex) -> Iterator[list]:
    from mlc_ray.tagging.inputs import InputKey

    for page in pages:
        if not index.by_uri and any(not k.etag for k in page):
            # local files list without an ETag: their content hash is what the table recorded
            with ThreadPoolExecutor(max_workers=8) as pool:
                hashes = list(pool.map(lambda k: k.etag or _content_etag_or_none(k.uri), page))
            page = [InputKey(k.uri, h) for k, h in zip(page, hashes, strict=True)]
        tagged = index.contains([k.uri for k in page], [k.etag for k in page])
        kept = [k for k, t in zip(page, tagged, strict=True) if not t]
        if kept:
            yield kept


def _content_etag_or_none(uri: str) -> str | None:
    from mlc_ray import storage

    try:
        return storage.content_etag(uri)
    except OSError:
        return None  # unreadable now: it will be an error row, retried by the next run


def finished_run_notice(run_id: str, input_uri: str, store: ShardStore, n_shards: int, images: int) -> str:
    """A finished run started again tags nothing: say so, and how many keys under the input (listed
    now) it does not hold, with the flag that tags them."""
    hashes = [key_hashes(list(shard.uris), [None] * len(shard)) for shard in map(store.get, range(n_shards))]
    index = TaggedIndex(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64), by_uri=True)
    missing = 0
    for page in iter_input_keys(input_uri):
        uris = [k.uri for k in page]
        missing += int((~index.contains(uris, [None] * len(uris))).sum())
    head = f"run {run_id} is already complete ({images} images): nothing was tagged again"
    if not missing:
        return f"{head}; every key under {input_uri} is in it"
    return (
        f"{head}; {missing} keys under {input_uri} are not in it: tag them with --incremental "
        "(only images this model version has not tagged), or start a new run with --run-id NAME"
    )

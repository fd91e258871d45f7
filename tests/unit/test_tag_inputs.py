"""Listing and sharding for bulk tagging: streamed, deterministic, bounded; config and parallelism rules."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from mlc_ray.config import ConfigError
from mlc_ray.tagging.commit import ShardBuffer
from mlc_ray.tagging.config import TagConfig, parse_actors
from mlc_ray.tagging.inputs import InputKey, Shard, ShardStore, is_manifest, iter_input_keys, iter_shards
from mlc_ray.tagging.parallelism import choose_parallelism
from mlc_ray.tagging.state import (
    RunState,
    TaggedIndex,
    changed_settings,
    default_run_id,
    row_affecting_settings,
)


def _pages(n: int, page_size: int = 1000, consumed: list[int] | None = None):
    for start in range(0, n, page_size):
        page = [
            InputKey(f"s3://b/img/{i:08d}.jpg", f"etag{i}") for i in range(start, min(n, start + page_size))
        ]
        if consumed is not None:
            consumed.append(page[-1].uri)
        yield page


def test_shards_have_fixed_size_and_deterministic_identity() -> None:
    a = list(iter_shards(_pages(2500, 300), 1000))
    b = list(iter_shards(_pages(2500, 700), 1000))
    assert [len(s) for s in a] == [1000, 1000, 500]
    assert [s.index for s in a] == [0, 1, 2]
    assert [s.digest for s in a] == [s.digest for s in b]  # page size does not change shard identity
    assert a[0].digest != a[1].digest
    assert [len(s) for s in iter_shards(_pages(2500), 1000, limit=1200)] == [1000, 200]


def test_sharding_streams_without_materialising_the_listing() -> None:
    consumed: list[str] = []
    shards = iter_shards(_pages(1_000_000, 1000, consumed), 10_000)
    first = next(shards)
    assert len(first) == 10_000
    assert len(consumed) == 10  # only the pages the first shard needed were pulled
    # memory for 100,000 keys stays at about one shard's worth, not the listing's
    tracemalloc.start()
    for _ in range(10):
        next(shards)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 1024 * 1024  # ~1 shard + 1 page of keys; 100k held keys would be far more


def test_shard_store_roundtrip(tmp_path) -> None:
    store = ShardStore(str(tmp_path / "_runs" / "r1"))
    shard = Shard(3, ("a.jpg", "b.jpg"), ("e1", None))
    store.put(shard)
    back = store.get(3)
    assert back == shard and back.digest == shard.digest


def test_local_prefix_listing_and_manifest_detection(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.jpeg"):
        (tmp_path / name).write_bytes(b"x")
    uris = [k.uri for page in iter_input_keys(str(tmp_path)) for k in page]
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["a.PNG", "b.jpg", "c.jpeg"]
    assert is_manifest("s3://b/m.csv") and is_manifest("x/m.parquet") and not is_manifest("s3://b/photos/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images under"):
        list(iter_input_keys(str(tmp_path / "empty")))


def test_tagged_index_contains() -> None:
    from mlc_ray.tagging.state import key_hashes

    index = TaggedIndex(key_hashes(["a", "b"], ["1", "2"]))
    assert index.contains(["a", "b", "a", "c"], ["1", "2", "changed", "1"]).tolist() == [
        True,
        True,
        False,
        False,
    ]
    assert TaggedIndex(np.zeros(0, np.uint64)).contains(["a"], ["1"]).tolist() == [False]


def _settings(**changes: object) -> dict:
    base = {
        "model_pinned": "models:/m/3",
        "thresholds_sha256": "ab" * 32,
        "backend": "onnxruntime",
        "precision": "fp32",
        "preprocess": {"image_size": 224, "normalization": "imagenet"},
        "input_uri": "s3://b/in/",
        "output_uri": "s3://b/tags",
    }
    return row_affecting_settings(**{**base, **changes})


def test_run_identity_covers_every_row_affecting_setting(tmp_path) -> None:
    rid = default_run_id(_settings())
    assert rid == default_run_id(_settings(input_uri="s3://b/in"))  # a trailing slash is the same input
    for change in (
        {"model_pinned": "models:/m/4"},
        {"thresholds_sha256": "cd" * 32},
        {"backend": "ncnn"},
        {"precision": "int8"},
        {"preprocess": {"image_size": 160, "normalization": "imagenet"}},
        {"input_uri": "s3://b/other/"},
        {"output_uri": "s3://b/tags2"},
        {"tta": "10crop"},  # a tag-time option joins the identity by keyword
    ):
        assert default_run_id(_settings(**change)) != rid, change
    assert changed_settings(_settings(), _settings(precision="int8")) == ["precision: 'fp32' -> 'int8'"]
    assert changed_settings({}, _settings()) == []  # a state from before settings were kept
    assert RunState.load(str(tmp_path), rid) is None
    state = RunState.new(
        run_id=rid,
        model="models:/m/3",
        input="s3://b/in",
        output=str(tmp_path),
        config={},
        settings=_settings(),
    )
    state.save()
    loaded = RunState.load(str(tmp_path), rid)
    assert loaded.dt == state.dt and loaded.settings == _settings()


def test_shard_buffer_dedupes_retried_rows() -> None:
    import pyarrow as pa

    shard = Shard(0, ("a", "b"), (None, None))
    buf = ShardBuffer(shard)

    def part(pos):
        return pa.table({"image_uri": [shard.uris[p] for p in pos], "_pos": pa.array(pos, pa.int32())})

    buf.add(part([1]))
    buf.add(part([1]))  # a retried block: replaces nothing, adds nothing
    assert not buf.complete
    buf.add(part([0, 0]))
    assert buf.complete and buf.parts and sum(p.num_rows for p in buf.parts) == 2


def test_config_validation() -> None:
    assert parse_actors("2:8") == (2, 8) and parse_actors("3") == (3, 3) and parse_actors(None) is None
    for bad in ("0:2", "4:2", "x"):
        with pytest.raises(ConfigError):
            parse_actors(bad)
    with pytest.raises(ConfigError, match="backend"):
        TagConfig(backend="tflite")
    with pytest.raises(ConfigError, match="int8"):
        TagConfig(backend="ncnn", precision="int8")
    with pytest.raises(ConfigError, match="max_error_rate"):
        TagConfig(max_error_rate=2.0)
    with pytest.raises(ConfigError, match="run_id"):
        TagConfig(run_id="a/b")


def test_parallelism_rule_leaves_room_for_reads() -> None:
    # under 8 CPUs no CPU is kept back: one 1-thread actor per CPU, sharing the read task's half CPU
    two = choose_parallelism(2)
    assert (two.min_actors, two.threads_per_actor) == (2, 1)
    assert 2 * two.cpus_per_actor + two.read_cpus <= 2
    sixteen = choose_parallelism(16)
    assert sixteen.min_actors * sixteen.threads_per_actor <= 14
    assert choose_parallelism(16, actors=(2, 4), threads_per_actor=3).max_actors == 4
    gpu = choose_parallelism(16, cluster_gpus=2, use_gpu=True)
    assert gpu.max_actors == 2 and gpu.gpus_per_actor == 1.0
    assert two.cpus_per_actor == 0.75 and sixteen.cpus_per_actor == sixteen.threads_per_actor


def test_the_pool_never_outnumbers_the_runs_read_blocks() -> None:
    from mlc_ray.tagging.parallelism import fit_to_blocks

    two = choose_parallelism(2)  # 2 actors x 1 thread at 0.75 CPU each
    one = fit_to_blocks(two, 1)  # a 9-image incremental run: one block of 64 keys
    assert (one.min_actors, one.max_actors) == (1, 1)
    assert (one.threads_per_actor, one.cpus_per_actor) == (two.threads_per_actor, two.cpus_per_actor)
    assert fit_to_blocks(two, 2) == two and fit_to_blocks(two, 500) == two
    assert fit_to_blocks(two, 0) == two  # nothing pending: no pool is started anyway
    ranged = fit_to_blocks(choose_parallelism(16, actors=(2, 6)), 3)
    assert (ranged.min_actors, ranged.max_actors) == (2, 3)


def test_explicit_parallelism_never_starves_the_read_tasks() -> None:
    from mlc_ray.cli import UserError

    # 1 actor x 2 threads on 2 CPUs reserved both CPUs: the read tasks (0.5 CPU) never ran and the
    # job waited for ever (found by benchmarks/tagging.py); the actor now reserves 1.5
    wide = choose_parallelism(2, actors=(1, 1), threads_per_actor=2)
    assert (wide.threads_per_actor, wide.cpus_per_actor) == (2, 1.5)
    four = choose_parallelism(2, actors=(4, 4), threads_per_actor=1)
    assert four.cpus_per_actor == 0.25 and 4 * four.cpus_per_actor + four.read_cpus <= 2
    with pytest.raises(UserError, match="too few"):
        choose_parallelism(2, actors=(8, 8), threads_per_actor=1)


def test_run_timings_charge_each_phase_once_and_carve_parts_in_order(monkeypatch) -> None:
    from mlc_ray.tagging import pipeline

    clock = iter([0.0, 1.0, 3.0, 10.0, 10.5])
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: next(clock))
    t = pipeline.Timings()  # mark at 0
    t.lap("model resolve")  # 1
    t.lap("Ray start")  # 2
    t.lap("tagging")  # 7
    t.carve("tagging", "actor pool start", 4.0)
    t.carve("tagging", "shard commits", 9.0)  # more than is left: capped at what the phase holds
    t.lap("report")  # 0.5
    assert list(t.rounded()) == [
        "model resolve",
        "Ray start",
        "actor pool start",
        "shard commits",
        "tagging",
        "report",
    ]
    assert t.rounded() == {
        "model resolve": 1.0,
        "Ray start": 2.0,
        "actor pool start": 4.0,
        "shard commits": 3.0,
        "tagging": 0.0,
        "report": 0.5,
    }
    assert sum(t.rounded().values()) == 10.5

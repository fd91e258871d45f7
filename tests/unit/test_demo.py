"""The demo data set: deterministic bytes, the designed label counts, imbalance and rare combination."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mlc_ray.data import demo
from mlc_ray.data.demo import (
    LABELS,
    MARKER,
    RARE_COMBINATION,
    ensure_demo_data,
    generate_demo,
)
from mlc_ray.data.images import decode_image
from mlc_ray.data.manifest import label_statistics, load_manifest


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default-size demo set, generated once for this module (a few seconds)."""
    return generate_demo(str(tmp_path_factory.mktemp("demo_full")), seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path) -> None:
    kwargs = {"num_train": 40, "num_val": 12, "image_size": 64}
    generate_demo(str(tmp_path / "a"), seed=3, **kwargs)
    generate_demo(str(tmp_path / "b"), seed=3, **kwargs)
    generate_demo(str(tmp_path / "c"), seed=4, **kwargs)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert len(a) == 52 + 3  # images + manifest.csv + labels.txt + marker
    assert a == b
    assert a["images/00000.jpg"] != c["images/00000.jpg"]


def test_default_demo_has_the_designed_shape(full_demo: str) -> None:
    manifest = load_manifest(full_demo)
    assert os.path.isabs(full_demo) and full_demo.endswith("manifest.csv")
    assert manifest.vocabulary == list(LABELS)
    assert 6 <= len(LABELS) <= 10
    assert Counter(manifest.splits) == {"train": 1200, "val": 300}
    per_image = manifest.multi_hot().sum(axis=1)
    assert per_image.min() >= 1 and per_image.max() <= 3
    counts = manifest.multi_hot().sum(axis=0)
    assert counts.min() >= 150  # every label learnable
    assert counts.max() / counts.min() >= 2  # but imbalanced
    stats = label_statistics(manifest)
    assert 1.5 <= stats.cardinality <= 2.5


def test_rare_combination_is_rare_together_common_alone(full_demo: str) -> None:
    manifest = load_manifest(full_demo)
    a, b = RARE_COMBINATION
    assert a in LABELS and b in LABELS
    for split, n in (("train", 1200), ("val", 300)):
        rows = [ls for ls, s in zip(manifest.labels, manifest.splits, strict=True) if s == split]
        together = sum(1 for ls in rows if a in ls and b in ls)
        assert together == round(n * demo.SHAPE_SET_WEIGHTS[RARE_COMBINATION])  # exact quota
        assert 0 < together / n < 0.03
        assert sum(1 for ls in rows if a in ls) / n > 0.25
        assert sum(1 for ls in rows if b in ls) / n > 0.25
    other_pairs = [
        count
        for pair, count in label_statistics(manifest, top_pairs=100).top_pairs
        if set(pair) <= set(demo.SHAPES)
    ]
    assert min(other_pairs) == sum(
        1 for ls in manifest.labels if a in ls and b in ls
    )  # the rarest shape pair


def test_demo_images_decode_and_show_their_labels(full_demo: str) -> None:
    manifest = load_manifest(full_demo)
    for k in range(0, len(manifest), 150):
        with open(manifest.images[k], "rb") as f:
            decoded = decode_image(f.read())
        assert decoded.ok and decoded.array.shape == (96, 96, 3)
        arr = decoded.array.astype(int)
        reddish = (arr[:, :, 0] > 150) & (arr[:, :, 1] < 90) & (arr[:, :, 2] < 90)
        # the "red" label means a red shape: hundreds of red pixels, else (almost) none
        assert (reddish.sum() > 100) == ("red" in manifest.labels[k]), (k, manifest.labels[k], reddish.sum())


def test_ensure_demo_data_generates_once(tmp_path, monkeypatch) -> None:
    root = tmp_path / "demo"
    kwargs = {"num_train": 10, "num_val": 5, "image_size": 48}
    uri = ensure_demo_data(str(root), **kwargs)
    assert (root / MARKER).is_file()
    calls = []
    real = demo.generate_demo
    monkeypatch.setattr(demo, "generate_demo", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ensure_demo_data(str(root), **kwargs) == uri
    assert calls == []  # complete and same arguments: nothing regenerated
    (root / MARKER).unlink()  # an interrupted run leaves no marker
    ensure_demo_data(str(root), **kwargs)
    assert calls == [1]
    ensure_demo_data(str(root), seed=1, **kwargs)  # other arguments: regenerated
    assert calls == [1, 1]
    assert len(load_manifest(uri)) == 15


def test_generate_demo_rejects_bad_sizes(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_train"):
        generate_demo(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_demo(str(tmp_path), image_size=16)


def test_sample_corpora_are_deterministic() -> None:
    assert [s.data for s in demo.bad_image_samples()] == [s.data for s in demo.bad_image_samples()]
    good = demo.good_image_samples()
    assert [s.data for s in good] == [s.data for s in demo.good_image_samples()]
    assert all(s.expected_error is None and s.expected_size for s in good)
    assert len({s.name for s in good}) == len(good)
    assert np.all([s.expected_error for s in demo.bad_image_samples()])

"""Manifests: every format loads to the same data; bad manifests fail naming the row; splits; statistics.

``write_formats`` builds one small multi-label data set in every supported layout under a root URI
(local or s3://, through mlc_ray.storage); the S3 integration test reuses it.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from mlc_ray.data.manifest import (
    Manifest,
    ManifestError,
    find_image_label_file,
    label_statistics,
    load_manifest,
    split_train_val,
)
from tests.helpers import (
    FORMATS,
    check_same_data,
    tiny_jpeg,
    write_formats,
)


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    root = str(tmp_path_factory.mktemp("formats"))
    return root, write_formats(root)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_the_same_data(formats, fmt: str) -> None:
    root, uris = formats
    manifest = load_manifest(uris[fmt])
    check_same_data(manifest, root, with_splits=fmt in ("csv", "jsonl", "parquet"))
    assert manifest.source == uris[fmt]
    assert os.path.isabs(manifest.images[0])


def test_hash_is_stable_across_formats(formats) -> None:
    _, uris = formats
    with_split = {load_manifest(uris[f]).sha256 for f in ("csv", "jsonl", "parquet")}
    without_split = {load_manifest(uris[f]).sha256 for f in ("seed003", "seed002")}
    assert len(with_split) == 1 and len(without_split) == 1
    assert with_split != without_split  # the split is part of the content


def test_hash_changes_with_content(formats) -> None:
    _, uris = formats
    manifest = load_manifest(uris["csv"])
    changed = manifest.subset(range(len(manifest)))
    changed.labels[2] = ["bird"]
    assert changed.sha256 != manifest.sha256
    reordered = manifest.subset(reversed(range(len(manifest))))
    assert reordered.sha256 == manifest.sha256  # row order is not content


def test_folder_per_class_matches_its_csv_twin(formats) -> None:
    root, uris = formats
    folder = load_manifest(uris["folder"])
    twin = load_manifest(uris["folder_twin"])
    assert folder.vocabulary == twin.vocabulary == ["cat", "dog"]
    assert folder.images == twin.images
    assert folder.labels == twin.labels == [["cat"], ["cat"], ["dog"]]
    np.testing.assert_array_equal(folder.multi_hot(), twin.multi_hot())
    assert folder.sha256 == twin.sha256
    assert load_manifest(uris["folder"] + "/").images == folder.images


def test_seed003_label_file_discovery_and_generic_names(tmp_path) -> None:
    (tmp_path / "image_list").write_text("x.jpg 1\ny.jpg 2\n")
    (tmp_path / "image_label.txt").write_text("0 1 0\n1 0 1\n")
    assert find_image_label_file(str(tmp_path / "image_list")) == str(tmp_path / "image_label.txt")
    manifest = load_manifest(tmp_path / "image_list")
    assert manifest.vocabulary == ["label_0", "label_1", "label_2"]  # no labels.txt: generic names
    assert manifest.labels == [["label_1"], ["label_0", "label_2"]]
    other = tmp_path / "elsewhere.txt"
    other.write_text("1 0 0\n0 1 1\n")
    assert load_manifest(tmp_path / "image_list", image_label_uri=str(other)).labels == [
        ["label_0"],
        ["label_1", "label_2"],
    ]


def test_labels_uri_overrides_and_absolute_uris_are_kept(tmp_path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("zebra\nant\n")
    (tmp_path / "m.csv").write_text("image,labels\n/data/x.jpg,ant\ns3://bucket/a/../y.jpg,zebra|ant\n")
    manifest = load_manifest(str(tmp_path / "m.csv"), labels_uri=str(vocab))
    assert manifest.vocabulary == ["zebra", "ant"]
    assert manifest.images == ["/data/x.jpg", "s3://bucket/y.jpg"]
    assert manifest.labels == [["ant"], ["zebra", "ant"]]


def test_csv_accepts_json_list_labels_and_blank_lines(tmp_path) -> None:
    (tmp_path / "m.csv").write_text('image,labels\nx.jpg,"[""a"", ""b""]"\n\ny.jpg, b | a |\n')
    manifest = load_manifest(tmp_path / "m.csv")
    assert manifest.labels == [["a", "b"], ["a", "b"]]


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_write_round_trips(formats, tmp_path, ext: str) -> None:
    _, uris = formats
    manifest = load_manifest(uris["csv"])
    out = manifest.write(str(tmp_path / f"copy.{ext}"))
    again = load_manifest(out)
    assert again.images == manifest.images
    assert again.labels == manifest.labels
    assert again.splits == manifest.splits
    assert again.vocabulary == manifest.vocabulary
    assert again.sha256 == manifest.sha256
    assert manifest.to_table().column_names == ["image", "labels", "split"]


# ---------------------------------------------------------------------------------------------
# bad manifests: each message names the file, the row and the problem


def _expect_error(path, *needles: str) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(str(path))
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_missing_column(tmp_path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image,tags\nx.jpg,a\n")
    _expect_error(path, str(path), "missing column", "'labels'", "found ['image', 'tags']")
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"image": "x.jpg", "labels": []}\n{"image": "y.jpg"}\n')
    _expect_error(jl, str(jl), "row 2", "missing column", "'labels'")


def test_unknown_label_has_a_did_you_mean(tmp_path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    path = tmp_path / "m.csv"
    path.write_text("image,labels\nx.jpg,cat\ny.jpg,dgo|cat\n")
    _expect_error(path, str(path), "row 2 (line 3)", "label 'dgo'", "labels.txt", "did you mean 'dog'?")


def test_unreadable_files(tmp_path) -> None:
    missing = tmp_path / "nope.csv"
    _expect_error(missing, str(missing), "does not exist")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"image,labels\n\xff\xfe\xfa,cat\n")
    _expect_error(binary, str(binary), "not UTF-8")
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    _expect_error(parquet, str(parquet), "Parquet")
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"image": "x.jpg", "labels": []}\n{"image": \n')
    _expect_error(jl, str(jl), "row 2 (line 2)", "not valid JSON")


def test_duplicate_image_rows_name_both_rows(tmp_path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image,labels\nx.jpg,a\ny.jpg,b\n./x.jpg,c\n")
    _expect_error(path, str(path), "row 3 (line 4)", "duplicate image", "row 1 (line 2)")


def test_zero_rows(tmp_path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image,labels\n")
    _expect_error(path, str(path), "zero rows")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _expect_error(empty, str(empty), "zero rows")


def test_bad_split_and_empty_image(tmp_path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image,labels,split\nx.jpg,a,train\ny.jpg,a,valid\n")
    _expect_error(path, str(path), "row 2", "split 'valid'", "did you mean 'val'?")
    empty = tmp_path / "e.csv"
    empty.write_text("image,labels\nx.jpg,a\n,b\n")
    _expect_error(empty, str(empty), "row 2", "image value is empty")


def test_seed003_inconsistencies(tmp_path) -> None:
    (tmp_path / "image_list.txt").write_text("x.jpg 1\ny.jpg 1\n")
    (tmp_path / "image_label.txt").write_text("1 0\n1 1\n")
    _expect_error(tmp_path / "image_list.txt", "image_list.txt", "row 2 (line 2)", "says 1 labels", "2 ones")
    (tmp_path / "image_label.txt").write_text("1 0\n")
    _expect_error(tmp_path / "image_list.txt", "2 images", "1 label rows")
    (tmp_path / "image_label.txt").write_text("1 0\n0 2\n")
    _expect_error(tmp_path / "image_list.txt", "image_label.txt", "row 2 (line 2)", "0 or 1")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "list.txt").write_text("x.jpg 1\n")
    _expect_error(lonely / "list.txt", "list.txt", "no label matrix")


def test_nus_wide_json_problems(tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps({"samples": [{"image_name": "x.jpg", "image_labels": ["sky"]}, {"image_name": "y"}]})
    )
    _expect_error(path, str(path), "row 2 (samples[1])", "image_labels")
    path.write_text(json.dumps({"images": []}))
    _expect_error(path, str(path), "'samples'")
    path.write_text(
        json.dumps({"samples": [{"image_name": "x.jpg", "image_labels": ["sky"]}], "labels": ["sea"]})
    )
    _expect_error(path, str(path), "row 1", "label 'sky'", "'labels' list")


def test_folder_not_in_labels_file(tmp_path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "1.jpg").write_bytes(tiny_jpeg())
    (tmp_path / "labels.txt").write_text("dog\n")
    _expect_error(tmp_path, str(tmp_path), "folder(s) ['cat']", "labels.txt")


def test_label_without_examples_is_a_warning(tmp_path, caplog) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\nunicorn\n")
    (tmp_path / "m.csv").write_text("image,labels\nx.jpg,cat\ny.jpg,dog\n")
    with caplog.at_level(logging.WARNING, logger="mlc_ray.data.manifest"):
        manifest = load_manifest(tmp_path / "m.csv")
    assert manifest.vocabulary == ["cat", "dog", "unicorn"]
    assert manifest.multi_hot()[:, 2].sum() == 0
    assert "unicorn" in caplog.text and "no examples" in caplog.text


def test_labels_file_problems(tmp_path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\ncat\n")
    (tmp_path / "m.csv").write_text("image,labels\nx.jpg,cat\n")
    _expect_error(tmp_path / "m.csv", "labels.txt", "line 3", "listed twice", "line 1")


# ---------------------------------------------------------------------------------------------
# splits


def _manifest(labels: list[list[str]], splits=None) -> Manifest:
    vocab = sorted({x for ls in labels for x in ls})
    return Manifest(
        images=[f"/data/{i}.jpg" for i in range(len(labels))],
        labels=labels,
        splits=splits or [None] * len(labels),
        vocabulary=vocab,
        source="test.csv",
    )


def _skewed_labels() -> list[list[str]]:
    rng = np.random.default_rng(0)
    labels = []
    for i in range(200):
        row = ["common"] if rng.random() < 0.7 else []
        if rng.random() < 0.3:
            row.append("medium")
        if i in (10, 150):
            row.append("pair")  # exactly 2 examples: one must land in val, one in train
        if i in (20, 40, 60):
            row.append("three")
        if i == 99:
            row.append("single")  # 1 example: stays in train
        labels.append(row)
    return labels


def test_split_is_stratified_and_seeded() -> None:
    manifest = _manifest(_skewed_labels())
    train, val = split_train_val(manifest, val_fraction=0.2, seed=0)
    assert len(train) + len(val) == 200
    assert set(train.images).isdisjoint(val.images)
    assert 35 <= len(val) <= 45
    val_counts = dict(zip(val.vocabulary, val.multi_hot().sum(axis=0), strict=True))
    train_counts = dict(zip(train.vocabulary, train.multi_hot().sum(axis=0), strict=True))
    for label in ("common", "medium", "pair", "three"):
        assert val_counts[label] >= 1, label
        assert train_counts[label] >= 1, label
    assert val_counts["pair"] == 1 and val_counts["single"] == 0 and train_counts["single"] == 1
    assert set(train.splits) == {"train"} and set(val.splits) == {"val"}
    again_train, again_val = split_train_val(manifest, val_fraction=0.2, seed=0)
    assert again_val.images == val.images and again_train.images == train.images
    other = split_train_val(manifest, val_fraction=0.2, seed=1)[1]
    assert other.images != val.images
    assert val.images == sorted(val.images, key=manifest.images.index)  # manifest order kept


def test_split_honours_an_existing_split_column() -> None:
    labels = [["a"], ["a"], ["b"], ["b"], ["a", "b"]]
    manifest = _manifest(labels, ["train", "val", "train", "test", None])
    train, val = split_train_val(manifest)
    assert train.images == ["/data/0.jpg", "/data/2.jpg", "/data/4.jpg"]
    assert val.images == ["/data/1.jpg"]
    no_val = _manifest(labels, ["train", "train", "train", "test", "train"])
    train, val = split_train_val(no_val, val_fraction=0.25)
    assert "/data/3.jpg" not in train.images + val.images  # test rows stay out
    assert len(train) + len(val) == 4 and len(val) >= 1


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(_manifest([["a"], ["b"]]), val_fraction=1.0)
    with pytest.raises(ManifestError, match="at least 2 rows"):
        split_train_val(_manifest([["a"]]))


# ---------------------------------------------------------------------------------------------
# statistics


def test_label_statistics(formats) -> None:
    _, uris = formats
    stats = label_statistics(load_manifest(uris["csv"]))
    assert stats.num_images == 6
    assert stats.counts == {"dog": 2, "cat": 3, "bird": 2}
    assert stats.cardinality == pytest.approx(7 / 6)
    assert stats.num_unlabeled == 1
    assert stats.top_pairs[0] == (("dog", "cat"), 1)
    assert {pair for pair, _ in stats.top_pairs} == {("dog", "cat"), ("cat", "bird")}
    assert stats.split_counts == {"train": 3, "val": 2, "test": 1}
    text = stats.format()
    assert "6 images, 3 labels, 1.17 labels/image, 1 without labels" in text
    assert "cat" in text and "50.0%" in text and "dog + cat: 1" in text
    assert str(stats) == text

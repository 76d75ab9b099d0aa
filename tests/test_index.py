import csv
import json

import numpy as np
import pytest

from conftest import make_image, write_csv_dataset
from fastsort.index import DataError, DataWarning, load_dataset, preflight, read_csv, save_class_map, scan_folder, split_fold, \
    stratified_folds


def test_scan_folder_classes_and_junk(folder_data):
    (folder_data / "cat" / "._junk.jpg").write_bytes(b"\x00\x01")  # AppleDouble junk is not an image
    (folder_data / "cat" / "notes.txt").write_text("x")
    make_image(folder_data / "eel" / "deeper" / "nested.PNG", (30, 31), seed=1)  # nested, upper-case extension
    result = scan_folder(folder_data)
    idx = result.index
    assert idx.classes == ("cat", "dog", "eel")
    assert list(idx.class_counts()) == [6, 6, 7]
    assert not result.problems


def test_folders_without_images_are_named_in_one_warning_and_are_not_classes(folder_data):
    (folder_data / "empty").mkdir()
    (folder_data / "onlytext").mkdir()
    (folder_data / "onlytext" / "readme.txt").write_text("x")
    with pytest.warns(DataWarning) as caught:
        result = scan_folder(folder_data)
    assert len(caught) == 1 and "empty" in str(caught[0].message) and "onlytext" in str(caught[0].message)
    assert not result.problems and result.index.classes == ("cat", "dog", "eel")
    assert preflight(result).index.classes == ("cat", "dog", "eel")


def test_root_without_class_folders(tmp_path):
    make_image(tmp_path / "a.jpg", (20, 20), 0)
    with pytest.raises(DataError, match="no class folders"):
        scan_folder(tmp_path)


def test_csv_ids_with_and_without_extension_and_int_labels(tmp_path):
    csv_path = write_csv_dataset(tmp_path, n=9, labels=[12, 3, 7] * 3, with_ext=False)
    idx = read_csv(csv_path).index
    assert idx.classes == ("3", "7", "12")  # numeric order, contiguous ids
    assert list(idx.labels[:3]) == [2, 0, 1]
    csv_path2 = write_csv_dataset(tmp_path, n=9, with_ext=True)
    assert len(read_csv(csv_path2).index) == 9


def test_csv_problems_are_listed_by_line(tmp_path):
    make_image(tmp_path / "images" / "a.jpg", (20, 22), 0)
    make_image(tmp_path / "images" / "b.png", (20, 22), 1)
    make_image(tmp_path / "images" / "my cat, 01.png", (20, 22), 2)
    make_image(tmp_path / "images" / "café_ü_猫.jpg", (20, 22), 3)
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label"])
        w.writerows([("a", "cat"), ("b", " dog "), ("my cat, 01", "cat"), ("café_ü_猫", "dog"),
                     ("c", "cat"), ("a", "dog"), ("b", "")])
    result = read_csv(tmp_path / "train.csv")
    text = "\n".join(result.problems)
    assert "line 6: no image file for id 'c'" in text
    assert "line 7: duplicate id 'a'" in text
    assert "line 8: empty label" in text
    assert result.index.classes == ("cat", "dog")  # padded " dog " stripped
    assert len(result.index) == 4
    with pytest.raises(DataError) as err:
        preflight(result)
    assert "line 6" in str(err.value) and "line 7" in str(err.value) and "line 8" in str(err.value)


def test_csv_missing_columns(tmp_path):
    write_csv_dataset(tmp_path, n=3)
    with pytest.raises(DataError, match="missing column.*'label_x'"):
        read_csv(tmp_path / "train.csv", label_col="label_x")


def test_unknown_label_against_a_class_map(tmp_path):
    csv_path = write_csv_dataset(tmp_path, n=6)
    result = read_csv(csv_path, classes=("0", "1"))
    assert any("unknown label '2'" in p for p in result.problems)


def test_undecodable_and_missing_files_are_named(csv_data):
    root = csv_data.parent
    (root / "images" / "img001.png").write_bytes(b"not a png at all")
    truncated = (root / "images" / "img002.jpg").read_bytes()[:200]
    (root / "images" / "img002.jpg").write_bytes(truncated)
    result = load_dataset(root)
    with pytest.raises(DataError) as err:
        preflight(result)
    assert "img001.png" in str(err.value) and "img002.jpg" in str(err.value)
    kept = preflight(load_dataset(root), skip_bad=True)
    assert kept.skipped == 2 and len(kept.index) == 16
    assert kept.sizes.shape == (16, 2)


def test_stratified_folds_are_stable_and_balanced():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    folds = stratified_folds(labels, 5, 2020)
    assert (folds == stratified_folds(labels, 5, 2020)).all()
    for k in range(5):
        assert list(np.bincount(labels[folds == k])) == [10, 6, 4]


def test_split_fold_partitions(csv_data):
    idx = load_dataset(csv_data).index
    tr, va, folds = split_fold(idx, 1, n_folds=3, seed=2020)
    assert len(tr) + len(va) == len(idx)
    assert not set(tr.ids) & set(va.ids)
    with pytest.raises(DataError, match="--fold"):
        split_fold(idx, 3, n_folds=3)


def test_class_map_round_trip(tmp_path):
    save_class_map(("cat", "dog"), tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {"cat": 0, "dog": 1}

from pathlib import Path

import numpy as np
import pytest

from changecam.data.io import write_png
from changecam.data.layout import (
    DatasetNotFoundError,
    LayoutError,
    detect_layout,
    find_triplets,
    pair_folder,
)


def make_levir(root: Path, names: dict[str, list[str]]) -> Path:
    img = np.zeros((8, 8, 3), np.uint8)
    for split, stems in names.items():
        for stem in stems:
            for sub in ("A", "B", "label"):
                write_png(
                    root / split / sub / f"{stem}.png", img if sub != "label" else img[..., 0]
                )
    return root


def test_official_layout(tmp_path):
    root = make_levir(
        tmp_path, {"train": ["train_1", "train_2"], "val": ["val_1"], "test": ["test_1"]}
    )
    assert detect_layout(root) == "levir"
    train = find_triplets(root, "train")
    assert [t.name for t in train] == ["train_1", "train_2"]
    t = train[1]
    assert t.pre == root / "train/A/train_2.png" and t.post == root / "train/B/train_2.png"
    assert t.label == root / "train/label/train_2.png"


def test_flat_levir256_layout(samples_dir):
    assert detect_layout(samples_dir) == "levir256"
    counts = {s: len(find_triplets(samples_dir, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 3, "val": 1, "test": 7}
    t = find_triplets(samples_dir, "val")[0]
    assert t.name == "val_27_0000_0256"
    assert t.pre.parent.name == "A" and t.post.parent.name == "B" and t.label.parent.name == "label"


def test_missing_partner_in_b_is_named(tmp_path):
    root = make_levir(tmp_path, {"train": ["a", "b"]})
    (root / "train/B/b.png").unlink()
    with pytest.raises(LayoutError, match=r"train/B/b\.png is missing"):
        find_triplets(root, "train")


def test_missing_label_is_named(tmp_path):
    root = make_levir(tmp_path, {"train": ["a", "b"]})
    (root / "train/label/a.png").unlink()
    with pytest.raises(LayoutError, match=r"train/label/a\.png is missing"):
        find_triplets(root, "train")


def test_extra_file_in_b_is_named(tmp_path):
    root = make_levir(tmp_path, {"train": ["a"]})
    write_png(root / "train/B/zzz.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(LayoutError, match=r"zzz\.png has no partner"):
        find_triplets(root, "train")


def test_listed_name_missing_in_flat_layout(tmp_path, samples_dir):
    import shutil

    root = tmp_path / "flat"
    shutil.copytree(samples_dir, root)
    (root / "label" / "test_2_0000_0000.png").unlink()
    with pytest.raises(LayoutError, match=r"label/test_2_0000_0000\.png is missing"):
        find_triplets(root, "test")
    assert len(find_triplets(root, "train")) == 3  # other splits unaffected


def test_missing_root_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        find_triplets(tmp_path / "nowhere", "train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg
    assert "{train,val,test}/{A,B,label}" in msg and "list/{train,val,test}.txt" in msg
    assert "LEVIR" in msg and "data=synthetic" in msg


def test_unknown_layout_root(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetNotFoundError, match="neither known layout"):
        find_triplets(tmp_path, "train")


def test_prediction_folder_without_labels(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    for sub in ("A", "B"):
        write_png(tmp_path / sub / "x.png", img)
    (t,) = pair_folder(tmp_path, require_label=False)
    assert t.label is None and t.name == "x"

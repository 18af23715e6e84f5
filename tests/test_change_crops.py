"""``data.change_crops``: random crops placed around changed pixels (small real sets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from changecam.data.dataset import ChangeDetectionDataset
from changecam.data.io import write_png
from changecam.data.layout import Triplet


def one_changed_pixel(tmp_path, where=(50, 10), size=64) -> list[Triplet]:
    """A 64² pair whose label has a single changed pixel, and a pair without change."""
    rng = np.random.default_rng(0)
    triplets = []
    for name, changed in (("one", True), ("none", False)):
        label = np.zeros((size, size), np.uint8)
        if changed:
            label[where] = 255
        paths = [tmp_path / f"{name}_{part}.png" for part in ("A", "B", "label")]
        write_png(paths[0], rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        write_png(paths[1], rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        write_png(paths[2], label)
        triplets.append(Triplet(name, *paths))
    return triplets


def changed_in_crops(dataset: ChangeDetectionDataset) -> list[float]:
    torch.manual_seed(0)
    return [float(dataset[i]["mask"].sum()) for i in range(len(dataset))]


def test_every_crop_holds_the_change_with_change_crops_1(tmp_path):
    one, none = one_changed_pixel(tmp_path)
    always = ChangeDetectionDataset(
        [one], "random_crop", patch_size=16, crops_per_image=40, change_crops=1.0
    )
    assert changed_in_crops(always) == [1.0] * 40
    uniform = ChangeDetectionDataset([one], "random_crop", patch_size=16, crops_per_image=40)
    assert sum(changed_in_crops(uniform)) < 10  # a 16² crop holds a given pixel 1 time in 16
    without = ChangeDetectionDataset(
        [none], "random_crop", patch_size=16, crops_per_image=8, change_crops=1.0
    )
    assert changed_in_crops(without) == [0.0] * 8  # no change: uniform crops, no error


def test_change_crops_must_be_a_probability(tmp_path):
    one, _ = one_changed_pixel(tmp_path)
    with pytest.raises(ValueError, match=r"data.change_crops=1.5 must be a probability"):
        ChangeDetectionDataset([one], "random_crop", patch_size=16, change_crops=1.5)


def test_extra_train_joins_the_training_split_only(levir256_tiny, tiny_synthetic):
    """``data.extra_train``: another folder's train split joins training (each of its images
    as many random crops as it has tiles); val and test stay this dataset's."""
    from changecam.data import ChangeDetectionDataModule
    from changecam.data.layout import find_triplets

    own = find_triplets(levir256_tiny, "train")
    extra = find_triplets(tiny_synthetic, "train")
    dm = ChangeDetectionDataModule(
        levir256_tiny,
        train_protocol="random_crop",
        patch_size=32,
        crops_per_image=3,
        extra_train=[tiny_synthetic],
    )
    dm.setup("fit")
    train = dm.dataset("train")
    assert train.triplets == own + extra
    per_image = np.bincount(train.sample_images, minlength=len(own) + len(extra))
    assert per_image.tolist() == [3] * len(own) + [(64 // 32) ** 2] * len(extra)
    assert dm.dataset("val").triplets == find_triplets(levir256_tiny, "val")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pre"].shape[-2:] == (32, 32)


def test_extra_train_folder_must_exist(levir256_tiny, tmp_path):
    from changecam.data import ChangeDetectionDataModule
    from changecam.data.layout import DatasetNotFoundError

    dm = ChangeDetectionDataModule(levir256_tiny, extra_train=[tmp_path / "nowhere"])
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        dm.setup("fit")

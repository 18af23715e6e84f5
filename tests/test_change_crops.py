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

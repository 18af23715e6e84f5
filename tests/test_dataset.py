import numpy as np
import pytest
import torch

from changecam.data.dataset import ChangeDetectionDataset
from changecam.data.io import write_png
from changecam.data.layout import Triplet, find_triplets
from changecam.data.transforms import PairTransform


def coded_triplet(tmp_path, h=64, w=96) -> Triplet:
    """Pre encodes (row, col) in its bands, post is pre + 1, the mask marks one quadrant."""
    yy, xx = np.mgrid[:h, :w]
    pre = np.stack([yy, xx, (yy + xx) % 251], -1).astype(np.uint8)
    post = pre + 1
    mask = ((yy < h // 2) & (xx < w // 3)).astype(np.uint8) * 255
    for sub, arr in (("A", pre), ("B", post), ("label", mask)):
        write_png(tmp_path / sub / "img.png", arr)
    return Triplet(
        "img", tmp_path / "A/img.png", tmp_path / "B/img.png", tmp_path / "label/img.png"
    )


def test_tile_count_and_positions(tmp_path):
    ds = ChangeDetectionDataset([coded_triplet(tmp_path)], "tiles", patch_size=32)
    assert len(ds) == 2 * 3
    positions = [(s["pre"][0, 0, 0].item() * 255, s["pre"][1, 0, 0].item() * 255) for s in ds]
    assert [tuple(round(v) for v in p) for p in positions] == [
        (0, 0),
        (0, 32),
        (0, 64),
        (32, 0),
        (32, 32),
        (32, 64),
    ]
    s = ds[4]
    assert s["name"] == "img_0032_0032"
    assert s["pre"].shape == (3, 32, 32) and s["mask"].shape == (1, 32, 32)
    assert s["pre"].dtype == torch.float32 and 0 <= s["pre"].min() and s["pre"].max() <= 1


def test_levir_tiles_protocol_is_16_per_1024_equivalent(samples_dir):
    ds = ChangeDetectionDataset(find_triplets(samples_dir, "test"), "tiles", patch_size=64)
    assert len(ds) == 7 * 16


@pytest.mark.parametrize("seed", range(5))
def test_identical_geometry_for_pre_post_mask(tmp_path, seed):
    t = coded_triplet(tmp_path)
    aug = PairTransform(hflip=0.5, vflip=0.5, rot90=1.0, jitter=0.0)
    ds = ChangeDetectionDataset([t], "random_crop", patch_size=32, transform=aug, crops_per_image=4)
    torch.manual_seed(seed)
    for s in ds:
        diff = (s["post"] - s["pre"]) * 255
        assert torch.allclose(diff, torch.ones_like(diff), atol=1e-3)  # post = pre + 1 pixelwise
        # the mask follows the same geometry: it is 1 exactly where the pre coordinates say so
        rows, cols = s["pre"][0] * 255, s["pre"][1] * 255
        expected = ((rows.round() < 32) & (cols.round() < 32)).float()
        assert torch.equal(s["mask"][0], expected)


def test_each_random_crop_is_named_by_its_origin_as_a_tile_is(tmp_path):
    """Evaluation crops of one image shared its name: their CAM panels overwrote each other and
    per_image.csv rows could not be told apart (helper-81)."""
    t = coded_triplet(tmp_path)
    ds = ChangeDetectionDataset(
        [t], "random_crop", patch_size=16, crops_per_image=6, fixed_crops=True
    )
    names = []
    for sample in ds:
        row, col = (round(sample["pre"][band, 0, 0].item() * 255) for band in (0, 1))
        assert sample["name"] == f"img_{row:04d}_{col:04d}"
        names.append(sample["name"])
    assert len(set(names)) == 6


def test_a_non_square_sample_keeps_its_shape_under_rotation():
    """data.train_protocol=full on 64 x 96 images: a quarter turn would make some samples
    96 x 64 and the batch could not be stacked (helper-69); they are turned by 0 or 180
    degrees instead, both drawn, with the same geometry for pre, post and mask."""
    aug = PairTransform(hflip=0.0, vflip=0.0, rot90=1.0, jitter=0.0)
    image = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)
    seen = set()
    for seed in range(40):
        pre, post, mask = aug(
            np.repeat(image[..., None], 3, 2), np.repeat(image[..., None], 3, 2), image, seed
        )
        assert pre.shape[:2] == post.shape[:2] == mask.shape == (6, 4)
        assert np.array_equal(pre[..., 0], mask)
        seen.add(mask.tobytes())
    assert seen == {image.tobytes(), np.rot90(image, 2).tobytes()}


def test_flips_and_rotation_are_drawn_independently():
    """Each part at p=0.5: a reflection (one flip, not both) with probability 1/2, the
    identity with (1/4)(5/8) + (1/4)(1/8) = 3/16 (no flip and no turn, or both flips and a
    half turn). Under albumentations' shared child seed the three fired together and no
    reflection ever occurred. Pre, post and mask always get the same geometry."""
    aug = PairTransform(hflip=0.5, vflip=0.5, rot90=0.5)
    corner = np.array([[1, 2], [0, 0]], np.uint8)  # tells the square's 8 symmetries apart
    rotations = {np.rot90(corner, k).tobytes() for k in range(4)}
    seen: dict[bytes, int] = {}
    draws = 4000
    for seed in range(draws):
        rgb = np.repeat(corner[..., None], 3, axis=2)
        pre, post, mask = aug(rgb, rgb + 1, corner, seed)
        assert np.array_equal(pre[..., 0], mask) and np.array_equal(post, pre + 1)
        seen[mask.tobytes()] = seen.get(mask.tobytes(), 0) + 1
    assert len(seen) == 8
    reflections = sum(n for key, n in seen.items() if key not in rotations) / draws
    assert 0.47 < reflections < 0.53  # 3 standard deviations: 0.024
    assert 0.165 < seen[corner.tobytes()] / draws < 0.21  # 3/16 = 0.1875, sd 0.006


def test_date_swap_and_jitter_keep_mask(tmp_path):
    t = coded_triplet(tmp_path)
    ds = ChangeDetectionDataset([t], "tiles", 32, transform=PairTransform(0, 0, 0, date_swap=1.0))
    s = ds[0]
    assert torch.all(s["pre"] * 255 - s["post"] * 255 > 0.5)  # swapped: pre now holds post
    plain = ChangeDetectionDataset([t], "full")[0]  # no transform: the files as they are
    label = plain["mask"]
    assert 0 < label.mean() < 1  # the quadrant: a mask that can be moved or flipped
    swap = PairTransform(0, 0, 0, date_swap=1.0)
    s = ChangeDetectionDataset([t], "full", transform=swap)[0]
    assert torch.equal(s["pre"], plain["post"]) and torch.equal(s["post"], plain["pre"])
    assert torch.equal(s["mask"], label)
    # jitter on every date; the swap is drawn after the jitter, so with the same torch seed the
    # swapped sample is exactly the unswapped one with the dates exchanged
    jitter = {"jitter": 0.4, "jitter_p": 1.0}
    jittered, swapped = (
        ChangeDetectionDataset([t], "full", transform=PairTransform(0, 0, 0, date_swap=p, **jitter))
        for p in (0.0, 1.0)
    )
    for seed in range(3):
        torch.manual_seed(seed)
        j = jittered[0]
        torch.manual_seed(seed)
        s = swapped[0]
        assert torch.equal(s["pre"], j["post"]) and torch.equal(s["post"], j["pre"])
        for key in ("pre", "post"):  # the jitter changed both dates, each by its own draw
            assert not torch.equal(j[key], plain[key])
        assert not torch.allclose(j["post"] - j["pre"], plain["post"] - plain["pre"], atol=0.02)
        assert torch.equal(j["mask"], label) and torch.equal(s["mask"], label)


def test_resize_and_full(tmp_path):
    t = coded_triplet(tmp_path)
    r = ChangeDetectionDataset([t], "resize", patch_size=32)[0]
    assert r["pre"].shape == (3, 32, 32) and set(r["mask"].unique().tolist()) <= {0.0, 1.0}
    f = ChangeDetectionDataset([t], "full", patch_size=32)[0]
    assert f["pre"].shape == (3, 64, 96) and f["name"] == "img"


def test_resize_keeps_the_mask_on_the_change_it_labels(tmp_path):
    """A bright square that is the change: after the resize the mask covers the pixels the
    square mostly covers, not those whose area's top-left pixel it covers."""
    pre = np.zeros((64, 64, 3), np.uint8)
    post = pre.copy()
    post[10:30, 13:43] = 255
    mask = (post[..., 0] > 0).astype(np.uint8) * 255
    for sub, arr in (("A", pre), ("B", post), ("label", mask)):
        write_png(tmp_path / sub / "sq.png", arr)
    t = Triplet("sq", *(tmp_path / sub / "sq.png" for sub in ("A", "B", "label")))
    sample = ChangeDetectionDataset([t], "resize", patch_size=16)[0]
    brightness = sample["post"][0]  # each 4 x 4 area's share of the square
    assert torch.equal(sample["mask"][0], (brightness >= 0.5).float())
    rows = sample["mask"][0].any(1).nonzero().flatten().tolist()
    assert rows == [2, 3, 4, 5, 6, 7]  # rows 10-29: half of area 2 (8-11), half of area 7


@pytest.mark.parametrize("shape", [(24, 96), (96, 24)])
def test_resize_averages_the_side_that_shrinks_while_the_other_grows(shape):
    """OpenCV's INTER_AREA averages only when both sides shrink: 24x96 to 32x32 sampled the
    shrinking side at points, so every third column of change became change everywhere
    (helper-118). Each area's share is 1/3: no change, and the image's mean is kept."""
    from changecam.data.dataset import resize_triplet

    mask = np.zeros(shape, np.uint8)
    image = np.zeros((*shape, 3), np.uint8)
    if shape[1] > shape[0]:
        mask[:, 1::3], image[:, 1::3] = 1, 255
    else:
        mask[1::3, :], image[1::3, :] = 1, 255
    pre, post, resized = resize_triplet(image, image, mask, 32)
    assert resized.shape == (32, 32) and not resized.any()
    assert abs(float(pre.mean()) - 85.0) < 1.0


def test_evaluation_crops_are_the_same_every_time(tmp_path, tiny_synthetic):
    from changecam.data import ChangeDetectionDataModule

    def crops(split: str, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        dm = ChangeDetectionDataModule(
            tiny_synthetic, layout="levir", patch_size=16, eval_protocol="random_crop"
        )
        dataset = dm.dataset(split)
        return [dataset[i]["pre"] for i in range(len(dataset))]

    first, again = crops("val", 0), crops("val", 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, first[0]) for a in first[1:]), "still spread over the image"


def test_overfitting_a_few_batches_sees_the_same_crops_and_flips_every_epoch(tiny_synthetic):
    """Under ``trainer.overfit_batches`` Lightning's sequential sampler hands indexes without
    our sampler's seeds: every epoch drew other random crops and flips (helper-111), where the
    overfit check needs the same batches."""
    import lightning as L

    from changecam.data import ChangeDetectionDataModule

    def epoch(overfit: int, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        dm = ChangeDetectionDataModule(
            tiny_synthetic, layout="levir", patch_size=16, train_protocol="random_crop"
        )
        dm.trainer = L.Trainer(overfit_batches=overfit, logger=False, enable_progress_bar=False)
        dataset = dm.dataset("train")
        return [dataset[i]["pre"] for i in range(len(dataset))]

    first, again = epoch(2, 0), epoch(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    trained, other = epoch(0, 0), epoch(0, 1)
    assert not all(torch.equal(a, b) for a, b in zip(trained, other, strict=True))


def test_decoded_once_per_image(tmp_path, monkeypatch):
    import changecam.data.dataset as mod

    calls = []
    real = mod.read_image
    monkeypatch.setattr(mod, "read_image", lambda p: calls.append(p) or real(p))
    ds = ChangeDetectionDataset([coded_triplet(tmp_path)], "tiles", patch_size=32)
    for i in range(len(ds)):
        ds[i]
    assert len(calls) == 2  # pre and post, once each, for six tiles


def test_size_mismatch_is_named(tmp_path):
    t = coded_triplet(tmp_path)
    write_png(t.post, np.zeros((64, 90, 3), np.uint8))
    ds = ChangeDetectionDataset([t], "full")
    with pytest.raises(ValueError, match="size mismatch for img"):
        ds[0]


def test_unknown_protocol(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        ChangeDetectionDataset([coded_triplet(tmp_path)], "tile")  # type: ignore[arg-type]


def test_bands_convert_on_the_device_they_are_sent_to():
    """GDAL's band-first uint8 -> the network's floats, the same values with or without a
    device, and on that device when one is given."""
    from changecam.data.transforms import bands_to_tensor, image_to_tensor

    bands = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(3, 2, 4) * 10
    on_cpu = bands_to_tensor(bands)
    assert on_cpu.dtype == torch.float32 and on_cpu.shape == (3, 2, 4)
    assert torch.equal(on_cpu, torch.from_numpy(bands).float() / 255.0)
    assert torch.equal(on_cpu, image_to_tensor(bands.transpose(1, 2, 0)))
    assert torch.equal(bands_to_tensor(bands, "cpu"), on_cpu)
    moved = bands_to_tensor(bands, "meta")
    assert moved.device.type == "meta" and moved.dtype == torch.float32


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_synthetic_split_of_no_pairs_is_named_when_the_run_uses_it(tmp_path, split):
    """``data.synthetic.test=0`` wrote no test folder, which the run then reported as a missing
    LEVIR-CD download (helper-128)."""
    from changecam.data import ChangeDetectionDataModule

    counts = {"train": 2, "val": 1, "test": 1, split: 0}
    dm = ChangeDetectionDataModule(
        tmp_path / "syn", patch_size=16, synthetic={"image_size": 32, **counts}
    )
    dm.prepare_data()
    assert len(dm.triplets("train")) == 2  # the splits it wrote are used as before
    with pytest.raises(ValueError, match=rf"^data.synthetic.{split}=0 writes no {split} pairs"):
        dm.triplets(split)


@pytest.mark.parametrize(
    ("key", "value"),
    [("patch_size", 0), ("patch_size", -32), ("eval_batch_size", 0), ("cache_images", 0)],
)
def test_sizes_below_one_are_refused_naming_the_key(tmp_path, key, value):
    """``data.patch_size=0`` divided by zero, ``-32`` left the sampler empty, and
    ``data.eval_batch_size=0`` became the train batch size (helper-128), and
    ``data.cache_images=0`` was refused after the sanity validation, naming no key (helper-141)."""
    from changecam.data import ChangeDetectionDataModule

    with pytest.raises(ValueError, match=rf"^data.{key}={value} must be at least 1"):
        ChangeDetectionDataModule(tmp_path, **{"patch_size": 16, key: value})


def test_one_extra_train_folder_without_brackets_is_one_folder(tmp_path, tiny_synthetic):
    """``data.extra_train=<folder>`` was read one character at a time (helper-141)."""
    from changecam.data import ChangeDetectionDataModule

    dm = ChangeDetectionDataModule(
        tiny_synthetic, layout="levir", patch_size=16, extra_train=str(tiny_synthetic)
    )
    assert dm.extra_train == [tiny_synthetic]
    assert len(dm.triplets("train")) == 2 * dm._own_train


def test_num_workers_below_zero_is_refused_and_a_cap_is_said(tmp_path, tiny_synthetic, caplog):
    """-1 failed inside the fit's sanity check naming no key; a cap to the usable cores was
    silent while the run's config and logged hyperparameters said the value given
    (helper-192)."""
    import logging

    from changecam.data import ChangeDetectionDataModule
    from changecam.environment import usable_cores

    with pytest.raises(ValueError, match=r"data.num_workers=-1 must be a whole number >= 0"):
        ChangeDetectionDataModule(tiny_synthetic, num_workers=-1)
    with caplog.at_level(logging.INFO, logger="changecam"):
        data = ChangeDetectionDataModule(tiny_synthetic, num_workers=usable_cores() + 3)
    assert data.num_workers == usable_cores()
    assert f"data.num_workers={usable_cores() + 3}: {usable_cores()} loader workers" in caplog.text

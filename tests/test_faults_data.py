"""Bad data fails early, once, naming the file or key, and leaves nothing that looks finished.

Table-driven: each case damages a copy of a tiny dataset and runs the real command in-process
(``train`` or ``predict``), asserting three things: the exception type, a message naming the
file or config key, and no ``metrics.json`` / checkpoint (train) or no outputs of the refused
pair (predict). The cases that already worked before (missing files, size and mode, label
values) are in the table too, so they keep working.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from changecam.cli.config_checks import ConfigError
from changecam.cli.predict import PredictionError, predict
from changecam.cli.train import train
from changecam.data import ChangeDetectionDataModule
from changecam.data.io import ImageReadError, image_size, read_header, read_image, read_label
from changecam.data.layout import DatasetNotFoundError, LayoutError
from changecam.data.validate import DataValidationError
from helpers import compose_train, run_script, tiny_overrides
from test_checkpoint import make_lightning_checkpoint

# ---------------------------------------------------------------- damaging files


def cut(path: Path, fraction: float = 0.5) -> Path:
    """Keep the first ``fraction`` of a file's bytes (an interrupted copy or download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def garble(path: Path, fill: bytes = b"\xff") -> Path:
    """Overwrite 64 bytes in the middle of a file (an erased flash block reads 0xFF, a lost disk
    block 0x00); the length and the end marker are kept."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = fill * 64
    path.write_bytes(bytes(data))
    return path


def convert(path: Path, suffix: str, **save: object) -> Path:
    """Re-encode an image in another format (Pillow picks it from ``suffix``); drop the old."""
    target = path.with_suffix(suffix)
    with Image.open(path) as im:
        im.load()
        im.save(target, **save)
    path.unlink()
    return target


def to_format(root: Path, split: str, suffix: str, subs=("A", "B")) -> None:
    for sub in subs:
        for path in sorted((root / split / sub).glob("*.png")):
            convert(path, suffix)


def first(root: Path, split: str, sub: str) -> Path:
    return sorted((root / split / sub).iterdir())[0]


def rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray]) -> Path:
    cv2.imwrite(str(path), fn(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)))
    return path


def resize_split(root: Path, split: str, side: int) -> None:
    for sub in ("A", "B", "label"):
        for path in (root / split / sub).glob("*.png"):
            rewrite(path, lambda a: cv2.resize(a, (side, side), interpolation=cv2.INTER_NEAREST))


# Each case: damage(root) -> the strings the message must hold (file paths or config keys).


def truncated_post_jpeg(root):
    to_format(root, "train", ".jpg")
    return [str(cut(first(root, "train", "B")))]


def truncated_png(root):
    return [str(cut(first(root, "val", "A")))]


def truncated_tiff(root):  # Pillow writes the directory first: only the strips are cut
    to_format(root, "test", ".tif")
    return [str(cut(first(root, "test", "B")))]


def truncated_label(root):
    return [str(cut(first(root, "train", "label"), 0.7))]


def garbled_jpeg(root):
    to_format(root, "val", ".jpg")
    return [str(garble(first(root, "val", "A")))]


def size_mismatch(root):
    post = rewrite(first(root, "train", "B"), lambda a: a[:, :48])
    return [str(post), "64x48", "same size"]


def sixteen_bit_image(root):
    return [str(rewrite(first(root, "val", "B"), lambda a: a.astype(np.uint16) * 257)), "16-bit"]


def rgba_label(root):
    label = first(root, "train", "label")
    rewrite(label, lambda a: np.dstack([a, a, a, np.full_like(a, 255)]))
    return [str(label), "single-band"]


def colour_label(root):
    """An RGB label whose channels differ: its header looks like a grey one saved as RGB."""
    label = first(root, "test", "label")
    rewrite(label, lambda a: np.dstack([a, np.zeros_like(a), a]))
    return [str(label), "colour"]


def grey_label_values(root):
    return [str(rewrite(first(root, "test", "label"), lambda a: a // 2)), "label values"]


def missing_partner(root):
    post = first(root, "val", "B")
    post.unlink()
    return [str(post), "is missing"]


def same_name_twice(root):
    pre = first(root, "train", "A")
    shutil.copy(pre, pre.with_suffix(".jpg"))
    return [str(pre), str(pre.with_suffix(".jpg")), "same name"]


def patch_not_a_multiple(root):
    return ["data.patch_size=30", "size multiple 4", "SiameseUNet, model.depth=2"]


def full_images_not_a_multiple(root):
    resize_split(root, "train", 62)
    return ["data.train_protocol=full", str(first(root, "train", "A")), "62x62", "size multiple 4"]


def full_images_of_mixed_sizes(root):
    rewrite_all = first(root, "val", "A").name
    for sub in ("A", "B", "label"):
        rewrite(root / "val" / sub / rewrite_all, lambda a: a[:48, :48])
    return ["data.eval_protocol=full", "data.eval_batch_size=1", "48x48"]


def smaller_than_patch(root):
    return ["data.patch_size=128", str(first(root, "train", "A")), "64x64"]


def unknown_validate_value(root):
    return ["data.validate='quick'", "headers", "full", "none"]


TRAIN_CASES = [
    # (damage, overrides, exception type) -- the message must hold what damage returns
    (truncated_post_jpeg, [], DataValidationError),
    (truncated_png, [], DataValidationError),
    (truncated_tiff, [], DataValidationError),
    (truncated_label, [], DataValidationError),
    (garbled_jpeg, ["data.validate=full"], DataValidationError),
    (size_mismatch, [], DataValidationError),
    (sixteen_bit_image, [], DataValidationError),
    (rgba_label, [], DataValidationError),
    (colour_label, [], DataValidationError),
    (grey_label_values, ["data.validate=full"], DataValidationError),
    (missing_partner, [], LayoutError),
    (same_name_twice, [], LayoutError),
    (patch_not_a_multiple, ["data.patch_size=30"], DataValidationError),
    (full_images_not_a_multiple, ["data.train_protocol=full"], DataValidationError),
    (
        full_images_of_mixed_sizes,
        ["data.eval_protocol=full", "data.eval_batch_size=2"],
        DataValidationError,
    ),
    (smaller_than_patch, ["data.patch_size=128"], DataValidationError),
    (unknown_validate_value, ["data.validate=quick"], ConfigError),
]


def train_overrides(root: Path, extra: list[str], layout: str = "levir") -> list[str]:
    keys = {o.split("=", 1)[0] for o in extra}
    base = [o for o in tiny_overrides(root) if o.split("=", 1)[0] not in keys | {"data.layout"}]
    return [
        "experiment=quickstart",
        *base,
        f"data.layout={layout}",
        "logger=none",
        "callbacks.cam_panels=null",
        "trainer.max_epochs=1",
        *extra,
    ]


def assert_nothing_finished(run: Path) -> None:
    assert not (run / "metrics.json").exists()
    assert not list(run.rglob("*.ckpt")), "no checkpoint: the run failed before any epoch"


@pytest.fixture
def dataset(tmp_path, tiny_synthetic) -> Path:
    """A copy of the tiny synthetic set (official layout, 64 px PNGs, 4/2/2) to damage."""
    return Path(shutil.copytree(tiny_synthetic, tmp_path / "data"))


@pytest.mark.parametrize(
    ("damage", "overrides", "error"), TRAIN_CASES, ids=[c[0].__name__ for c in TRAIN_CASES]
)
def test_train_refuses_bad_data_at_setup(tmp_path, dataset, damage, overrides, error):
    needles = damage(dataset)
    with pytest.raises(error) as info:
        train(compose_train(tmp_path, train_overrides(dataset, overrides)))
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert_nothing_finished(tmp_path / "run")


def empty_list(root):
    (root / "list" / "test.txt").write_text("\n")
    return [str(root / "list" / "test.txt"), "empty"]


def missing_list(root):
    (root / "list" / "test.txt").unlink()
    return [str(root / "list" / "test.txt"), "does not exist"]


def listed_file_missing(root):
    name = (root / "list" / "test.txt").read_text().split()[0]
    (root / "label" / name).unlink()
    return [str(root / "label" / name), "is missing"]


FLAT_CASES = [
    (empty_list, LayoutError),
    (missing_list, DatasetNotFoundError),
    (listed_file_missing, LayoutError),
]


@pytest.mark.parametrize(("damage", "error"), FLAT_CASES, ids=[c[0].__name__ for c in FLAT_CASES])
def test_a_bad_test_list_fails_before_fitting(tmp_path, levir256_tiny, damage, error):
    root = Path(shutil.copytree(levir256_tiny, tmp_path / "data"))
    needles = damage(root)
    with pytest.raises(error) as info:
        train(compose_train(tmp_path, train_overrides(root, [], layout="levir256")))
    for needle in needles:
        assert needle in str(info.value)
    assert_nothing_finished(tmp_path / "run")


@pytest.mark.slow
def test_train_script_with_an_empty_test_list_fails_at_setup(tmp_path, levir256_tiny):
    root = Path(shutil.copytree(levir256_tiny, tmp_path / "data"))
    (root / "list" / "test.txt").write_text("")
    run = tmp_path / "run"
    proc = run_script(
        "train.py",
        [*train_overrides(root, [], layout="levir256"), f"hydra.run.dir={run}"],
        tmp_path,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"split list {root / 'list' / 'test.txt'} is empty" in output
    assert "Epoch 0" not in output and "train/loss" not in output
    assert_nothing_finished(run)


# ---------------------------------------------------------------- the one reader


def write_rgb(path: Path, seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (5, 5), 2)
    Image.fromarray(image).save(path)
    return path


def jpeg_mask(path: Path) -> Path:
    """Replace the file by a 0/255 mask saved as JPEG (lossy: its edges get other values)."""
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 8:30] = 255
    Image.fromarray(mask).save(path)
    return path


READ_CASES = [
    # (file name, damage, reader, exception type, words of the message)
    ("cut.jpg", cut, read_image, ImageReadError, "truncated or corrupt JPEG"),
    ("cut.png", cut, read_image, ImageReadError, "could not be decoded"),
    ("cut.tif", cut, read_image, ImageReadError, "could not be decoded"),
    ("cut.bmp", cut, read_image, ImageReadError, "could not be decoded"),
    ("garbled.jpg", garble, read_image, ImageReadError, "truncated or corrupt JPEG"),
    ("garbled.png", lambda p: garble(p, b"\0"), read_image, ImageReadError, "could not be decoded"),
    ("empty.png", lambda p: cut(p, 0.0), read_image, ImageReadError, "could not be decoded"),
    ("label.jpg", jpeg_mask, read_label, ImageReadError, "store labels as PNG"),
    ("absent.png", lambda p: p.unlink(), read_image, FileNotFoundError, "does not exist"),
]


@pytest.mark.parametrize(
    ("name", "damage", "reader", "error", "words"), READ_CASES, ids=[c[0] for c in READ_CASES]
)
def test_the_reader_refuses_damaged_files_naming_them(tmp_path, name, damage, reader, error, words):
    path = write_rgb(tmp_path / name)
    damage(path)
    with pytest.raises(error) as info:
        reader(path)
    assert str(path) in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png", "cut.tif", "cut.bmp"])
def test_headers_alone_see_a_cut_file(tmp_path, name, monkeypatch):
    """The header check decodes no pixels of a whole file, and only a file its structure
    shows cut short is handed to the decoder (a check that decoded every file passed,
    helper-151)."""
    import changecam.data.io as io_module

    decoded = []
    real_decode = io_module._decode
    monkeypatch.setattr(
        io_module,
        "_decode",
        lambda path, *a, **k: decoded.append(path) or real_decode(path, *a, **k),
    )
    whole = write_rgb(tmp_path / f"whole_{name}", size=128)
    assert read_header(whole).width == 128 and decoded == []
    path = cut(write_rgb(tmp_path / name, size=128))
    with pytest.raises(ImageReadError, match=str(path)):
        read_header(path)
    assert decoded == [path]


def test_jpeg_pixels_are_those_opencv_decodes(tmp_path):
    path = write_rgb(tmp_path / "a.jpg", size=96)
    expected = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_image(path), expected)
    grey = tmp_path / "g.jpg"
    Image.fromarray(expected[..., 0]).save(grey)
    assert read_image(grey).shape == (96, 96, 3)


def test_a_jpeg_stored_on_its_side_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A photo stored turned, with EXIF Orientation 6 (rotate 90° clockwise to view), is read
    as viewers and OpenCV's imread show it, header size included: its pixels were read as
    stored, against a label drawn on the upright image (helper-168)."""
    upright = np.zeros((40, 64, 3), np.uint8)  # 40 x 64, a bright block at the top left
    upright[:10, :16] = 255
    path = tmp_path / "side.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    # stored turned 90° anticlockwise (64 x 40): Orientation 6 turns it back clockwise
    Image.fromarray(np.rot90(upright)).save(path, exif=exif, quality=100)
    decoded = read_image(path)
    assert decoded.shape == (40, 64, 3) and read_header(path).height == 40
    assert read_header(path).width == 64 and image_size(path) == (40, 64)
    assert np.abs(decoded.astype(int) - upright).mean() < 2  # JPEG's loss alone
    expected = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, expected)
    # every orientation as Pillow's exif_transpose turns it, its header size with it
    for orientation in range(1, 9):
        exif[0x0112] = orientation
        Image.fromarray(upright).save(path, exif=exif, quality=100)
        with Image.open(path) as im:
            turned = np.asarray(ImageOps.exif_transpose(im))
        assert read_image(path).shape == turned.shape, orientation
        np.testing.assert_array_equal(read_image(path), turned)
        assert image_size(path) == turned.shape[:2] == read_header(path).size
    # a malformed tag (text, not a number) leaves the pixels and the size as stored, together
    ifd = struct.pack("<HHHI4sI", 1, 0x0112, 2, 2, b"6\0\0\0", 0)  # one entry: ASCII "6"
    Image.fromarray(upright).save(path, exif=b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd)
    assert read_image(path).shape == (40, 64, 3) and read_header(path).size == (40, 64)


# ---------------------------------------------------------------- what works


def test_jpeg_images_pair_with_png_labels(dataset):
    to_format(dataset, "train", ".jpg")
    dm = ChangeDetectionDataModule(dataset, layout="levir", patch_size=32, validate="full")
    dm.setup("fit")
    triplets = dm.triplets("train")
    assert {t.pre.suffix for t in triplets} == {".jpg"}
    assert {t.label.suffix for t in triplets} == {".png"}
    assert dm.dataset("train")[0]["pre"].shape == (3, 32, 32)


def test_tiles_that_leave_border_strips_of_a_scored_split_unscored_are_warned_about(
    dataset, caplog
):
    """64 px images in 48 px tiles: one tile each, 56.25 % of the pixels scored, where eval.py
    printed "pooled over all pixels" (helper-168); the training split's borders go unwarned."""
    dm = ChangeDetectionDataModule(dataset, layout="levir", patch_size=48)
    with caplog.at_level("WARNING", logger="changecam"):
        dm.setup("fit")
        dm.setup("test")
    warned = [r.getMessage() for r in caplog.records if "is never scored" in r.getMessage()]
    assert [w.split(" of the ")[1].split()[0] for w in warned] == ["val", "test"]
    assert "data.eval_protocol=tiles scores 56.2 % of the val split's pixels" in warned[0]
    assert "2 of the 2 images have sides that are not a multiple of data.patch_size=48" in warned[0]
    caplog.clear()
    whole = ChangeDetectionDataModule(dataset, layout="levir", patch_size=32)
    with caplog.at_level("WARNING", logger="changecam"):
        whole.setup("fit")
    assert "is never scored" not in caplog.text


def test_a_pair_in_two_splits_is_warned_about(dataset, caplog):
    """A name in two split lists (or a folder given twice) trained on what the test split
    scores, silently (helper-171): warned about once per pair of splits, naming the file; a
    pair is its pre and post files, links (symbolic or hard) the files they name."""
    train_pairs = [sorted((dataset / "train" / d).iterdir())[:2] for d in ("A", "B")]
    test_pairs = [sorted((dataset / "test" / d).iterdir()) for d in ("A", "B")]
    for (first_train, second_train), (first_test, second_test) in zip(
        train_pairs, test_pairs, strict=True
    ):
        first_test.unlink()
        first_test.symlink_to(first_train)  # the test split's first pair is the train split's
        second_test.unlink()
        os.link(second_train, second_test)  # and its second, by hard links
    dm = ChangeDetectionDataModule(dataset, layout="levir", patch_size=32)
    with caplog.at_level("WARNING", logger="changecam"):
        dm.setup("fit")
        assert "shares" not in caplog.text  # train and val share nothing
        dm.setup("test")
        dm.setup("test")
    (shared,) = [r.getMessage() for r in caplog.records if "shares" in r.getMessage()]
    assert shared == (
        f"the test split shares 2 of its 2 pairs with the train split (e.g. {test_pairs[0][0]}): "
        "its scores are not held out from it"
    )
    # a folder given twice or three times: the training split holds its pairs more than once
    # (helper-173), counted once each (helper-177)
    for extra in ([dataset], [dataset, dataset]):
        caplog.clear()
        again = ChangeDetectionDataModule(dataset, layout="levir", patch_size=32, extra_train=extra)
        with caplog.at_level("WARNING", logger="changecam"):
            again.setup("fit")
        assert "the train split holds 4 of its pairs more than once" in caplog.text


def test_pairs_that_share_one_date_are_not_warned_about(dataset, caplog):
    """One pre image beside two post images (a multi-date series) makes two pairs, not one
    given twice (helper-177)."""
    first_pre, second_pre = sorted((dataset / "val" / "A").iterdir())
    second_pre.unlink()
    second_pre.symlink_to(first_pre)
    with caplog.at_level("WARNING", logger="changecam"):
        ChangeDetectionDataModule(dataset, layout="levir", patch_size=32).setup("fit")
    assert "more than once" not in caplog.text and "shares" not in caplog.text


def test_full_validation_shows_progress_and_accepts_good_data(dataset, capsys):
    dm = ChangeDetectionDataModule(
        dataset, layout="levir", patch_size=32, validate="full", splits=["test"]
    )
    dm.setup("fit")
    assert "data.validate=full: decoding" in capsys.readouterr().err
    assert set(dm.datasets) == {"train", "val"}, "the test split is checked, not built"
    with pytest.raises(ValueError, match="data.validate='fast' is not allowed"):
        ChangeDetectionDataModule(dataset, validate="fast")


# ---------------------------------------------------------------- predict's inputs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_synthetic) -> Path:
    return make_lightning_checkpoint(
        tmp_path_factory.mktemp("faults_ckpt") / "best.ckpt", tiny_synthetic, steps=1
    )


def predict_folder(tmp_path: Path, ckpt: Path, folder: Path) -> dict:
    overrides = [
        f"ckpt_path={ckpt}",
        f"input.dir={folder}",
        "device=cpu",
        "sliding_window.window=64",
        "explain.faithfulness.steps=2",
        "explain.faithfulness.batch_size=3",
    ]
    return predict(compose_train(tmp_path, overrides, "predict"))


def input_folder(dataset: Path, tmp_path: Path) -> Path:
    folder = Path(shutil.copytree(dataset / "test", tmp_path / "in"))
    return folder


def test_predict_refuses_a_truncated_jpeg_and_keeps_the_other_pairs(tmp_path, dataset, ckpt):
    folder = input_folder(dataset, tmp_path)
    to_format(folder.parent, folder.name, ".jpg")
    bad = cut(first(folder.parent, folder.name, "B"))
    with pytest.raises(PredictionError) as info:
        predict_folder(tmp_path, ckpt, folder)
    assert str(bad) in str(info.value)
    masks = tmp_path / "run" / "masks"
    assert not (masks / f"{bad.stem}.png").exists(), "the refused pair left nothing"
    assert len(list(masks.glob("*.png"))) == 1, "the other pair was predicted"


@pytest.mark.parametrize("fault", ["jpeg_label", "wrong_size_label"])
def test_predict_drops_an_unusable_optional_label_with_a_warning(
    tmp_path, dataset, ckpt, caplog, fault
):
    folder = input_folder(dataset, tmp_path)
    label = first(folder.parent, folder.name, "label")
    if fault == "jpeg_label":
        label = convert(label, ".jpg", quality=50)  # lossy: no longer 0/255
    else:
        rewrite(label, lambda a: a[:32])
    with caplog.at_level(logging.WARNING, logger="changecam"):
        report = predict_folder(tmp_path, ckpt, folder)
    assert report["failed"] == [] and len(report["pairs"]) == 2
    assert any("label dropped" in r.message and str(label) in r.message for r in caplog.records)
    assert (tmp_path / "run" / "panels" / f"{label.stem}.png").is_file()


def test_split_lists_in_other_encodings_and_names_with_dots(tmp_path, levir256_tiny):
    """helper-74's cases: a list saved by Notepad (UTF-8 with a byte-order mark) or PowerShell
    5 (UTF-16) reads as the same names; a name whose last dot starts no image suffix keeps it
    (``2019.05.01_x``); a list in no known encoding is named."""
    from changecam.data.layout import find_triplets

    root = Path(shutil.copytree(levir256_tiny, tmp_path / "data"))
    listing = root / "list" / "test.txt"
    names = listing.read_text().split()
    expected = [t.name for t in find_triplets(root, "test", "levir256")]
    for encoded in (b"\xef\xbb\xbf" + listing.read_bytes(), listing.read_text().encode("utf-16")):
        listing.write_bytes(encoded)
        assert [t.name for t in find_triplets(root, "test", "levir256")] == expected
    stem = Path(names[0]).stem
    for folder in ("A", "B", "label"):
        (root / folder / names[0]).rename(root / folder / f"2019.05.01_{stem}.png")
    listing.write_text("\n".join([f"2019.05.01_{stem}", *names[1:]]) + "\n")
    assert [t.name for t in find_triplets(root, "test", "levir256")][0] == f"2019.05.01_{stem}"
    listing.write_bytes(b"\xc3\x28 not utf-8\n")
    with pytest.raises(LayoutError, match=rf"split list {listing} is not UTF-8 text"):
        find_triplets(root, "test", "levir256")

from pathlib import Path

import cv2
import numpy as np
import pytest

from changecam.data.io import write_png
from changecam.data.layout import (
    DatasetNotFoundError,
    LayoutError,
    detect_layout,
    find_triplets,
    forget_named_files,
    input_pairs,
    pair_folder,
)
from helpers import run_script


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


def test_split_lists_beside_the_official_layout_are_named_as_unread(tmp_path, caplog):
    """list/*.txt beside train/ val/ test/ were ignored silently: a user who wrote lists to
    train on a subset trained on every image (helper-171)."""
    root = make_levir(tmp_path, {"train": ["train_1", "train_2"], "test": ["test_1"]})
    (root / "list").mkdir()
    (root / "list" / "train.txt").write_text("train_1.png\n")
    forget_named_files()
    with caplog.at_level("WARNING", logger="changecam"):
        assert len(find_triplets(root, "train")) == 2
        find_triplets(root, "test")
    warned = [r.getMessage() for r in caplog.records if "the lists are not" in r.getMessage()]
    assert warned == [
        f"{root} holds the official layout's split folders and {root / 'list'}: the split "
        "folders are read and the lists are not (lists choose files of the flat layout, "
        "<root>/A, B, label; to train on a subset, keep only its files in train/)"
    ]


@pytest.mark.parametrize("data", ["levir256_tiny", "samples_dir"])
def test_flat_levir256_layout(request, data):
    """The committed 64 px fixture and the real samples it was made from read the same."""
    samples_dir = request.getfixturevalue(data)
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


def test_listed_name_missing_in_flat_layout(tmp_path, levir256_tiny):
    import shutil

    root = tmp_path / "flat"
    shutil.copytree(levir256_tiny, root)
    (root / "label" / "test_2_0000_0000.png").unlink()
    with pytest.raises(LayoutError, match=r"label/test_2_0000_0000\.png is missing"):
        find_triplets(root, "test")
    assert len(find_triplets(root, "train")) == 3  # other splits unaffected


@pytest.mark.parametrize("twice", ["test_2_0000_0000.png", "test_2_0000_0000"])
def test_a_name_listed_twice_is_refused(tmp_path, levir256_tiny, twice):
    """Its pair would be scored (or trained on) twice, silently moving every pooled score."""
    import shutil

    root = tmp_path / "flat"
    shutil.copytree(levir256_tiny, root)
    listing = root / "list" / "test.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([*lines, "", twice]) + "\n")
    first = next(i for i, n in enumerate(n for n in lines if n.strip()) if "test_2_0000_0000" in n)
    with pytest.raises(
        LayoutError,
        match=rf"test\.txt names test_2_0000_0000 twice \(lines {first + 1} and {len(lines) + 1} ",
    ):
        find_triplets(root, "test")


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


def test_a_missing_optional_label_leaves_its_pair_unlabelled(tmp_path, caplog):
    """predict's and explain's label/ is optional: one pair without a label (or a label
    without a pair) is named in a warning, not a refusal of the whole run."""
    img = np.zeros((8, 8, 3), np.uint8)
    for name in ("x", "y"):
        for sub in ("A", "B"):
            write_png(tmp_path / sub / f"{name}.png", img)
    write_png(tmp_path / "label" / "y.png", img[..., 0])
    write_png(tmp_path / "label" / "z.png", img[..., 0])
    with caplog.at_level("WARNING"):
        x, y = pair_folder(tmp_path, require_label=False)
    assert (x.name, x.label, y.label) == ("x", None, tmp_path / "label" / "y.png")
    assert "1 pair(s) have no label in" in caplog.text and ": x" in caplog.text
    assert "1 label(s) in" in caplog.text and "have no pair, not used: z" in caplog.text
    with pytest.raises(LayoutError, match=r"label/z\.png has no partner .*A/z\.png"):
        pair_folder(tmp_path)  # a training set's labels are not optional


def test_images_in_formats_changecam_does_not_read_are_named(tmp_path, caplog):
    """A folder's WebP or JPEG 2000 pairs were left out without a word (helper-148); side-car
    files (GDAL's .aux.xml, world files) and hidden files are not images and stay unnamed."""
    img = np.zeros((8, 8, 3), np.uint8)
    for sub in ("A", "B"):
        write_png(tmp_path / sub / "x.png", img)
        for name in ("y.webp", "z.JP2", "x.png.aux.xml", "x.tfw", ".w.webp"):
            (tmp_path / sub / name).write_bytes(b"")
    with caplog.at_level("WARNING"):
        (x,) = pair_folder(tmp_path, require_label=False)
    assert x.name == "x"
    for sub in ("A", "B"):
        assert (
            f"2 file(s) in {tmp_path / sub} are not read, as their format is not one of .png, "
            ".jpg, .jpeg, .tif, .tiff, .bmp (convert them to one of those): y.webp, z.JP2"
        ) in caplog.text
    assert caplog.text.count("are not read") == 2
    caplog.clear()  # the flat layout lists A/ and B/ once per split: named once
    with caplog.at_level("WARNING"):
        pair_folder(tmp_path, require_label=False)
    assert "are not read" not in caplog.text
    forget_named_files()  # a command's next run (a sweep's next job in the same process)
    with caplog.at_level("WARNING"):
        pair_folder(tmp_path, require_label=False)
    assert caplog.text.count("are not read") == 2


def test_committed_fixture_is_small_and_in_the_real_format(levir256_tiny):
    files = sorted(p for p in levir256_tiny.rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in files) < 256 * 1024
    fractions = []
    for t in (t for s in ("train", "val", "test") for t in find_triplets(levir256_tiny, s)):
        for path in (t.pre, t.post):
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 10
        label = cv2.imread(str(t.label), cv2.IMREAD_UNCHANGED)
        assert label.shape == (64, 64) and set(np.unique(label).tolist()) <= {0, 255}
        fractions.append((label == 255).mean())
    assert min(fractions) == 0.0 and max(fractions) > 0.1  # train_386 has no change


def test_committed_fixture_is_what_make_fixtures_writes(tmp_path, levir256_tiny, samples_dir):
    out = tmp_path / "levir256_tiny"
    run_script(
        "tests/fixtures/make_fixtures.py",
        [f"--samples={samples_dir}", f"--out={out}"],
        cwd=tmp_path,
        timeout=120,
    )
    relative = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert relative == sorted(
        str(p.relative_to(levir256_tiny)) for p in levir256_tiny.rglob("*") if p.is_file()
    )
    assert len(relative) == 3 * 11 + 3 + 1  # A, B, label; the three lists; the README
    for name in relative:
        made, committed = out / name, levir256_tiny / name
        if made.suffix == ".png":  # pixels (the PNG bytes depend on the zlib version)
            a, b = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (made, committed))
            assert a.shape == b.shape and np.array_equal(a, b), name
        else:
            assert made.read_text() == committed.read_text(), name


def test_input_pairs_name_the_missing_date():
    with pytest.raises(ValueError, match="input.pre is set but input.post is not"):
        input_pairs("a.png", None, None)
    with pytest.raises(ValueError, match="input.post is set but input.pre is not"):
        input_pairs(None, "b.png", None)
    with pytest.raises(ValueError, match="no input: set input.dir"):
        input_pairs(None, None, None)

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from changecam.data.io import read_image, read_label
from changecam.data.layout import find_triplets
from changecam.data.synthetic import (
    SPEC_FILE,
    SyntheticSpec,
    generate,
    generate_pair,
    generate_scene,
)


def test_deterministic_and_seed_dependent():
    spec = SyntheticSpec(image_size=64, seed=7)
    a = generate_pair(spec, "train", 3)
    b = generate_pair(spec, "train", 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = generate_pair(SyntheticSpec(image_size=64, seed=8), "train", 3)
    assert not np.array_equal(a[0], c[0])


def test_writes_official_layout_and_skips_when_unchanged(tmp_path):
    spec = SyntheticSpec(image_size=64, train=3, val=1, test=2, seed=1)
    root = generate(tmp_path / "syn", spec)
    assert [len(find_triplets(root, s, "levir")) for s in ("train", "val", "test")] == [3, 1, 2]
    assert (root / "train/A/train_1.png").is_file()
    pre, lab = read_image(root / "test/A/test_2.png"), read_label(root / "test/label/test_2.png")
    assert pre.shape == (64, 64, 3) and lab.shape == (64, 64)
    np.testing.assert_array_equal(pre, generate_pair(spec, "test", 1)[0])
    stamp = (root / "train/A/train_1.png").stat().st_mtime_ns
    generate(root, spec)
    assert (root / "train/A/train_1.png").stat().st_mtime_ns == stamp  # skipped
    assert json.loads((root / SPEC_FILE).read_text())["seed"] == 1
    generate(root, SyntheticSpec(image_size=64, train=2, val=1, test=1, seed=1))
    assert len(find_triplets(root, "train", "levir")) == 2  # a new spec replaces the old set


def test_labels_mark_exactly_the_buildings_that_changed():
    """Without nuisance, the dates differ inside the label and nowhere else but cast shadows."""
    import cv2

    spec = SyntheticSpec(image_size=128, seed=0, nuisance=False)
    changed = 0
    for n in range(8):
        pre, post, label = generate_pair(spec, "train", n)
        assert set(np.unique(label)) <= {0, 1}
        diff = np.abs(post.astype(int) - pre.astype(int)).sum(-1)
        if label.sum() == 0:
            assert diff.max() == 0
            continue
        changed += 1
        assert (diff[label == 1] > 0).mean() > 0.95
        shadow_ring = cv2.dilate(label, np.ones((5, 5), np.uint8)).astype(bool)
        assert diff[~shadow_ring].max() == 0
        assert 0.002 < label.mean() < 0.3
    assert changed >= 5


def test_nuisance_change_is_present():
    pre, post, label = generate_pair(SyntheticSpec(image_size=128, seed=0), "train", 0)
    diff = np.abs(post.astype(int) - pre.astype(int)).sum(-1)
    assert (diff[label == 0] > 30).mean() > 0.2  # unlabelled change everywhere


def test_change_types_are_the_known_answer_and_readers_ignore_them(tmp_path):
    """change_type/ marks exactly the labelled pixels; a building that appears is drawn in the
    post image only, one that vanishes in the pre image only; the layout readers skip it."""
    from changecam.data.layout import find_triplets
    from changecam.data.synthetic import CHANGE_TYPE_DIR, CHANGE_TYPES, generate_scene

    spec = SyntheticSpec(image_size=128, seed=0, nuisance=False)
    seen = set()
    for n in range(8):
        s = generate_scene(spec, "train", n)
        np.testing.assert_array_equal(s.change_type > 0, s.label > 0)
        diff = np.abs(s.post.astype(int) - s.pre.astype(int)).sum(-1)
        for kind, value in CHANGE_TYPES.items():
            inside = s.change_type == value
            if inside.any():
                seen.add(kind)
                assert (diff[inside] > 0).mean() > 0.9, kind
    assert seen >= {"appeared", "vanished"}
    root = generate(tmp_path / "syn", SyntheticSpec(image_size=64, train=2, val=1, test=1))
    assert sorted(p.name for p in (root / "val").iterdir()) == ["A", "B", CHANGE_TYPE_DIR, "label"]
    triplets = find_triplets(root, "val")
    assert [t.label.parent.name for t in triplets] == ["label"]


def test_enough_vanished_buildings_in_val_and_test():
    """At least 30 % of the changed objects of the default val and test splits vanish."""
    import cv2

    from changecam.data.synthetic import CHANGE_TYPES, generate_scene

    spec = SyntheticSpec()
    kinds = []
    for split, count in (("val", spec.val), ("test", spec.test)):
        for n in range(count):
            s = generate_scene(spec, split, n)
            k, components = cv2.connectedComponents(s.label, connectivity=8)
            kinds += [np.bincount(s.change_type[components == c]).argmax() for c in range(1, k)]
    assert len(kinds) >= 60
    assert np.mean(np.array(kinds) == CHANGE_TYPES["vanished"]) >= 0.3


LEVIR = SyntheticSpec(style="levir")


def test_levir_style_is_deterministic_and_keeps_the_known_answer():
    from changecam.data.synthetic import CHANGE_TYPES, generate_scene

    a, b = generate_scene(LEVIR, "val", 2), generate_scene(LEVIR, "val", 2)
    assert all(
        np.array_equal(x, y) for x, y in zip(vars(a).values(), vars(b).values(), strict=True)
    )
    kinds = {"appeared": 0, "vanished": 0}
    for n in range(12):
        scene = generate_scene(SyntheticSpec(style="levir", nuisance=False), "val", n)
        assert np.array_equal(scene.label > 0, scene.change_type > 0)
        assert set(np.unique(scene.change_type)) <= {0, *CHANGE_TYPES.values()}
        diff = np.abs(scene.pre.astype(int) - scene.post.astype(int)).sum(-1)
        # without nuisance, only changed buildings and the moved sun's shadows differ
        if scene.label.any():
            assert diff[scene.label > 0].mean() > 5 * diff[scene.label == 0].mean()
        for kind in kinds:
            kinds[kind] += int((scene.change_type == CHANGE_TYPES[kind]).any())
    assert kinds["appeared"] >= 3 and kinds["vanished"] >= 3


def test_levir_style_follows_the_real_statistics():
    """Footprints are not axis-aligned rectangles, sizes and change fraction are LEVIR-CD's."""
    import cv2

    from changecam.data.synthetic import generate_scene

    fills, areas, fractions = [], [], []
    for n in range(12):
        scene = generate_scene(LEVIR, "train", n)
        fractions.append(scene.label.mean())
        count, _, stats, _ = cv2.connectedComponentsWithStats(scene.label, connectivity=8)
        for x, y, w, h, area in stats[1:]:
            if area >= 16 and x > 0 and y > 0 and x + w < 256 and y + h < 256:
                fills.append(area / (w * h))
                areas.append(area)
    # benchmarks/real_stats.json: 87 % not rectangular (fill < 0.9), median area 954 px on the
    # 1024² images, change fraction 6.3 % (the simple style: 0 %, 355 px, 2.7 %)
    assert np.mean(np.array(fills) < 0.9) > 0.6
    assert 500 < np.median(areas) < 1400
    assert 0.03 < np.mean(fractions) < 0.1
    simple = [generate_pair(SyntheticSpec(), "train", n)[2].mean() for n in range(12)]
    assert np.mean(fractions) > np.mean(simple)


def test_unknown_style_names_the_key():
    import pytest

    with pytest.raises(ValueError, match=r"data\.synthetic\.style='lever'"):
        SyntheticSpec(style="lever")


def test_levir_landcover_off_renders_version_3_exactly():
    """``landcover=False`` is the ablation: generator version 3's levir images, bit for bit
    (the digest was taken at version 3)."""
    import hashlib

    from changecam.data.synthetic import generate_scene

    scene = generate_scene(SyntheticSpec(style="levir", landcover=False), "val", 2)
    digest = hashlib.sha256()
    for array in (scene.pre, scene.post, scene.label, scene.change_type):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest()[:16] == "6e1194b4e56e98f0"


def test_levir_landcover_adds_unlabelled_change():
    """Building sites, streets and woodland change between the dates without a label: the
    labels still mark exactly the changed buildings (the known answer), and the pixels outside
    them differ more between the dates than without ``landcover``."""
    from changecam.data.synthetic import generate_scene

    on, off = [], []
    for n in range(8):
        for landcover, out in ((True, on), (False, off)):
            scene = generate_scene(SyntheticSpec(style="levir", landcover=landcover), "train", n)
            assert np.array_equal(scene.label > 0, scene.change_type > 0)
            diff = np.abs(scene.pre.astype(int) - scene.post.astype(int)).mean(-1)
            out.append(diff[scene.label == 0].mean())
    assert np.mean(on) > 1.1 * np.mean(off)


def test_levir_landcover_true_is_every_part_as_in_version_4():
    """``landcover=True`` and the list of all its parts render version 4's ``landcover=true``
    images bit for bit (the digest was taken at version 4)."""
    import hashlib

    from changecam.data.synthetic import LANDCOVER_PARTS, generate_scene

    for landcover in (True, list(LANDCOVER_PARTS)):
        scene = generate_scene(SyntheticSpec(style="levir", landcover=landcover), "val", 2)
        digest = hashlib.sha256()
        for array in (scene.pre, scene.post, scene.label, scene.change_type):
            digest.update(np.ascontiguousarray(array).tobytes())
        assert digest.hexdigest()[:16] == "f9077aa934f39336"


def test_levir_landcover_parts_are_left_out_exactly():
    """With only ``plots`` on, the pre date's bare soil is the dilated plots of the buildings
    that appear and nothing else: no soil in the post date, no woodland, no felled trees."""
    import cv2

    from changecam.data.levir_style import _land_cover

    size = 128
    free = np.ones((size, size), dtype=bool)
    road = np.zeros_like(free)
    road[60:70] = True
    free &= ~road
    appeared = [np.zeros_like(free) for _ in range(3)]
    appeared[0][10:20, 10:30] = True
    appeared[1][90:110, 40:52] = True
    appeared[2][20:30, 90:100] = True
    around = cv2.dilate(
        np.any(appeared, axis=0).astype(np.uint8), np.ones((13, 13), np.uint8)
    ).astype(bool)
    plotted = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        every = _land_cover(np.random.default_rng(seed), size, free, road, appeared, road & False)
        cover = _land_cover(rng, size, free, road, appeared, road & False, {"plots"})
        assert not cover.soil["post"].any() and not cover.forest.any() and not cover.felled.any()
        assert not (cover.soil["pre"] & ~around).any()  # only the plots
        assert not (cover.soil["pre"] & road).any()
        assert not (cover.soil["pre"] & ~every.soil["pre"]).any()  # the same draws
        assert (cover.soil_colour == every.soil_colour).all()
        plotted += int(cover.soil["pre"].any())
    assert plotted >= 3  # each appeared building's plot is bare with probability 0.6


def test_landcover_parts_are_checked_and_recorded(tmp_path):
    """Unknown parts name the key; a list of parts (as Hydra passes it) is recorded so that an
    unchanged set is not generated again."""
    import pytest

    with pytest.raises(ValueError, match=r"data\.synthetic\.landcover=.*'lawns'"):
        SyntheticSpec(style="levir", landcover=["woodland", "lawns"])
    spec = SyntheticSpec(image_size=64, train=1, val=1, test=1, style="levir", landcover=["plots"])
    assert spec.landcover == ("plots",) and spec.landcover_parts == ("plots",)
    assert SyntheticSpec(style="levir", landcover=False).landcover_parts == ()
    assert SyntheticSpec(style="levir", landcover="soil").landcover == ("soil",)  # landcover=soil
    root = generate(tmp_path / "syn", spec)
    assert json.loads((root / SPEC_FILE).read_text())["landcover"] == ["plots"]
    stamp = (root / "train/A/train_1.png").stat().st_mtime_ns
    generate(root, SyntheticSpec(**{**spec.__dict__, "landcover": ["plots"]}))
    assert (root / "train/A/train_1.png").stat().st_mtime_ns == stamp  # skipped


def test_a_set_the_generator_draws_alike_is_kept_and_real_differences_are_named(tmp_path):
    """The generator reads landcover as a set of parts: another order, ``true`` for every part
    or ``[]`` for none drew the same images, yet the set was deleted and written again with a
    warning of other settings (helper-117); a setting an older record lacks is named so."""
    from changecam.data.synthetic import LANDCOVER_PARTS, other_settings

    base = {"image_size": 32, "train": 1, "val": 1, "test": 1, "style": "levir"}
    spec = SyntheticSpec(**base, landcover=["woodland", "road"])
    root = generate(tmp_path / "syn", spec)
    stamp = (root / SPEC_FILE).stat().st_mtime_ns
    alike = SyntheticSpec(**base, landcover=["road", "woodland"])
    assert other_settings(root, alike) == []
    generate(root, alike)
    assert (root / SPEC_FILE).stat().st_mtime_ns == stamp  # kept
    every = generate(tmp_path / "every", SyntheticSpec(**base, landcover=True))
    assert other_settings(every, SyntheticSpec(**base, landcover=list(LANDCOVER_PARTS))) == []
    none = generate(tmp_path / "none", SyntheticSpec(**base, landcover=False))
    assert other_settings(none, SyntheticSpec(**base, landcover=[])) == []
    bigger = SyntheticSpec(**{**base, "image_size": 64}, landcover=["road", "woodland"])
    assert other_settings(root, bigger) == ["image_size: 32 (asked: 64)"]
    record = json.loads((root / SPEC_FILE).read_text())
    del record["style"]
    (root / SPEC_FILE).write_text(json.dumps(record))  # as an older generator wrote it
    assert other_settings(root, spec) == ["style: not recorded (asked: 'levir')"]


def test_landcover_parts_from_the_command_line(tmp_path):
    """``data.synthetic.landcover=[woodland,plots]`` reaches the generator as those parts."""
    import hydra

    from helpers import compose_train

    cfg = compose_train(
        tmp_path, ["data.synthetic.style=levir", "data.synthetic.landcover=[woodland,plots]"]
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.synthetic.landcover_parts == ("woodland", "plots")


def test_a_set_another_process_writes_meanwhile_is_taken(tmp_path, monkeypatch):
    """Two jobs of a sweep (or two DDP ranks) generating one set at once: each writes its own
    temporary folder, the first moves it into place, the second takes it."""
    import changecam.data.synthetic as synthetic

    root, spec = tmp_path / "synthetic", SyntheticSpec(image_size=32, train=1, val=1, test=1)
    real, calls = synthetic.generate_scene, []

    def another_process_finishes_first(*args, **kwargs):
        if not calls:
            calls.append(1)
            assert generate(root, spec) == root  # the other process, start to end
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_scene", another_process_finishes_first)
    assert generate(root, spec) == root
    assert json.loads((root / SPEC_FILE).read_text())["image_size"] == 32
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"], "no temporary folder left"
    assert len(find_triplets(root, "train", "levir")) == 1


def test_a_killed_writers_temporary_folder_is_removed(tmp_path):
    from changecam.atomic import _HOST, atomic_directory

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = gone.pid
    stale = tmp_path / f".synthetic.cc{dead}-{_HOST}abcdef.tmp"
    (stale / "train").mkdir(parents=True)
    live = tmp_path / f".synthetic.cc{os.getpid()}-{_HOST}abcdef.tmp"
    live.mkdir()
    with atomic_directory(tmp_path / "synthetic") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "synthetic"]


def test_a_kill_while_an_older_set_is_removed_leaves_no_part_of_it(tmp_path, monkeypatch):
    """A new spec replaces an older set: killed while the older set is removed, the next run
    used to find some of its images and no spec, and refused every spec (helper-74). The
    older set is moved aside first, so root is free, and the next run removes what is left."""
    import shutil

    import changecam.data.synthetic as synthetic

    root = tmp_path / "synthetic"
    generate(root, SyntheticSpec(image_size=32, train=2, val=1, test=1))
    real = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        (next(Path(path).rglob("*.png"))).unlink()  # some of it gone, then the kill
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(synthetic.shutil, "rmtree", killed_midway)
    new = SyntheticSpec(image_size=32, train=1, val=1, test=1, seed=3)
    try:
        generate(root, new)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(synthetic.shutil, "rmtree", real)
    assert not root.exists() or not any(root.iterdir()), "no part of the older set at root"
    assert generate(root, new) == root
    assert json.loads((root / SPEC_FILE).read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"], "the moved-aside set is gone"


def test_a_symlinked_root_gets_the_set_in_the_folder_it_names(tmp_path):
    """data.root linked to an empty folder on another disk (helper-74: refused)."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "data").symlink_to(target)
    spec = SyntheticSpec(image_size=32, train=1, val=1, test=1)
    generate(tmp_path / "data", spec)
    assert json.loads((target / SPEC_FILE).read_text())["train"] == 1
    assert (tmp_path / "data").is_symlink()
    generate(tmp_path / "data", SyntheticSpec(image_size=32, train=2, val=1, test=1))
    assert len(find_triplets(tmp_path / "data", "train", "levir")) == 2


def test_an_image_side_the_style_cannot_draw_is_refused_naming_the_key():
    """The simple style's buildings need 19 px: below, numpy's `low >= high` named nothing."""
    generate_pair(SyntheticSpec(image_size=19), "train", 0)
    with pytest.raises(
        ValueError, match=r"data.synthetic.image_size=18 is too small for style=simple: at least 19"
    ):
        SyntheticSpec(image_size=18)
    generate_pair(SyntheticSpec(image_size=8, style="levir"), "train", 0)
    with pytest.raises(
        ValueError, match=r"data.synthetic.image_size=0 is too small for style=levir"
    ):
        SyntheticSpec(image_size=0, style="levir")


def test_levir_style_options_on_the_simple_style_are_refused():
    """shapes, colours and landcover changed nothing in the simple style (the default), and
    a README recipe without its ``style=levir`` trained on the plain set unawares (helper-96)."""
    for options, named in (
        ({"landcover": ["soil"]}, r"data.synthetic.landcover=\('soil',\)"),
        ({"landcover": True}, "data.synthetic.landcover=True"),
        ({"shapes": "rectangles", "colours": "simple"}, "shapes='rectangles', .*colours"),
    ):
        with pytest.raises(ValueError, match=f"{named}.*add data.synthetic.style=levir"):
            SyntheticSpec(**options)
        SyntheticSpec(style="levir", **options)
    SyntheticSpec(landcover=[])  # no part: as off


def test_a_simple_set_too_large_for_labelled_change_is_refused(tmp_path):
    """From about 640 px a side the simple style's unchanged buildings, placed first, fill the
    image: no scene at 768 or 1024 px had labelled change, and such a set trained on nothing
    silently (helper-106). Refused above 512 px (where every scene checked has change) where
    a set is trained or scored on; the loader and memory benchmarks still draw 1024 px sets."""
    assert all(generate_scene(SyntheticSpec(image_size=768), "train", i).label.max() == 0
               for i in range(2))  # fmt: skip
    from changecam.data.datamodule import ChangeDetectionDataModule

    large = {"image_size": 768, "train": 1, "val": 1, "test": 1}
    with pytest.raises(ValueError, match="image_size=768: the simple style draws no labelled"):
        ChangeDetectionDataModule(tmp_path / "syn", synthetic=large)
    assert not (tmp_path / "syn").exists()
    ChangeDetectionDataModule(tmp_path / "syn", synthetic={**large, "style": "levir"})
    spec = SyntheticSpec(image_size=512, train=2)
    assert all(generate_scene(spec, "train", i).label.max() == 1 for i in range(2))


@pytest.mark.parametrize(("style", "size", "smallest"), [("levir", 32, 56), ("simple", 20, 24)])
def test_a_set_too_small_for_labelled_change_is_refused(tmp_path, style, size, smallest):
    """A levir set at 32 px had not one labelled pixel in its 72 scenes, and trained on empty
    labels unwarned (helper-186)."""
    from changecam.data.datamodule import ChangeDetectionDataModule

    small = {"image_size": size, "train": 1, "val": 1, "test": 1, "style": style}
    assert not any(generate_scene(SyntheticSpec(**small), "train", i).label.any() for i in range(3))
    with pytest.raises(ValueError, match=f"image_size={size}: the {style} style draws almost no"):
        ChangeDetectionDataModule(tmp_path / "syn", synthetic=small)
    assert not (tmp_path / "syn").exists()
    ChangeDetectionDataModule(tmp_path / "syn", synthetic={**small, "image_size": smallest})


def test_a_negative_seed_and_landcover_null_or_a_number(tmp_path):
    """A negative seed failed in numpy naming no key; landcover=null or a number with
    "'NoneType' object is not iterable" (helper-186)."""
    with pytest.raises(ValueError, match=r"data.synthetic.seed=-1 must be a whole number >= 0"):
        SyntheticSpec(seed=-1)
    assert SyntheticSpec(style="levir", landcover=None).landcover is False
    with pytest.raises(ValueError, match=r"data.synthetic.landcover=1: choose parts from woodland"):
        SyntheticSpec(style="levir", landcover=1)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_negative_split_count_is_refused_naming_the_key(split):
    """A negative count was written into the spec, and set-up then said to download LEVIR-CD
    (helper-118)."""
    with pytest.raises(ValueError, match=rf"data.synthetic.{split}=-3 must be a whole number"):
        SyntheticSpec(**{split: -3})
    assert getattr(SyntheticSpec(**{split: 0}), split) == 0  # a split none is written for


def test_real_stats_refuses_an_empty_synthetic_set_before_any_work():
    """scripts/real_stats.py --synthetic-256 0 failed on an empty minimum after the real
    sets' statistics were computed (helper-146)."""
    from helpers import script_module

    module = script_module("real_stats")
    module.set_statistics = lambda pairs: pytest.fail("statistics computed before the refusal")
    for flag in ("--synthetic-256", "--synthetic-1024"):
        with pytest.raises(SystemExit):
            module.main([flag, "0"])

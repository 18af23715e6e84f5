"""Scene pairs changecam.geo refuses: each with a clear error and no file that looks finished."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.crs
import torch
from affine import Affine
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from shapely.geometry import shape

import changecam.geo.bands
import changecam.geo.scene
from changecam.cli.scenes import SceneFailure
from changecam.geo import SceneError, SceneSettings, predict_scene
from changecam.geo.grid import Grid
from changecam.geo.polygons import area_problem, areal_scales
from changecam.geo.scene import LOG_FILE, BlockLog, SceneNetwork, with_ignored_bounds
from changecam.geo.write import SETTINGS_TAG, SceneFiles
from changecam.models import SiameseUNet
from changecam.models.sliding_window import SlidingWindow
from geo_scenes import (
    CRS,
    ORIGIN,
    PIXEL,
    TRANSFORM,
    finished_looking,
    garble_first_tile,
    read_band,
    run_scene,
    synthetic_pair,
    write_scene,
)
from test_checkpoint import make_lightning_checkpoint

SPEC = SlidingWindow(window=32, batch_size=8)
SETTINGS = SceneSettings(block_size=64, progress=False)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return SiameseUNet(base_channels=4, depth=2).eval()


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_pair(64)


def refused(net, tmp_path: Path, pre: Path, post: Path, match: str, **settings) -> None:
    out = tmp_path / "out"
    with pytest.raises(SceneError, match=match):
        predict_scene(net, pre, post, out, SPEC, SceneSettings(**{**vars(SETTINGS), **settings}))
    assert finished_looking(out) == []


def test_strict_refuses_another_crs_naming_both_grids(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1], crs="EPSG:32651")
    refused(
        net,
        tmp_path,
        pre,
        post,
        r"input.align=strict: .*pre.tif: EPSG:32650, 64x64 px, origin \(399872, 3510144\), pixel "
        r"\(0.5, -0.5\); .*post.tif: EPSG:32651",
        align="strict",
    )


def test_strict_shows_grids_a_micrometre_apart_as_different(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    shifted = Affine(PIXEL, 0, ORIGIN[0] + 1e-6, 0, -PIXEL, ORIGIN[1])
    post = write_scene(tmp_path / "post.tif", images[1], transform=shifted)
    refused(net, tmp_path, pre, post, r"origin \(399872.000001, 3510144\)", align="strict")
    # 4 float steps apart: still told apart in the message
    close = Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1] + 3.7e-9)
    post = write_scene(tmp_path / "post.tif", images[1], transform=close)
    refused(net, tmp_path, pre, post, r"origin \(399872, 3510144.0000000037\)", align="strict")


def test_scenes_without_overlap_are_refused(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    far = from_origin(ORIGIN[0] + 1000, ORIGIN[1], PIXEL, PIXEL)
    post = write_scene(tmp_path / "post.tif", images[1], transform=far)
    refused(net, tmp_path, pre, post, "the scenes do not overlap: .*pre.tif covers")
    # the same footprint told in the next UTM zone: no overlap either, found in the pre CRS
    from rasterio.warp import transform as transform_points

    (x,), (y,) = transform_points("EPSG:32650", "EPSG:32651", [ORIGIN[0] + 1000], [ORIGIN[1]])
    other_zone = write_scene(
        tmp_path / "post51.tif",
        images[1],
        transform=from_origin(x, y, PIXEL, PIXEL),
        crs="EPSG:32651",
    )
    refused(net, tmp_path, pre, other_zone, r"the scenes do not overlap: .*in the pre scene's CRS")
    near = transform_points("EPSG:32650", "EPSG:32651", [ORIGIN[0] + 10], [ORIGIN[1]])
    overlapping = write_scene(
        tmp_path / "near51.tif",
        images[1],
        transform=from_origin(near[0][0], near[1][0], PIXEL, PIXEL),
        crs="EPSG:32651",
    )
    summary = predict_scene(net, pre, overlapping, tmp_path / "near", SPEC, SETTINGS)
    assert summary["post_reprojected"] is True  # a control: 10 m apart, it does overlap


@pytest.mark.parametrize("case", ["across the antimeridian", "the whole globe"])
def test_scenes_that_overlap_in_another_crs_are_read(tmp_path, case):
    """Footprints that meet, though the post's taken into the pre CRS does not look so: a UTM
    60S post across the 180th meridian beside a pre in degrees (its box comes back with left
    beyond right), and a whole-globe post in degrees around a UTM pre (the globe in UTM 50N
    starts at the zone's central meridian, east of the pre). helper-65's cases."""
    from rasterio.warp import transform as transform_points

    from changecam.geo.grid import open_pair, warped

    rng = np.random.default_rng(15)
    if case == "across the antimeridian":  # Fiji: pre lon 179.50..179.99
        pre = write_scene(
            tmp_path / "pre.tif",
            rng.integers(0, 255, (60, 98, 3), dtype=np.uint8),
            transform=from_origin(179.50, -16.60, 0.005, 0.005),
            crs="EPSG:4326",
        )
        (x,), (y,) = transform_points("EPSG:4326", "EPSG:32760", [180.0], [-16.75])
        post_grid = {"transform": from_origin(x - 32000, y + 32000, 800, 800), "crs": "EPSG:32760"}
        post_shape = (80, 80, 3)
    else:
        pre = write_scene(tmp_path / "pre.tif", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        post_grid = {"transform": from_origin(-180, 90, 1, 1), "crs": "EPSG:4326"}
        post_shape = (180, 360, 3)
    post = write_scene(
        tmp_path / "post.tif", rng.integers(0, 255, post_shape, dtype=np.uint8), **post_grid
    )
    with open_pair(pre, post) as pair:
        assert pair.reprojected
        with warped(pair.post_source, pair.grid, Resampling.bilinear) as vrt:
            assert (vrt.read(vrt.count) > 0).sum() > 0, "the warp reads post pixels there"


@pytest.mark.parametrize("where", ["a valid pixel", "a nodata pixel"])
def test_logits_that_are_not_finite_refuse_the_scene(net, images, tmp_path, monkeypatch, where):
    """A NaN logit (weights that overflow) would be written as no change: at a valid pixel the
    scene is refused, naming the block, and nothing looks finished; at a nodata pixel, which is
    written as nodata whatever the network says, it is not."""
    from changecam.geo.scene import SceneNetwork

    pre_image = images[0].copy()
    if where == "a nodata pixel":
        pre_image[:16, :16] = 0
    pre = write_scene(
        tmp_path / "pre.tif", pre_image, nodata=0 if where != "a valid pixel" else None
    )
    post = write_scene(tmp_path / "post.tif", images[1])
    real, calls = SceneNetwork.windows, []

    def overflowing(self, *args):
        out = real(self, *args)
        if not calls:
            out[0, 0, 5, 5] = float("nan")  # the first window, at the scene's origin
        calls.append(1)
        return out

    monkeypatch.setattr(SceneNetwork, "windows", overflowing)
    out = tmp_path / "out"
    if where == "a valid pixel":
        with pytest.raises(SceneError, match=r"block 0 \(rows 0-63, columns 0-63\) refused: 1 of"):
            predict_scene(net, pre, post, out, SPEC, SETTINGS)
        assert finished_looking(out) == []
    else:
        predict_scene(net, pre, post, out, SPEC, SETTINGS)
        assert read_band(out / "change.tif")[5, 5] == 255


def test_a_crs_on_one_side_only_is_refused(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1], crs=None)
    refused(net, tmp_path, pre, post, "post.tif has no CRS but .*pre.tif has one \\(EPSG:32650\\)")


def test_band_index_out_of_range(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    refused(
        net,
        tmp_path,
        pre,
        post,
        r"band 4 is out of range for .*pre.tif, which has 3 band",
        bands=(3, 2, 4),
    )


def test_different_band_counts_need_bands(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    four = np.concatenate([images[1], images[1][..., :1]], axis=2)
    post = write_scene(tmp_path / "post.tif", four)
    refused(net, tmp_path, pre, post, r"pre.tif has 3 bands but .*post.tif has 4: .*input.bands=")
    refused(net, tmp_path, post, post, r"the network takes 3 bands but 4 are selected")
    # 16-bit bands not labelled red, green, blue: the blue-green-red-NIR example
    bgrn = write_scene(tmp_path / "bgrn.tif", four.astype(np.uint16))
    refused(
        net,
        tmp_path,
        bgrn,
        bgrn,
        r"indexes \(e.g. input.bands=\[3,2,1\]: red, green, blue of a blue-green-red-NIR file\)$",
    )


def test_complex_values_are_refused_not_cast_to_their_real_part(net, images, tmp_path):
    """SAR-style complex64 (amplitude x random phase): its real part is not the image."""
    phase = np.random.default_rng(0).uniform(0, 2 * np.pi, images[1].shape)
    post = write_scene(tmp_path / "post.tif", (images[1] * np.exp(1j * phase)).astype(np.complex64))
    pre = write_scene(tmp_path / "pre.tif", images[0].astype(np.float32))
    for scale in ("percentile", "none"):
        refused(
            net, tmp_path, pre, post, r"post.tif holds complex values \(complex64\)", scale=scale
        )


def test_the_band_hint_fits_files_of_fewer_than_three_bands(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0][..., :1])
    post = write_scene(tmp_path / "post.tif", images[1][..., :1])
    refused(
        net,
        tmp_path,
        pre,
        post,
        r"the network takes 3 bands but 1 are selected .*\(.*pre.tif has 1 band\(s\); a grey "
        r"scene repeats its band, e.g. input.bands=\[1,1,1\] for three\)$",
    )


def test_a_paletted_scene_is_refused_not_read_as_colour_indexes(net, images, tmp_path):
    """A colour table's indexes are not an image: the network would see them as grey levels."""
    pre = write_scene(tmp_path / "pre.tif", images[0][..., :1], photometric="palette")
    with rasterio.open(pre, "r+") as dst:
        dst.write_colormap(1, {i: (i, 255 - i, i // 2, 255) for i in range(256)})
    post = write_scene(tmp_path / "post.tif", images[1][..., :1])
    refused(
        net,
        tmp_path,
        pre,
        post,
        rf"band 1 of .*pre.tif is paletted: .* gdal_translate -of VRT -expand rgb {pre} "
        rf"{pre.with_name('pre_rgb.vrt')} ",
        bands=[1, 1, 1],
    )


def test_a_crs_without_a_geotransform_is_refused(net, images, tmp_path, caplog):
    """A CRS alone would label (column, row) coordinates as eastings and northings."""
    pre = write_scene(tmp_path / "pre.tif", images[0], transform=None)
    post = write_scene(tmp_path / "post.tif", images[1], transform=None)
    refused(
        net,
        tmp_path,
        pre,
        post,
        r"pre.tif has a CRS \(EPSG:32650\) but no geotransform.*gdal_edit -a_ullr <ulx> <uly> "
        rf"<lrx> <lry> {pre}, .*gdal_edit -a_srs None {pre}\) to predict",
    )
    # neither a CRS nor a geotransform: predicted pixel for pixel, and the log says so
    pre = write_scene(tmp_path / "pre.tif", images[0], transform=None, crs=None)
    post = write_scene(tmp_path / "post.tif", images[1], transform=None, crs=None)
    with caplog.at_level("WARNING", logger="changecam"):
        predict_scene(net, pre, post, tmp_path / "plain", SPEC, SETTINGS)
    assert "pre.tif is not georeferenced: the pair is read pixel for pixel" in caplog.text


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("bands", [1.9, 2, 3]),  # was read as band 1
        ("bands", 3),
        ("bands", "3,2,1"),
        ("bands", [True, 2, 3]),
        ("scale_min", "abc"),
        ("scale_max", [0, "255"]),
    ],
)
def test_settings_of_the_wrong_type_are_refused_naming_the_key(setting, value):
    with pytest.raises(SceneError, match=rf"^input.{setting}=.* must be a"):
        SceneSettings(**{setting: value})


@pytest.mark.parametrize("switch", ["polygons", "overviews", "progress"])
def test_switches_given_as_text_are_refused(switch):
    """``predict.progress="false"`` (text) would have shown the bar."""
    with pytest.raises(SceneError, match=rf"^predict.{switch}='false' must be true or false"):
        SceneSettings(**{switch: "false"})


@pytest.mark.parametrize(
    ("bounds", "match"),
    [
        ({}, "input.scale=fixed needs input.scale_min"),
        ({"scale_min": 5, "scale_max": 1}, r"must exceed input.scale_min \(selected band 1\)"),
        ({"scale_min": [0, 9], "scale_max": 5}, r"must exceed input.scale_min \(selected band 2\)"),
        ({"scale_min": float("nan"), "scale_max": 5}, "must be finite numbers"),
        ({"scale_min": 0, "scale_max": float("inf")}, "must be finite numbers"),
    ],
)
def test_fixed_bounds_that_need_no_file_are_judged_with_the_settings(bounds, match):
    with pytest.raises(SceneError, match=match):
        SceneSettings(scale="fixed", **bounds)


@pytest.mark.parametrize("scale", ["percentile", "percentile_joint", "none"])
def test_fixed_bounds_without_scale_fixed_are_refused(scale):
    """``input.scale_min=0 input.scale_max=3000`` without ``input.scale=fixed`` was ignored
    for the default per-date stretch, which called 11,693 unchanged pixels change (helper-123)."""
    with pytest.raises(
        SceneError,
        match=rf"^input.scale_max are read only with input.scale=fixed, and input.scale={scale} here",
    ):
        SceneSettings(scale=scale, scale_max=3000)
    with pytest.raises(SceneError, match="^input.scale_min and input.scale_max are read only"):
        SceneSettings(scale=scale, scale_min=0, scale_max=3000)


def test_a_scene_logged_with_ignored_bounds_resumes_without_them(net, tmp_path):
    """A run made before the bounds were refused logged ``input.scale_min/scale_max`` it
    ignored under ``percentile``: its resume, now without them (they are refused), was refused
    as started with other settings (helper-130); it goes on from the logged blocks."""
    pair = synthetic_pair(128)
    pre = write_scene(tmp_path / "pre.tif", pair[0])
    post = write_scene(tmp_path / "post.tif", pair[1])
    out = tmp_path / "out"
    real_resumable, real_write = SceneSettings.resumable, SceneFiles.write_block
    calls = []

    def logged_with_bounds(self):
        return {**real_resumable(self), "scale_min": 0.0, "scale_max": 3000.0}

    def dies_after_two(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real_write(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SceneSettings, "resumable", logged_with_bounds)
        patch.setattr(SceneFiles, "write_block", dies_after_two)
        with pytest.raises(KeyboardInterrupt):
            predict_scene(net, pre, post, out, SPEC, SETTINGS)
    resumed = predict_scene(net, pre, post, out, SPEC, SETTINGS, resume=True)
    assert resumed["resumed_blocks"] == 2
    fresh = predict_scene(net, pre, post, tmp_path / "fresh", SPEC, SETTINGS)
    assert resumed["changed_pixels"] == fresh["changed_pixels"]
    np.testing.assert_array_equal(
        read_band(out / "change.tif"), read_band(tmp_path / "fresh" / "change.tif")
    )
    other = SceneSettings(**{**vars(SETTINGS), "scale": "percentile_joint"})
    assert (
        with_ignored_bounds({"scene": other.resumable()}, {"scene": logged_with_bounds(SETTINGS)})[
            "scene"
        ]["scale_min"]
        is None
    ), "another scale is another run"


def test_fixed_bounds_of_other_lengths_are_left_to_the_bands():
    """A one-value list is not stretched over the bands here: the band count refuses it."""
    assert SceneSettings(scale="fixed", scale_min=[1, 2], scale_max=[0]).scale_max == (0.0,)
    assert SceneSettings(scale="fixed", scale_min=[0, 100], scale_max=[100, 200]).scale_min == (
        0.0,
        100.0,
    )


def test_an_explanation_method_is_judged_only_when_explained():
    with pytest.raises(SceneError, match="explain.method='gradcam': a scene is explained with"):
        SceneSettings(explain_method="gradcam")
    assert SceneSettings(explain=False, explain_method="gradcam").resumable() == (
        SceneSettings(explain=False).resumable()
    )


def test_settings_of_the_right_type_are_kept_as_plain_numbers():
    from omegaconf import OmegaConf

    listed = OmegaConf.create({"bands": [3, 2, 1]}).bands
    for bands in ([3, np.int64(2), 1], listed, np.array([3, 2, 1])):
        settings = SceneSettings(
            bands=bands, scale="fixed", scale_min=[0, 1.5, 2], scale_max=np.uint16(255)
        )
        assert settings.bands == (3, 2, 1) and all(type(b) is int for b in settings.bands)
        assert settings.scale_min == (0.0, 1.5, 2.0) and settings.scale_max == 255.0
        assert type(settings.scale_max) is float
    # a NumPy batch size reached SlidingWindow, which takes plain ints (helper-113)
    settings = SceneSettings(block_size=np.int64(64), batch_size=np.int64(2))
    assert type(settings.block_size) is int and type(settings.batch_size) is int


def test_a_band_refusal_suggests_the_labelled_colours_and_names_the_alpha_band(
    net, images, tmp_path
):
    """An RGB pre and an RGBA post: [3,2,1] would swap red and blue, so the example is the
    files' own red, green and blue, and band 4 is named as the post's alpha."""
    pre = write_scene(tmp_path / "pre.tif", images[0], photometric="RGB")
    alpha = np.full((64, 64, 1), 255, np.uint8)
    post = write_scene(
        tmp_path / "post.tif",
        np.concatenate([images[1], alpha], axis=2),
        photometric="RGB",
        alpha="YES",
    )
    with rasterio.open(post) as src:
        assert src.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    refused(
        net,
        tmp_path,
        pre,
        post,
        r"pre.tif has 3 bands but .*post.tif has 4: .*input.bands=\[1,2,3\]: their red, green "
        r"and blue; band 4 of .*post.tif is its alpha",
    )


def test_corrupt_and_truncated_tiffs(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    refused(net, tmp_path, pre, garbage, r"garbage.tif cannot be read as a GeoTIFF")
    whole = write_scene(tmp_path / "whole.tif", images[1], compress="deflate")
    cut = tmp_path / "cut.tif"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    refused(net, tmp_path, pre, cut, r"cut.tif is truncated .*tile \(\d+, \d+\) ends at byte")


def test_a_scene_whose_name_is_not_utf8_is_refused_naming_it(net, images, tmp_path):
    """GDAL takes UTF-8 paths only: a Latin-1 file name raised a UnicodeEncodeError no run
    caught, which stopped a folder's other scenes too (helper-148)."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1]).rename(
        tmp_path / os.fsdecode(b"caf\xe9.tif")
    )
    refused(
        net,
        tmp_path,
        pre,
        post,
        r"'.*caf\\udce9.tif' cannot be opened: its path is not valid UTF-8",
    )


def test_a_tiff_cut_in_its_mask_directory_is_named_as_it_is_opened(net, images, tmp_path):
    """Every image tile whole, the internal mask's directory cut off: GDAL opens the file and
    failed only when it read the mask, with an error no run caught (helper-71)."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = tmp_path / "post.tif"
    height, width = images[1].shape[:2]
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8"}
    profile.update(crs=CRS, transform=TRANSFORM, tiled=True, blockxsize=32, blockysize=32)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(post, "w", **profile) as dst:
        dst.write(images[1].transpose(2, 0, 1))
        valid = np.full((height, width), 255, np.uint8)
        valid[:, :16] = 0
        dst.write_mask(valid)
    with rasterio.open(post) as src:
        ends = [
            int(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1))
            + int(src.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1))
            for r in range(height // 32)
            for c in range(width // 32)
        ]
    post.write_bytes(post.read_bytes()[: max(ends)])
    refused(net, tmp_path, pre, post, r"post.tif.*(truncated|cut short)")


def test_a_tile_corrupt_inside_the_file_is_named_when_decoded(net, images, tmp_path):
    """Same length, garbage inside one compressed tile: found by the block that reads it."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1], compress="deflate")
    with rasterio.open(post) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        length = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    data = bytearray(post.read_bytes())
    data[offset : offset + length] = np.random.default_rng(1).bytes(length)
    post.write_bytes(bytes(data))
    with pytest.raises(SceneError) as caught:
        predict_scene(net, pre, post, tmp_path / "out", SPEC, SETTINGS)
    message = str(caught.value)
    assert re.search(r"post.tif cannot be decoded at rows \d+-\d+, columns \d+-\d+", message)
    assert "pre.tif" not in message, "only the corrupt file is named"
    assert "ZIPDecode" in message, "GDAL's own message, not only rasterio's 'Read failed'"
    assert finished_looking(tmp_path / "out") == []


def test_an_all_nodata_scene(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", np.zeros_like(images[0]), nodata=0)
    post = write_scene(tmp_path / "post.tif", images[1])
    refused(net, tmp_path, pre, post, r"pre.tif is all nodata")


def test_nodata_where_the_dates_overlap_is_refused(net, images, tmp_path):
    pre_image, post_image = images[0].copy(), images[1].copy()
    pre_image[:, 32:] = 0
    post_image[:, :32] = 0
    pre = write_scene(tmp_path / "pre.tif", pre_image, nodata=0)
    post = write_scene(tmp_path / "post.tif", post_image, nodata=0)
    refused(net, tmp_path, pre, post, r"no pixel of .*pre.tif is valid in both dates")
    assert not any((tmp_path / "out").iterdir()), "the partial files go too"


def test_the_command_lists_the_refused_scene_in_its_report_and_nothing_else(
    tmp_path, images, tiny_synthetic
):
    """The report lists the refused scene under ``failed`` and no scene (helper-134: no report
    was written when every scene failed); no scene output is left."""
    ckpt = make_lightning_checkpoint(tmp_path / "ckpt" / "best.ckpt", tiny_synthetic, steps=1)
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1], crs="EPSG:32651")
    with pytest.raises(
        SceneFailure, match=r"1 of 1 scene\(s\) refused, with no output from this run \(pre\)"
    ):
        run_scene(tmp_path, ckpt, pre, post, "input.align=strict")
    assert finished_looking(tmp_path / "run") == ["predictions.json"]
    report = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert report["scenes"] == [] and [f["name"] for f in report["failed"]] == ["pre"]
    with rasterio.open(pre) as src:  # the inputs are untouched
        assert src.crs.to_epsg() == 32650


def test_a_scene_georeferenced_by_control_points_only_is_refused(net, images, tmp_path):
    from rasterio.control import GroundControlPoint

    pre = write_scene(tmp_path / "pre.tif", images[0])
    gcps = tmp_path / "gcps.tif"
    with rasterio.open(
        gcps, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8"
    ) as dst:
        dst.write(images[1].transpose(2, 0, 1))
        x, y = ORIGIN
        points = [
            GroundControlPoint(row, col, x + col * PIXEL, y - row * PIXEL)
            for row, col in ((0, 0), (0, 64), (64, 0), (64, 64))
        ]
        dst.gcps = (points, rasterio.crs.CRS.from_epsg(32650))
    refused(net, tmp_path, pre, gcps, r"gcps.tif is georeferenced by ground control points only")
    refused(net, tmp_path, gcps, gcps, r"gcps.tif is georeferenced by ground control points only")


def test_an_rgba_post_scene_is_reprojected_with_its_own_alpha(net, images, tmp_path):
    """The warp keeps the alpha band the post scene has (adding another one fails in GDAL):
    its transparent pixels and those outside its footprint are nodata."""
    alpha = np.full((64, 64, 1), 255, np.uint8)
    alpha[:16, :16] = 0

    def rgba(path: Path, image: np.ndarray, **kw) -> Path:
        return write_scene(
            path, np.concatenate([image, alpha], axis=2), photometric="RGB", alpha="YES", **kw
        )

    pre = write_scene(tmp_path / "pre.tif", images[0])
    shifted = from_origin(ORIGIN[0] + 4 * PIXEL, ORIGIN[1], PIXEL, PIXEL)  # 4 px to the east
    post = rgba(tmp_path / "post.tif", images[1], transform=shifted)
    settings = SceneSettings(**{**vars(SETTINGS), "bands": (1, 2, 3), "threshold": 0.0})
    summary = predict_scene(net, pre, post, tmp_path / "out", SPEC, settings)
    assert summary["post_reprojected"] is True
    with rasterio.open(tmp_path / "out" / "change.tif") as src:
        change = src.read(1)
    expected = np.zeros((64, 64), bool)
    expected[:, :4] = True  # west of the post footprint
    expected[:16, 4:20] = True  # the post scene's transparent corner, 4 px east
    assert ((change == 255) == expected).all()


@pytest.mark.parametrize("scale", ["percentile", "fixed"])
def test_nan_pixels_of_a_float_scene_are_nodata_without_a_declared_value(
    net, images, tmp_path, scale
):
    """NaN (or an infinity) in a float band is nodata even when the file declares none: it
    neither blanks the percentile stretch nor becomes change."""
    reflectance = images[0].astype(np.float32) * 10 + 1000
    reflectance[5, 7] = np.nan
    reflectance[40:42, 50, 1] = np.inf
    pre = write_scene(tmp_path / "pre.tif", reflectance)
    post = write_scene(tmp_path / "post.tif", images[1].astype(np.float32) * 10 + 1000)
    fixed = {"scale_min": 1000.0, "scale_max": 3550.0} if scale == "fixed" else {}
    settings = SceneSettings(**{**vars(SETTINGS), "scale": scale, "threshold": 0.0, **fixed})
    summary = predict_scene(net, pre, post, tmp_path / "out", SPEC, settings)
    assert all(np.isfinite(summary["scaling"]["pre"]["lo"]))
    with rasterio.open(tmp_path / "out" / "change.tif") as src:
        change = src.read(1)
    invalid = np.zeros((64, 64), bool)
    invalid[5, 7] = invalid[40:42, 50] = True
    assert ((change == 255) == invalid).all() and summary["valid_pixels"] == 64 * 64 - 3


WEB_MERCATOR_60N = from_origin(1.3e7, 8.4e6, 0.5, 0.5)  # about 60° N: areas 1/cos²(60°) = 4×


@pytest.mark.parametrize(
    ("crs", "transform", "reason"),
    [
        ("EPSG:4326", from_origin(8.5, 47.4, 1 / 3600, 1 / 3600), "not a projected CRS in metres"),
        ("EPSG:3857", WEB_MERCATOR_60N, r"where a pixel's area is 3.987× its ground area"),
    ],
)
def test_min_area_needs_ground_areas_in_metres(net, images, tmp_path, crs, transform, reason):
    """Degrees, and metres of a CRS that is far from equal-area in the scene (Web Mercator
    at 60° N): no area in m² to filter by, and polygons without ``area_m2``."""
    pre = write_scene(tmp_path / "pre.tif", images[0], transform=transform, crs=crs)
    post = write_scene(tmp_path / "post.tif", images[1], transform=transform, crs=crs)
    refused(
        net,
        tmp_path,
        pre,
        post,
        rf"predict.min_area_m2=5.0 needs ground areas in m², but .*pre.tif is in {crs}, {reason}",
        min_area_m2=5.0,
    )
    everything = SceneSettings(**{**vars(SETTINGS), "threshold": 0.0, "explain": False})
    predict_scene(net, pre, post, tmp_path / "kept", SPEC, everything)
    features = read_features(tmp_path / "kept")
    assert features and all(f["properties"]["area_m2"] is None for f in features)


@pytest.mark.parametrize(
    ("crs", "transform", "problem"),
    [
        ("EPSG:32650", from_origin(399872, 3510144, 0.5, 0.5), None),  # UTM: 0.9995
        ("EPSG:32650", from_origin(166000, 3510144, 0.5, 0.5), None),  # its zone's edge: 1.002
        ("EPSG:6933", from_origin(1e6, 5e6, 10, 10), None),  # equal-area
        ("EPSG:3857", from_origin(1.3e7, 1e5, 0.5, 0.5), None),  # Web Mercator at 1° N: 1.007
        ("EPSG:3857", WEB_MERCATOR_60N, "3.987×"),
        ("EPSG:2056", from_origin(2.6e6, 1.2e6, 0.1, 0.1), None),  # Swiss oblique Mercator
        # polar stereographic, 1 km pixels: at the corners and the centre within 1 %, at the
        # top edge's middle (nearest the pole) 1.7 % off
        ("EPSG:3413", Affine(1000, 0, -800000, 0, -1000, -1850000), "0.98"),
        # a geostationary (SEVIRI) crop whose top corners lie beyond the Earth's limb
        (
            "+proj=geos +h=35785831 +lon_0=0 +a=6378169 +b=6356583.8 +units=m +no_defs +sweep=y",
            from_origin(-2.0e6, 5.5e6, 3000.0, 3000.0),
            "cannot place this scene (or part of it) on the globe",
        ),
        # far beyond the Earth in an equal-area CRS: no point placed, no area either
        (
            "EPSG:3035",
            from_origin(9e7, 9e7, 10, 10),
            "cannot place this scene (or part of it) on the globe",
        ),
    ],
)
def test_areas_in_m2_where_the_crs_keeps_them_within_one_percent(crs, transform, problem):
    size = (300, 1600) if crs == "EPSG:3413" else (834, 1334) if "geos" in crs else (64, 64)
    grid = Grid(
        crs=rasterio.crs.CRS.from_string(crs), transform=transform, width=size[1], height=size[0]
    )
    scales = areal_scales(grid)
    assert len(scales) == 25
    assert all(s is not None and s > 0 for s in scales) or "globe" in (problem or "")
    found = area_problem(grid)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize(
    "transform",
    [
        Affine(PIXEL, 0, ORIGIN[0], 0, PIXEL, ORIGIN[1] - 64 * PIXEL),  # south-up
        Affine(-PIXEL, 0, ORIGIN[0] + 64 * PIXEL, 0, -PIXEL, ORIGIN[1]),  # mirrored east-west
        from_origin(*ORIGIN, PIXEL, PIXEL),  # north-up
    ],
)
def test_exterior_rings_run_counter_clockwise_on_any_grid(net, images, tmp_path, transform):
    """RFC 7946's right-hand rule, also where the grid's transform flips the pixel rings."""
    pre = write_scene(tmp_path / "pre.tif", images[0], transform=transform)
    post = write_scene(tmp_path / "post.tif", images[1], transform=transform)
    settings = SceneSettings(**{**vars(SETTINGS), "explain": False})
    predict_scene(net, pre, post, tmp_path / "out", SPEC, settings)
    with rasterio.open(tmp_path / "out" / "probability.tif") as src:  # about half of it change
        threshold = float(np.median(src.read(1))) / 65535
    settings = SceneSettings(**{**vars(settings), "threshold": threshold})
    predict_scene(net, pre, post, tmp_path / "half", SPEC, settings)
    polygons = [shape(f["geometry"]) for f in read_features(tmp_path / "half")]
    polygons = [p for g in polygons for p in getattr(g, "geoms", [g])]
    assert any(p.interiors for p in polygons), "holes too"
    assert all(p.exterior.is_ccw for p in polygons)
    assert not any(ring.is_ccw for p in polygons for ring in p.interiors)


def test_a_value_the_sample_misses_is_refused_before_an_earlier_run_is_touched(
    net, images, tmp_path, monkeypatch
):
    """``input.scale=none`` on 16-bit data with one value above 255 that the decimated sample
    steps over: refused before any output is touched, so the earlier run's finished outputs
    (another setting, the same files) stay, and stay finished."""
    monkeypatch.setattr(changecam.geo.bands, "SAMPLE_SIDE", 16)  # every 4th pixel of 64 px
    wide = [image.astype(np.uint16) for image in images]
    wide[0][33, 41, 1] = 300  # row 33, column 41: off the sample's grid
    pre = write_scene(tmp_path / "pre.tif", wide[0])
    post = write_scene(tmp_path / "post.tif", wide[1])
    out = tmp_path / "out"
    settings = SceneSettings(**{**vars(SETTINGS), "explain": False})
    first = predict_scene(net, pre, post, out, SPEC, settings)
    before = {name: (out / name).stat().st_mtime_ns for name in finished_looking(out)}
    with pytest.raises(SceneError, match=r"values [\d.]+ to 300.0 at rows 32-63, outside"):
        predict_scene(
            net, pre, post, out, SPEC, SceneSettings(**{**vars(settings), "scale": "none"})
        )
    assert {name: (out / name).stat().st_mtime_ns for name in finished_looking(out)} == before
    assert predict_scene(net, pre, post, out, SPEC, settings, resume=True) == first


def test_a_refused_rerun_on_changed_inputs_leaves_no_earlier_output(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1], compress="deflate")
    predict_scene(net, pre, post, tmp_path / "out", SPEC, SETTINGS)
    assert "scene.json" in finished_looking(tmp_path / "out")
    finished = finished_looking(tmp_path / "out")
    # a refused setting with the same inputs keeps the finished outputs (they are still right)
    with pytest.raises(SceneError, match="band 9 is out of range"):
        predict_scene(
            net,
            pre,
            post,
            tmp_path / "out",
            SPEC,
            SceneSettings(**{**vars(SETTINGS), "bands": (1, 2, 9)}),
        )
    assert finished_looking(tmp_path / "out") == finished
    data = post.read_bytes()
    post.write_bytes(data[: len(data) // 2])  # the post scene is now a cut download
    refused(net, tmp_path, pre, post, r"post.tif is truncated")  # nothing that looks finished


@pytest.fixture
def forward_calls(net: torch.nn.Module) -> Iterator[list[int]]:
    """A list that grows by one at each forward of the module's ``net`` during the test."""
    calls: list[int] = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def test_resuming_a_finished_scene_with_other_outputs_finishes_it_again(
    net, images, tmp_path, forward_calls
):
    """Other polygons or min_area_m2: the scene is finished again from its rasters, without
    the network; no overviews where the rasters have them: predicted again (GDAL cannot take
    overviews out of a file)."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    probe = tmp_path / "probe"
    predict_scene(
        net, pre, post, probe, SPEC, SceneSettings(**{**vars(SETTINGS), "explain": False})
    )
    with rasterio.open(probe / "probability.tif") as src:  # about half of it change
        threshold = float(np.median(src.read(1))) / 65535
    base = {**vars(SETTINGS), "threshold": threshold, "explain": False}
    first = predict_scene(net, pre, post, out, SPEC, SceneSettings(**base), resume=True)
    kept = predict_scene(net, pre, post, out, SPEC, SceneSettings(**base), resume=True)
    assert kept == first, "the same settings keep the finished scene"
    areas = [f["properties"]["area_m2"] for f in read_features(out)]
    assert min(areas) < 2.0 < max(areas)
    mask = read_band(out / "change.tif")
    calls = forward_calls
    calls.clear()
    again = predict_scene(
        net, pre, post, out, SPEC, SceneSettings(**{**base, "min_area_m2": 2.0}), resume=True
    )
    assert again["min_area_m2"] == 2.0 and again["polygons"] < first["polygons"]
    assert min(f["properties"]["area_m2"] for f in read_features(out)) >= 2.0
    assert calls == [] and again["resumed_blocks"] == again["blocks"] == first["blocks"]
    np.testing.assert_array_equal(read_band(out / "change.tif"), mask)
    assert sorted(p.name for p in out.iterdir()) == [
        "blocks.jsonl",
        "change.geojson",
        "change.tif",
        "probability.tif",
        "scene.json",
    ]
    with pytest.raises(SceneError, match=r"other settings \(scene.threshold: [0-9.]+ -> 0.9\)"):
        predict_scene(
            net, pre, post, out, SPEC, SceneSettings(**{**base, "threshold": 0.9}), resume=True
        )
    rasters_only = SceneSettings(**{**base, "polygons": False, "overviews": False})
    summary = predict_scene(net, pre, post, out, SPEC, rasters_only, resume=True)
    assert summary["polygons"] is None and not (out / "change.geojson").exists()
    assert calls != [] and summary["resumed_blocks"] == 0
    np.testing.assert_array_equal(read_band(out / "change.tif"), mask)


def test_a_kill_between_the_final_renames_is_finished_by_a_resume(
    net, images, tmp_path, forward_calls
):
    """change.tif renamed into place, the other files not yet, no scene.json: a resume renames
    it back and finishes the scene from the rasters, without the network, to the same files."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    first = predict_scene(net, pre, post, out, SPEC, SETTINGS)
    finished = {p.name: read_band(p, None) for p in out.glob("*.tif")}
    for name in ("probability.tif", "explanation.tif", "change.geojson"):
        (out / name).rename(out / f".{name}.part")
    (out / "scene.json").unlink()
    calls = forward_calls
    calls.clear()
    summary = predict_scene(net, pre, post, out, SPEC, SETTINGS, resume=True)
    assert calls == [] and summary["resumed_blocks"] == first["blocks"]
    assert summary["polygons"] == first["polygons"]
    for name, values in finished.items():
        np.testing.assert_array_equal(read_band(out / name, None), values)
    assert not list(out.glob(".*.part")) and (out / "scene.json").is_file()


def killed_publishing(net, pre: Path, post: Path, out: Path, renamed: int) -> None:
    """A run of SETTINGS into ``out`` stopped as a kill stops it after ``renamed`` of its
    four final renames (4: before its scene.json)."""
    real_replace, done = os.replace, []

    def killed_replace(src, dst):
        if str(src).endswith(".part"):
            if len(done) == renamed:
                raise KeyboardInterrupt("killed")
            done.append(dst)
        return real_replace(src, dst)

    def killed_write_json(path, value):
        raise KeyboardInterrupt("killed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", killed_replace)
        patch.setattr(changecam.geo.scene, "write_json", killed_write_json)  # scene.json only
        with pytest.raises(KeyboardInterrupt):
            predict_scene(net, pre, post, out, SPEC, SETTINGS)


def test_partial_rasters_with_overviews_are_predicted_again_without_them(net, images, tmp_path):
    """Killed after the overviews were built, before any rename, then resumed with
    predict.overviews=false: GDAL cannot take the overviews out, so the scene is predicted
    again, and its rasters have none, as its scene.json says."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    killed_publishing(net, pre, post, out, 0)
    with rasterio.open(out / ".change.tif.part") as src:
        assert src.overviews(1), "built before the kill"
    no_overviews = SceneSettings(**{**vars(SETTINGS), "overviews": False})
    summary = predict_scene(net, pre, post, out, SPEC, no_overviews, resume=True)
    assert summary["resumed_blocks"] == 0 and summary["overviews"] is False
    for name in ("change.tif", "probability.tif", "explanation.tif"):
        with rasterio.open(out / name) as src:
            assert src.overviews(1) == [], name


@pytest.mark.parametrize("renamed", [1, 2, 3, 4])
def test_a_refused_resume_after_a_kill_mid_publish_leaves_nothing_looking_finished(
    net, images, tmp_path, monkeypatch, renamed
):
    """Killed after ``renamed`` of the four final renames (4: before scene.json), then resumed
    with another setting: refused, and what was published goes back to its partial name or
    (the geojson) away, so nothing looks finished; a resume with the first settings then
    finishes the scene to the same files."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    finished = predict_scene(net, pre, post, tmp_path / "whole", SPEC, SETTINGS)["files"]
    rasters = [name for name in finished.values() if name.endswith(".tif")]
    whole = {name: read_band(tmp_path / "whole" / name, None) for name in rasters}
    out = tmp_path / "out"
    killed_publishing(net, pre, post, out, renamed)
    assert len(finished_looking(out)) == renamed
    other = SceneSettings(**{**vars(SETTINGS), "threshold": 0.9})
    with pytest.raises(SceneError, match="other settings"):
        predict_scene(net, pre, post, out, SPEC, other, resume=True)
    assert finished_looking(out) == []
    summary = predict_scene(net, pre, post, out, SPEC, SETTINGS, resume=True)
    assert summary["resumed_blocks"] == summary["blocks"]
    for name, values in whole.items():
        np.testing.assert_array_equal(read_band(out / name, None), values)
    assert (out / "change.geojson").read_text() == (
        tmp_path / "whole" / "change.geojson"
    ).read_text()


def test_a_kill_while_a_finished_scene_is_taken_back_leaves_no_scene_json(net, images, tmp_path):
    """A finished scene resumed with another min_area_m2 is finished again from its rasters,
    renamed back to partial names first: killed after the first of those renames, it has no
    scene.json beside the missing change.tif, a refused run then hides the rest, and a resume
    finishes the scene to the same rasters."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    finished = predict_scene(net, pre, post, out, SPEC, SETTINGS)["files"]
    whole = {n: read_band(out / n, None) for n in finished.values() if n.endswith(".tif")}
    smaller = SceneSettings(**{**vars(SETTINGS), "min_area_m2": 1.0})
    real_replace = os.replace

    def killed_after_one(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".part"):
            raise KeyboardInterrupt("killed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", killed_after_one)
        with pytest.raises(KeyboardInterrupt):
            predict_scene(net, pre, post, out, SPEC, smaller, resume=True)
    assert (out / ".change.tif.part").is_file() and not (out / "scene.json").exists()
    other = SceneSettings(**{**vars(SETTINGS), "threshold": 0.9})
    with pytest.raises(SceneError, match="other settings"):
        predict_scene(net, pre, post, out, SPEC, other, resume=True)
    assert finished_looking(out) == []
    summary = predict_scene(net, pre, post, out, SPEC, smaller, resume=True)
    assert summary["resumed_blocks"] == summary["blocks"] and summary["min_area_m2"] == 1.0
    for name, values in whole.items():
        np.testing.assert_array_equal(read_band(out / name, None), values)


def test_a_kill_as_a_finished_scene_is_taken_back_leaves_no_geojson_alone(net, images, tmp_path):
    """A finished scene resumed with another ``min_area_m2`` and killed just after its rasters
    went back to their partial names: its old change.geojson stayed under its final name
    (helper-129); the resume then finishes the scene as a fresh run with that setting."""
    import changecam.geo.scene as scene_module

    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    predict_scene(net, pre, post, out, SPEC, SETTINGS)
    smaller = SceneSettings(**{**vars(SETTINGS), "min_area_m2": 1.0})
    real_take_back = scene_module.take_back_rasters

    def killed_after(*args, **kwargs):
        real_take_back(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scene_module, "take_back_rasters", killed_after)
        with pytest.raises(KeyboardInterrupt):
            predict_scene(net, pre, post, out, SPEC, smaller, resume=True)
    assert (out / ".change.tif.part").is_file()
    assert finished_looking(out) == []
    resumed = predict_scene(net, pre, post, out, SPEC, smaller, resume=True)
    fresh = predict_scene(net, pre, post, tmp_path / "fresh", SPEC, smaller)
    assert resumed["resumed_blocks"] == resumed["blocks"]
    assert resumed["polygons"] == fresh["polygons"]
    assert (out / "change.geojson").read_bytes() == (
        tmp_path / "fresh" / "change.geojson"
    ).read_bytes()


def test_a_kill_while_a_new_run_clears_an_old_set_leaves_it_to_its_log(net, images, tmp_path):
    """A finished scene, then a run with another threshold killed as it removes the old files
    (scene.json first), before its own log header: the log still describes the old set, so a
    resume with the old settings finishes it again from its rasters, without the network."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    first = predict_scene(net, pre, post, out, SPEC, SETTINGS)
    whole = {n: read_band(out / n, None) for n in first["files"].values() if n.endswith(".tif")}

    def killed_remove(self, names=("partial", "final")):  # scene.json is gone by then
        raise KeyboardInterrupt("killed")

    other = SceneSettings(**{**vars(SETTINGS), "threshold": 0.9})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SceneFiles, "remove", killed_remove)
        with pytest.raises(KeyboardInterrupt):
            predict_scene(net, pre, post, out, SPEC, other)
    header = json.loads((out / "blocks.jsonl").read_text().splitlines()[0])
    assert header["settings"]["scene"]["threshold"] == SETTINGS.threshold, "not yet the new run's"
    summary = predict_scene(net, pre, post, out, SPEC, SETTINGS, resume=True)
    assert summary["resumed_blocks"] == summary["blocks"] == first["blocks"]
    for name, values in whole.items():
        np.testing.assert_array_equal(read_band(out / name, None), values)


@pytest.mark.parametrize("earlier", ["finished", "partial"])
def test_a_kill_just_after_a_new_log_header_leaves_no_earlier_files_to_resume(
    net, tmp_path, earlier
):
    """helper-71's cases: an earlier run's outputs (a finished scene, or partial rasters of a
    smaller scene), the inputs then replaced, and a run killed just after it wrote its log's
    header: the earlier files are gone by then, so a resume predicts the new inputs from the
    start (it kept the old scene.json, or wrote new blocks into the old rasters)."""
    import changecam.geo.scene as scene_module

    out = tmp_path / "out"
    side = 64 if earlier == "finished" else 48
    pair = synthetic_pair(side)
    pre = write_scene(tmp_path / "pre.tif", pair[0])
    post = write_scene(tmp_path / "post.tif", pair[1])
    if earlier == "finished":
        predict_scene(net, pre, post, out, SPEC, SETTINGS)
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                SceneFiles, "build_overviews", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)
            )
            with pytest.raises(KeyboardInterrupt):
                predict_scene(net, pre, post, out, SPEC, SETTINGS)
    pair = synthetic_pair(64, n=7)
    write_scene(tmp_path / "pre.tif", pair[0])
    write_scene(tmp_path / "post.tif", pair[1])
    real_start = scene_module.BlockLog.start

    def killed_after(self, *args, **kwargs):
        real_start(self, *args, **kwargs)
        raise KeyboardInterrupt("killed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scene_module.BlockLog, "start", killed_after)
        with pytest.raises(KeyboardInterrupt):
            predict_scene(net, pre, post, out, SPEC, SETTINGS)
    assert finished_looking(out) == [] and not list(out.glob(".*.part"))
    resumed = predict_scene(net, pre, post, out, SPEC, SETTINGS, resume=True)
    fresh = predict_scene(net, pre, post, tmp_path / "fresh", SPEC, SETTINGS)
    assert resumed["resumed_blocks"] == 0
    np.testing.assert_array_equal(
        read_band(out / "change.tif"), read_band(tmp_path / "fresh" / "change.tif")
    )
    assert resumed["changed_pixels"] == fresh["changed_pixels"]


@pytest.mark.parametrize("garbled", ["change", "probability", "explanation"])
def test_a_resume_names_a_kept_tile_garbled_since_before_predicting(
    net, tmp_path, monkeypatch, garbled
):
    """Killed after two of four blocks, rasters only with overviews (no polygons read the
    kept blocks back), a kept tile's bytes garbled: the resume names the file before the
    network runs and leaves nothing that looks finished (GDAL's overview build would only have
    logged the tile and gone on)."""
    pair = synthetic_pair(128)
    pre = write_scene(tmp_path / "pre.tif", pair[0])
    post = write_scene(tmp_path / "post.tif", pair[1])
    out = tmp_path / "out"
    settings = SceneSettings(**{**vars(SETTINGS), "polygons": False})
    real, calls = SceneFiles.write_block, []

    def dies_after_two(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SceneFiles, "write_block", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        predict_scene(net, pre, post, out, SPEC, settings)
    monkeypatch.setattr(SceneFiles, "write_block", real)
    garble_first_tile(out / f".{garbled}.tif.part")
    forward = []
    monkeypatch.setattr(SceneNetwork, "block", lambda *a, **k: forward.append(1))
    with pytest.raises(
        SceneError,
        match=rf"\.{garbled}\.tif\.part, written by the run being resumed, cannot be read back "
        r"at block 0 .*rerun without predict.resume",
    ):
        predict_scene(net, pre, post, out, SPEC, settings, resume=True)
    assert forward == [] and finished_looking(out) == []


def test_a_scene_replaced_while_it_is_read_is_recorded_as_read(net, images, tmp_path, monkeypatch):
    """The inputs are recorded before they are opened: a post file renamed over the one being
    read (GDAL reads on from the file it opened) is refused by a resume, since the finished
    scene was predicted from the first one."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    other = write_scene(tmp_path / "other.tif", images[0])
    out = tmp_path / "out"
    real_open = changecam.geo.scene.open_pair

    @contextlib.contextmanager
    def open_then_replace(*args, **kwargs):
        with real_open(*args, **kwargs) as pair:
            os.replace(other, post)
            yield pair

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(changecam.geo.scene, "open_pair", open_then_replace)
        predict_scene(net, pre, post, out, SPEC, SETTINGS)
    with pytest.raises(SceneError, match="the input files are not those"):
        predict_scene(net, pre, post, out, SPEC, SETTINGS, resume=True)


def test_rasters_of_other_settings_are_not_taken_back(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    predict_scene(net, pre, post, out, SPEC, SETTINGS)
    files = SceneFiles(out, explain=True)
    assert files.take_back("0123456789abcdef", overviews=True) == []
    (out / ".change.tif.part").write_bytes(b"")
    with rasterio.open(out / "probability.tif") as src:
        tag = src.tags()[SETTINGS_TAG]
    assert files.take_back(tag, overviews=False) == [], "it has overviews"
    assert files.take_back(tag, overviews=True) == ["probability", "explanation"]
    assert (out / ".probability.tif.part").is_file() and (out / "change.tif").is_file()


def read_features(folder: Path) -> list[dict]:
    return json.loads((folder / "change.geojson").read_text())["features"]


def test_a_date_whose_few_valid_pixels_the_sample_misses_is_still_predicted(net, tmp_path):
    """2050 px wide, the scaling sample takes every 3rd column; the only valid pixels of the pre
    date are in column 1: every pixel is read before the date is called all nodata, and its
    percentile stretch comes from them."""
    rng = np.random.default_rng(0)
    pre = np.zeros((16, 2050, 3), np.uint16)
    pre[:, 1] = rng.integers(1000, 3000, (16, 3))
    post = rng.integers(1000, 3000, (16, 2050, 3)).astype(np.uint16)
    pre_path = write_scene(tmp_path / "pre.tif", pre, nodata=0)
    post_path = write_scene(tmp_path / "post.tif", post)
    summary = predict_scene(net, pre_path, post_path, tmp_path / "out", SPEC, SETTINGS)
    assert summary["valid_pixels"] == 16
    values = pre[:, 1].reshape(-1, 3).astype(float)
    np.testing.assert_allclose(summary["scaling"]["pre"]["lo"], np.percentile(values, 2, axis=0))
    with rasterio.open(tmp_path / "out" / "change.tif") as src:
        change = src.read(1)
    assert (change[:, 1] != 255).all() and (np.delete(change, 1, axis=1) == 255).all()


@pytest.mark.parametrize("dtype, low, high", [("float32", -0.5, 0.5), ("int16", -40, 200)])
def test_scale_none_refuses_values_outside_0_255(net, images, tmp_path, dtype, low, high):
    """Reflectance passed with input.scale=none would be clipped to 0-255 (a change in a
    -0.5..0.5 scene vanished); it is refused, naming the file and its values."""
    pre_values = np.linspace(low, high, 64 * 64 * 3).reshape(64, 64, 3).astype(dtype)
    pre = write_scene(tmp_path / "pre.tif", pre_values)
    post = write_scene(tmp_path / "post.tif", images[1].astype(dtype))
    refused(
        net,
        tmp_path,
        pre,
        post,
        rf"input.scale=none but .*pre.tif has values {float(low)!r} to .* at rows 0-63, outside "
        "the network's 0-255; set input.scale=percentile",
        scale="none",
    )


def test_scale_none_on_reflectance_between_0_and_1_is_warned_about(net, images, tmp_path, caplog):
    pre, post = (
        write_scene(tmp_path / f"{n}.tif", (x / 255).astype(np.float32))
        for n, x in zip(("pre", "post"), images, strict=True)
    )
    with caplog.at_level("WARNING", logger="changecam"):
        predict_scene(
            net,
            pre,
            post,
            tmp_path / "out",
            SPEC,
            SceneSettings(**{**vars(SETTINGS), "scale": "none"}),
        )
    assert (
        "input.scale=none but the values sampled from" in caplog.text
        and "lie within 0-1" in caplog.text
    )


def test_scale_none_takes_16_bit_values_within_0_255(net, images, tmp_path):
    pre = write_scene(tmp_path / "pre.tif", images[0].astype(np.uint16))
    post = write_scene(tmp_path / "post.tif", images[1].astype(np.uint16))
    settings = SceneSettings(**{**vars(SETTINGS), "scale": "none"})
    wide = predict_scene(net, pre, post, tmp_path / "wide", SPEC, settings)
    pre8 = write_scene(tmp_path / "pre8.tif", images[0])
    post8 = write_scene(tmp_path / "post8.tif", images[1])
    narrow = predict_scene(net, pre8, post8, tmp_path / "narrow", SPEC, settings)
    assert wide["changed_pixels"] == narrow["changed_pixels"]
    for name in ("change", "probability"):
        with rasterio.open(tmp_path / "wide" / f"{name}.tif") as a:
            with rasterio.open(tmp_path / "narrow" / f"{name}.tif") as b:
                np.testing.assert_array_equal(a.read(), b.read())


def test_a_file_of_large_blocks_is_warned_about_with_the_command_that_tiles_it(
    net, images, tmp_path, monkeypatch, caplog
):
    """A whole-image strip cannot be read window by window in bounded memory: every window
    read decodes it whole. The scene still runs; the log says so and how to rewrite it."""
    import changecam.geo.grid

    monkeypatch.setattr(changecam.geo.grid, "LARGE_BLOCK_BYTES", 64 * 64 * 3 - 1)
    pre = write_scene(
        tmp_path / "my scenes" / "pre.tif",
        images[0],
        tiled=False,
        blockysize=64,
        compress="deflate",
    )
    post = write_scene(tmp_path / "post.tif", images[1])  # 32² tiles: 3 KiB
    with rasterio.open(pre) as src:
        assert src.block_shapes[0] == (64, 64)
    with caplog.at_level("WARNING", logger="changecam"):
        predict_scene(net, pre, post, tmp_path / "out", SPEC, SETTINGS)
    warnings = [r.getMessage() for r in caplog.records if "blocks of" in r.getMessage()]
    assert len(warnings) == 1
    assert re.match(
        r".*pre\.tif is stored in blocks of 64x64 px \(0 MiB decoded, a single strip\): every "
        r"window read decodes whole blocks.*: GDAL_CACHEMAX=512 rio convert --co tiled=true .*",
        warnings[0],
    )
    command = shlex.split(warnings[0].split(": ")[-1])  # pastes into a shell as it is
    assert command[-2:] == [str(pre), str(pre.with_name("pre_tiled.tif"))]
    assert "photometric=rgb" not in command
    assert (tmp_path / "out" / "scene.json").is_file()


def test_the_tiling_command_of_a_jpeg_ycbcr_file_writes_rgb(tmp_path):
    """YCbCr goes with JPEG compression only: the command's deflate copy must say RGB."""
    from changecam.geo.grid import large_block_warning

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    path = write_scene(
        tmp_path / "ortho.tif",
        image,
        tiled=False,
        blockysize=64,
        compress="jpeg",
        photometric="ycbcr",
    )
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["SOURCE_COLOR_SPACE"] == "YCbCr"
        import changecam.geo.grid as grid_module

        before, grid_module.LARGE_BLOCK_BYTES = grid_module.LARGE_BLOCK_BYTES, 0
        try:
            warning = large_block_warning(src, (1, 2, 3), path)
        finally:
            grid_module.LARGE_BLOCK_BYTES = before
    assert warning is not None and "--co photometric=rgb" in warning


def test_decoded_block_bytes_count_every_band_of_a_pixel_interleaved_block(tmp_path):
    from changecam.geo.grid import decoded_block_bytes

    image = np.zeros((64, 64, 4), np.uint16)
    pixel = write_scene(tmp_path / "pixel.tif", image)
    band = write_scene(tmp_path / "band.tif", image, interleave="band")
    with rasterio.open(pixel) as a, rasterio.open(band) as b:
        assert decoded_block_bytes(a, (3, 2, 1)) == 32 * 32 * 2 * 4
        assert decoded_block_bytes(b, (3, 2, 1)) == 32 * 32 * 2 * 3


def test_scale_none_refused_at_setup_keeps_a_finished_scene(net, images, tmp_path):
    """The range is checked on the sample before any output is touched: resuming a finished
    scene with input.scale=none is refused and its outputs stay."""
    pre = write_scene(tmp_path / "pre.tif", images[0].astype(np.uint16) * 16)  # 12-bit
    post = write_scene(tmp_path / "post.tif", images[1].astype(np.uint16) * 16)
    out = tmp_path / "out"
    predict_scene(net, pre, post, out, SPEC, SETTINGS)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    settings = SceneSettings(**{**vars(SETTINGS), "scale": "none"})
    with pytest.raises(
        SceneError,
        match=r"input.scale=none but .*pre.tif has values [0-9.]+ to [0-9.]+ at rows 0-63",
    ):
        predict_scene(net, pre, post, out, SPEC, settings, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_scale_none_checks_each_block_on_the_pixels_valid_in_both_dates(tmp_path):
    """A value outside 0-255 where the other date is nodata never reaches the network: either
    order of the pair reads; one in a pixel valid in both is refused, naming the block."""
    from changecam.geo.bands import Scaling
    from changecam.geo.windows import block_grid, read_region

    hidden = np.full((64, 64, 3), 100, np.uint16)
    hidden[:8, :8] = 4000
    holed = np.full((64, 64, 3), 120, np.uint16)
    holed[:8, :8] = 0  # nodata
    a = write_scene(tmp_path / "a.tif", hidden)
    b = write_scene(tmp_path / "b.tif", holed, nodata=0)
    block = block_grid(64, 64, 64, SPEC)[0]
    none = (Scaling(), Scaling())
    for first, second in ((a, b), (b, a)):
        with rasterio.open(first) as x, rasterio.open(second) as y:
            region = read_region(x, y, (1, 2, 3), none, block)
        assert not region.valid[:8, :8].any() and region.valid[8:, 8:].all()
        assert region.pre.max() <= 120 and region.post.max() <= 120
    hidden[20, 30] = 300
    c = write_scene(tmp_path / "c.tif", hidden)
    with rasterio.open(b) as x, rasterio.open(c) as y:
        with pytest.raises(SceneError, match=r"c.tif has values 100.0 to 300.0 at rows 0-63"):
            read_region(x, y, (1, 2, 3), none, block, (Path("b.tif"), Path("c.tif")))


def test_interpolated_band_indexes_from_the_config_are_resolved():
    from omegaconf import OmegaConf

    from changecam.cli.scenes import scene_settings

    cfg = OmegaConf.create({"nir": 4, "input": {"bands": ["${nir}", 3, 2]}})
    assert scene_settings(cfg, 0.5, False).bands == (4, 3, 2)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["explain.methods=[hirescam,contrastive]"], "methods"),
        (["explain.method=contrastive", "explain.methods=[hirescam,contrastive]"], "methods"),
        (["explain.taps=[input]"], "taps"),
        (["explain.target=all"], "target"),
    ],
)
def test_explain_choices_a_scene_would_ignore_are_refused_before_any_output(
    tmp_path, images, tiny_synthetic, overrides, named
):
    """explanation.tif holds explain.method's maps of the predicted change at
    predict.explain_layer: more methods, taps or another target were silently not applied."""
    ckpt = make_lightning_checkpoint(tmp_path / "ckpt" / "best.ckpt", tiny_synthetic, steps=1)
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    with pytest.raises(SceneError, match=rf"^GeoTIFF scenes do not use explain\.{named}="):
        run_scene(tmp_path, ckpt, pre, post, *overrides)
    assert finished_looking(tmp_path / "run") == []
    # without an explanation nothing is ignored
    report = run_scene(tmp_path, ckpt, pre, post, *overrides, "explain.enabled=false")
    assert [s["name"] for s in report["scenes"]] == ["pre"]


def test_naming_the_layer_a_run_resolved_to_resumes_it(net, images, tmp_path):
    """A run started with predict.explain_layer=null (the deepest) is the same run as one naming
    that layer; another layer is named in the refusal."""
    pre = write_scene(tmp_path / "pre.tif", images[0])
    post = write_scene(tmp_path / "post.tif", images[1])
    out = tmp_path / "out"
    first = predict_scene(net, pre, post, out, SPEC, SETTINGS)
    assert first["explain_layer"] == "enc2"
    named = SceneSettings(**{**vars(SETTINGS), "explain_layer": "enc2"})
    assert predict_scene(net, pre, post, out, SPEC, named, resume=True) == first
    other = SceneSettings(**{**vars(SETTINGS), "explain_layer": "enc1"})
    with pytest.raises(SceneError, match=r'other settings \(explain_layer: "enc2" -> "enc1"\)'):
        predict_scene(net, pre, post, out, SPEC, other, resume=True)
    contrastive = SceneSettings(**{**vars(SETTINGS), "explain_method": "contrastive"})
    with pytest.raises(SceneError, match=r"other settings \(scene.explain_method: "):
        predict_scene(net, pre, post, out, SPEC, contrastive, resume=True)


def test_a_resume_whose_input_files_changed_says_no_setting_resumes_it(tmp_path):
    """Changed files (and what follows from them: whether there is nodata to mask) cannot be
    resumed by any setting; a changed setting can."""
    log = BlockLog(tmp_path / LOG_FILE)
    first = {"post": {"path": "b.tif", "mtime_ns": 1}, "probability_mask": False, "scene": 1}
    log.start(first, resume=False, readable=True)
    files = {"post": {"path": "b.tif", "mtime_ns": 2}, "probability_mask": True, "scene": 1}
    with pytest.raises(
        SceneError,
        match=r"the input files are not those .* \(post.mtime_ns: 1 -> 2; probability_mask: false "
        r"-> true\).* rerun without predict.resume",
    ):
        log.start(files, resume=True, readable=True)
    with pytest.raises(SceneError, match=r"other settings \(scene: 1 -> 2\); resume with those"):
        log.start({**first, "scene": 2}, resume=True, readable=True)


def test_a_finished_scene_resumed_reads_no_sample(net, images, tmp_path, monkeypatch):
    """Resuming a folder of scenes skips the finished ones without decoding them again for the
    stretch (a 16-bit date is sampled in a full read)."""
    wide = [image.astype(np.uint16) * 16 for image in images]
    pre = write_scene(tmp_path / "pre.tif", wide[0])
    post = write_scene(tmp_path / "post.tif", wide[1])
    settings = SceneSettings(**{**vars(SETTINGS), "explain": False})
    first = predict_scene(net, pre, post, tmp_path / "out", SPEC, settings, resume=True)
    assert first["scaling"]["pre"]["lo"] is not None  # percentile: the sample was read

    def no_sample(*args, **kwargs):
        raise AssertionError("a finished scene was sampled again")

    monkeypatch.setattr(changecam.geo.scene, "checked_sample", no_sample)
    assert predict_scene(net, pre, post, tmp_path / "out", SPEC, settings, resume=True) == first


def test_overviews_not_written_whole_fail_the_scene_and_a_resume_finishes_it(
    net, tmp_path, monkeypatch
):
    """GDAL only prints its write errors while it builds overviews (a full file system, a
    file-size limit): the scene was published with a raster that could not be opened, and a
    resume kept it as finished (helper-113). Each raster is checked whole after its overviews:
    the scene fails as a GDAL error does, nothing looks finished, and a resume finishes it."""
    import rasterio.errors

    from changecam.geo.write import SceneFiles

    pre_image, post_image = synthetic_pair(256)
    pre = write_scene(tmp_path / "pre.tif", pre_image)
    post = write_scene(tmp_path / "post.tif", post_image)
    real = SceneFiles.build_overviews

    def cut_short(self, grid):  # as GDAL leaves a file it could not write whole
        real(self, grid)
        path = self.partial("probability")
        os.truncate(path, path.stat().st_size - 100)

    monkeypatch.setattr(SceneFiles, "build_overviews", cut_short)
    out = tmp_path / "out"
    with pytest.raises(rasterio.errors.RasterioIOError, match="probability.tif were not written"):
        predict_scene(net, pre, post, out, SPEC, SETTINGS)
    assert finished_looking(out) == []
    monkeypatch.setattr(SceneFiles, "build_overviews", real)
    resumed = predict_scene(net, pre, post, out, SPEC, SETTINGS, resume=True)
    predict_scene(net, pre, post, tmp_path / "whole", SPEC, SETTINGS)
    for name in resumed["files"].values():
        if name.endswith(".tif"):
            np.testing.assert_array_equal(
                read_band(out / name, None), read_band(tmp_path / "whole" / name, None)
            )

"""predict.py on GeoTIFF scenes: georeferenced outputs, polygons, reprojection, nodata, bands,
kill-and-resume (changecam.geo).

Most tests run :class:`geo_scenes.DifferenceNet`, a hand-built network whose change is where
the dates differ, on a pair whose change is known to the pixel (:data:`geo_scenes.ROOFS`
painted over the pre image), so a mask that does not follow the images fails them; a trained
U-Net runs the explained scene and the real kill."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.enums import ColorInterp, Interleaving, MaskFlags, Resampling
from rasterio.features import rasterize
from rasterio.warp import calculate_default_transform, reproject
from shapely.geometry import box, shape

import changecam.geo.write
from changecam.cli.config_checks import ConfigError
from changecam.cli.predict import predict, read_probability
from changecam.cli.scenes import SceneFailure
from changecam.data.io import write_png
from changecam.data.transforms import image_to_tensor
from changecam.explain import explain_batch
from changecam.explain.targets import Target
from changecam.geo import SceneError
from changecam.geo.grid import open_pair
from changecam.models.sliding_window import SlidingWindow, sliding_window_logits
from changecam.training.checkpoint import load_network
from geo_scenes import (
    CRS,
    FAST,
    ORIGIN,
    PIXEL,
    ROOFS,
    TRANSFORM,
    DifferenceNet,
    changed_pair,
    difference_checkpoint,
    finished_looking,
    read_band,
    roof_mask,
    run_scene,
    synthetic_pair,
    write_scene,
)
from helpers import compose_train
from test_checkpoint import make_lightning_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """:class:`geo_scenes.DifferenceNet`: change where the dates' local means differ."""
    return difference_checkpoint(tmp_path_factory.mktemp("geo_ckpt") / "difference.ckpt")


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory, tiny_synthetic) -> Path:
    """A tiny SiameseUNet, trained for 3 steps: a real network's layers, taps and checkpoint."""
    return make_lightning_checkpoint(
        tmp_path_factory.mktemp("geo_unet") / "best.ckpt", tiny_synthetic, steps=3
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("geo_pair")
    pre, post = changed_pair(128)
    return write_scene(folder / "pre.tif", pre), write_scene(folder / "post.tif", post)


@pytest.fixture(scope="module")
def threshold() -> float:
    """DifferenceNet's own: change where its logit is positive."""
    return 0.5


def change_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks' changed pixels (1; 255 nodata is not change)."""
    return float(((a == 1) & (b == 1)).sum() / ((a == 1) | (b == 1)).sum())


def test_outputs_are_georeferenced_and_polygons_match_the_mask(tmp_path, ckpt, pair, threshold):
    report = run_scene(tmp_path, ckpt, *pair, f"threshold={threshold}")
    folder = tmp_path / "run" / "pre"
    assert sorted(p.name for p in folder.iterdir()) == [
        "blocks.jsonl",
        "change.geojson",
        "change.tif",
        "explanation.tif",
        "probability.tif",
        "scene.json",
    ], "no partial file is left"
    for name, count, dtype in (
        ("change", 1, "uint8"),
        ("probability", 1, "uint16"),
        ("explanation", 3, "float32"),
    ):
        with rasterio.open(folder / f"{name}.tif") as src:
            assert src.crs == rasterio.crs.CRS.from_string(CRS)
            assert src.transform == TRANSFORM, "exactly the input's transform"
            assert (src.width, src.height, src.count, src.dtypes[0]) == (128, 128, count, dtype)
            assert src.overviews(1)[:1] == [2], "overviews built"
            assert src.profile["tiled"] and src.profile["compress"] == "deflate"
            if name == "explanation":
                assert src.interleaving == Interleaving.band
    with rasterio.open(folder / "change.tif") as src:
        assert src.nodata == 255
    with rasterio.open(folder / "probability.tif") as src:  # no nodata in the pair: no mask
        assert src.mask_flag_enums == ([MaskFlags.all_valid],)
    change = read_band(folder / "change.tif")
    roofs = roof_mask()
    assert set(np.unique(change)) == {0, 1}
    # every painted pixel is change, and nothing farther than the 3x3 smoothing's reach
    near = cv2.dilate(roofs.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert (change[roofs] == 1).all() and not (change[~near] == 1).any()

    # the blocks blend exactly like predict's whole-image sliding window
    net = load_network(ckpt)
    x_pre, x_post = (image_to_tensor(changed_pair(128)[i])[None] for i in (0, 1))
    expected = torch.sigmoid(sliding_window_logits(net, x_pre, x_post, SlidingWindow(window=32)))
    got = read_band(folder / "probability.tif") / 65535
    np.testing.assert_allclose(got, expected[0, 0].numpy(), atol=0.5 / 65535 + 1e-6)

    explanation = read_band(folder / "explanation.tif", None)
    share = explanation[2]
    assert np.nanmin(share) >= 0 and np.nanmax(share) <= 1
    pre_relu, post_relu = (np.clip(band, 0, None) for band in explanation[:2])
    both = pre_relu + post_relu
    np.testing.assert_allclose(
        share[both > 0], (post_relu / np.where(both > 0, both, 1))[both > 0], rtol=1e-6
    )
    assert np.isnan(share[both == 0]).all()
    assert np.abs(explanation[:2][:, roofs]).min(axis=0).max() > 0  # both dates drove a roof
    # zoomed out, each pixel's share is that of the four it covers together, as a polygon's
    sums = np.stack([pre_relu, post_relu]).reshape(2, 64, 2, 64, 2).sum((2, 4))
    with rasterio.open(folder / "explanation.tif", overview_level=0) as src:
        overview_share = src.read(3)
    np.testing.assert_allclose(overview_share, sums[1] / sums.sum(0), rtol=1e-6)

    collection = json.loads((folder / "change.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32650"
    scene_box = box(ORIGIN[0], ORIGIN[1] - 128 * PIXEL, ORIGIN[0] + 128 * PIXEL, ORIGIN[1])
    features = collection["features"]
    assert features and len(features) == report["scenes"][0]["polygons"]
    total = 0
    for feature in features:
        geom, props = shape(feature["geometry"]), feature["properties"]
        assert geom.is_valid and scene_box.buffer(1e-6).contains(geom)
        assert props["area_m2"] == pytest.approx(geom.area) == props["pixels"] * PIXEL**2
        assert threshold < props["mean_probability"] <= 1
        assert props["post_share"] is None or 0 <= props["post_share"] <= 1
        total += props["pixels"]
    assert total == (change == 1).sum(), "every changed pixel in exactly one polygon"
    assert len(features) == len(ROOFS), "one polygon per roof, the one cut by blocks joined"
    tops = [shape(f["geometry"]).bounds[3] for f in features]
    assert tops == sorted(tops, reverse=True), "northernmost first"
    assert [f["id"] for f in features] == list(range(1, len(features) + 1))
    # the polygons burnt back into the grid are the mask, pixel for pixel (each polygon alone
    # covers its own pixel count)
    burnt = rasterize(
        [(shape(f["geometry"]), f["id"]) for f in features],
        out_shape=(128, 128),
        transform=TRANSFORM,
        dtype="int32",
    )
    np.testing.assert_array_equal(burnt > 0, change == 1)
    probability = read_band(folder / "probability.tif") / 65535
    relu = np.clip(explanation[:2], 0, None)
    for feature in features:
        mine = burnt == feature["id"]
        props = feature["properties"]
        assert mine.sum() == props["pixels"]
        # the record's sums are those of the rasters over its own pixels
        assert props["mean_probability"] == pytest.approx(probability[mine].mean(), abs=1e-6)
        pre_mass, post_mass = relu[0][mine].sum(), relu[1][mine].sum()
        assert props["post_share"] == pytest.approx(post_mass / (pre_mass + post_mass), rel=1e-5)

    summary = json.loads((folder / "scene.json").read_text())
    assert summary["changed_pixels"] == total and summary["explain_layer"] == "smooth"
    assert report["scenes"][0] == summary
    phases = [summary[f"{p}_seconds"] for p in ("setup", "compute", "finish")]
    assert min(phases) > 0 and sum(phases) <= summary["seconds"], "the run's time, split"
    # the second block row's windows waited on disk, and the blend above is still exact
    assert summary["window_cache"]["peak_on_disk"] > 0


def test_min_area_drops_small_polygons(tmp_path, ckpt, pair, threshold):
    run_scene(
        tmp_path,
        ckpt,
        *pair,
        f"threshold={threshold}",
        "predict.min_area_m2=20",
        "explain.enabled=false",
    )
    folder = tmp_path / "run" / "pre"
    features = json.loads((folder / "change.geojson").read_text())["features"]
    # the two small roofs go (48 and 21 px with the smoothing's rim: 12 and 5.25 m²)
    assert len(features) == len(ROOFS) - 2
    assert all(f["properties"]["area_m2"] >= 20 for f in features)
    assert not (folder / "explanation.tif").exists()
    assert all(f["properties"]["post_share"] is None for f in features)
    # a region exactly at the limit stays (12 m²: the 6x8 px roof)
    run_scene(
        tmp_path / "at",
        ckpt,
        *pair,
        f"threshold={threshold}",
        "predict.min_area_m2=12",
        "explain.enabled=false",
        "predict.overviews=false",
    )
    features = json.loads((tmp_path / "at" / "run" / "pre" / "change.geojson").read_text())
    assert sorted(f["properties"]["area_m2"] for f in features["features"])[0] == 12.0
    assert len(features["features"]) == len(ROOFS) - 1


def reprojected(
    src_path: Path, dst_path: Path, crs: str | None = None, pixel: float | None = None
) -> Path:
    """The scene in another CRS and/or pixel size (bilinear), as a GeoTIFF."""
    with rasterio.open(src_path) as src:
        dst_crs = crs or src.crs
        if pixel is not None:
            transform, width, height = calculate_default_transform(
                src.crs, dst_crs, src.width, src.height, *src.bounds, resolution=pixel
            )
        else:
            transform, width, height = calculate_default_transform(
                src.crs, dst_crs, src.width, src.height, *src.bounds
            )
        data = np.zeros((src.count, height, width), np.uint8)
        reproject(
            src.read(),
            data,
            src_transform=src.transform,
            src_crs=src.crs,
            dst_transform=transform,
            dst_crs=dst_crs,
            resampling=Resampling.average if pixel else Resampling.bilinear,
            dst_nodata=0,
        )
    return write_scene(
        dst_path, data, transform=transform, crs=str(dst_crs), nodata=0, bands_first=True
    )


@pytest.mark.parametrize("how", ["coarser", "zone51"])
def test_reprojected_post_gives_the_aligned_mask(tmp_path, ckpt, pair, threshold, how):
    pre, post = pair
    moved = reprojected(
        post,
        tmp_path / "post_moved.tif",
        **({"pixel": 2 * PIXEL} if how == "coarser" else {"crs": "EPSG:32651"}),
    )
    with pytest.raises(SceneFailure, match="input.align=strict: the scenes are on different grids"):
        run_scene(
            tmp_path / "strict", ckpt, pre, moved, "input.align=strict", "explain.enabled=false"
        )
    aligned_run, moved_run = tmp_path / "a", tmp_path / "b"
    run_scene(aligned_run, ckpt, pre, post, f"threshold={threshold}", "explain.enabled=false")
    report = run_scene(
        moved_run, ckpt, pre, moved, f"threshold={threshold}", "explain.enabled=false"
    )
    assert report["scenes"][0]["post_reprojected"] is True
    with rasterio.open(moved_run / "run" / "pre" / "change.tif") as src:
        assert src.transform == TRANSFORM and src.crs == rasterio.crs.CRS.from_string(CRS)
        moved_mask = src.read(1)
    aligned_mask = read_band(aligned_run / "run" / "pre" / "change.tif")
    valid = moved_mask != 255
    assert valid.mean() > 0.99  # a rim may fall outside the reprojected footprint: nodata
    # the roofs found through the warp are those of the aligned pair up to resampling at their
    # edges (0.97-0.98 measured); a post scene not warped onto the pre grid, or not read at
    # all, fails: shifted 6 px (3 m) it gave 0.51, and the pre scene read twice no change (0)
    iou = change_iou(moved_mask, aligned_mask)
    assert iou > 0.9, f"changed pixels: intersection over union {iou:.3f}"
    assert (moved_mask[roof_mask()] == 1).mean() > 0.95
    # the post scene as the runner reads it is GDAL's bilinear warp onto the pre grid (within
    # one grey level; nearest differs by up to 50-65 levels here)
    with open_pair(pre, moved) as opened:
        warped, inside = opened.post.read([1, 2, 3]), opened.post.dataset_mask() > 0
    with rasterio.open(moved) as src:
        expected = np.zeros((3, 128, 128), np.uint8)
        reproject(
            src.read(),
            expected,
            src_transform=src.transform,
            src_crs=src.crs,
            dst_transform=TRANSFORM,
            dst_crs=CRS,
            resampling=Resampling.bilinear,
            src_nodata=0,
        )
    assert np.abs(warped.astype(int) - expected.astype(int))[:, inside].max() <= 1


def test_nodata_in_either_date_stays_nodata(tmp_path, ckpt):
    pre, post = synthetic_pair(128)
    pre, post = pre.copy(), post.copy()
    pre[:40, :30] = 0  # nodata=0 in the pre scene
    hole = np.zeros((128, 128), bool)
    hole[90:, 70:] = True
    pre_path = write_scene(tmp_path / "pre.tif", pre, nodata=0)
    post_path = write_scene(tmp_path / "post.tif", post)
    with rasterio.open(post_path, "r+") as dst:  # an internal mask in the post scene
        dst.write_mask(np.where(hole, 0, 255).astype(np.uint8))
    # everything valid is change
    report = run_scene(tmp_path, ckpt, pre_path, post_path, "threshold=0.0")
    folder = tmp_path / "run" / "pre"
    invalid = np.zeros((128, 128), bool)
    invalid[:40, :30] = True
    invalid |= hole
    change = read_band(folder / "change.tif")
    assert (change[invalid] == 255).all() and (change[~invalid] == 1).all()
    summary = report["scenes"][0]
    assert summary["changed_pixels"] == summary["valid_pixels"] == (~invalid).sum()
    with rasterio.open(folder / "probability.tif") as src:
        assert ((src.dataset_mask() == 0) == invalid).all()
    explanation = read_band(folder / "explanation.tif", None)
    assert np.isnan(explanation[:, invalid]).all() and not np.isnan(explanation[:2, ~invalid]).any()
    features = json.loads((folder / "change.geojson").read_text())["features"]
    assert sum(f["properties"]["pixels"] for f in features) == (~invalid).sum()


def test_an_overlap_too_thin_for_the_percentile_sample_stretches_each_date_by_its_own(
    tmp_path, ckpt
):
    """A 1026 px wide pre (its sample takes every second column) and a post that overlaps its
    last column only: no sample place is valid in both, so each date's own pixels."""
    g = np.random.default_rng(0)
    pre = g.integers(1000, 4000, (64, 1026, 3)).astype(np.uint16)
    post = g.integers(1000, 4000, (64, 200, 3)).astype(np.uint16)
    east = Affine.translation(1025 * PIXEL, 0) * TRANSFORM
    paths = write_scene(tmp_path / "pre.tif", pre), write_scene(tmp_path / "post.tif", post, east)
    report = run_scene(tmp_path, ckpt, *paths, "explain.enabled=false")
    summary = report["scenes"][0]
    assert summary["post_reprojected"] and summary["valid_pixels"] == 64
    own = np.percentile(post.reshape(-1, 3).astype(float), [2, 98], axis=0)
    np.testing.assert_allclose(summary["scaling"]["post"]["lo"], own[0])
    np.testing.assert_allclose(summary["scaling"]["post"]["hi"], own[1])


def test_the_probability_mask_is_inside_its_file_whatever_the_environment_says(
    tmp_path, ckpt, monkeypatch
):
    monkeypatch.setenv("GDAL_TIFF_INTERNAL_MASK", "NO")  # GDAL 3.5-3.8's default: a .msk sidecar
    pre, post = changed_pair(128)
    pre = pre.copy()
    pre[:40, :40] = 0
    paths = (
        write_scene(tmp_path / "pre.tif", pre, nodata=0),
        write_scene(tmp_path / "post.tif", post),
    )
    run_scene(tmp_path, ckpt, *paths, "explain.enabled=false")
    folder = tmp_path / "run" / "pre"
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".msk")]
    with rasterio.open(folder / "probability.tif") as src:
        assert (src.dataset_mask() == 0).sum() == 40 * 40


@pytest.mark.parametrize("scale", ["percentile_joint", "fixed"])
def test_values_are_read_in_the_units_of_the_bands_scale_and_offset(tmp_path, ckpt, pair, scale):
    """The same image stored as two processing baselines store Sentinel-2 L2A (the second adds
    1000 to every value and says so in its offset; the first has no scale or offset): read as
    stored, a joint or fixed stretch made the whole scene change (helper-85)."""
    image = read_band(pair[0], None).astype(np.uint16)  # 3 x H x W, 0-255
    pre = write_scene(tmp_path / "pre.tif", image, bands_first=True)
    post = write_scene(tmp_path / "post.tif", image * 10 + 1000, bands_first=True)
    with rasterio.open(post, "r+") as dst:
        dst.scales, dst.offsets = (0.1,) * 3, (-100.0,) * 3
    paths = [pre, post]
    units = ["input.scale_min=0", "input.scale_max=255"] if scale == "fixed" else []
    run_scene(tmp_path, ckpt, *paths, "explain.enabled=false", f"input.scale={scale}", *units)
    change = read_band(tmp_path / "run" / "pre" / "change.tif")
    assert (change == 1).sum() == 0 and (change == 0).all()
    # a log written before the values were read so (no band_units) resumes none of its
    # blocks: they were read as stored (helper-88)
    log_path = tmp_path / "run" / "pre" / "blocks.jsonl"
    header, *blocks = log_path.read_text().splitlines(keepends=True)
    started = json.loads(header)
    assert started["settings"].pop("band_units") == {
        "pre": None,
        "post": {"scale": [0.1] * 3, "offset": [-100.0] * 3},
    }
    log_path.write_text(json.dumps(started) + "\n" + "".join(blocks))
    with pytest.raises(SceneFailure, match=r"other settings(?s:.)*band_units: \(absent\)"):
        run_scene(
            tmp_path,
            ckpt,
            *paths,
            "explain.enabled=false",
            f"input.scale={scale}",
            *units,
            "predict.resume=true",
        )


def test_a_wrapped_ensemble_explains_a_scene_at_its_declared_layer(tmp_path, pair):
    """Two networks' taps share names: the scene listed every tap to choose its layer and
    refused the shared names, although only the declared layer is explained (helper-88)."""
    from changecam.explain import LayerTaps
    from changecam.geo.scene import SceneSettings, predict_scene

    class PairOfDifferenceNets(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = DifferenceNet(), DifferenceNet()

        def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
            return (self.a(pre, post) + self.b(pre, post)) / 2

    net = LayerTaps(PairOfDifferenceNets(), {"a.smooth": {"mode": "calls", "name": "ensA"}})
    settings = SceneSettings(explain=True, explain_layer="ensA", progress=False, overviews=False)
    spec = SlidingWindow(window=32, overlap=0.25, batch_size=4)
    predict_scene(net, *pair, tmp_path / "out", spec, settings, "cpu")
    bands = read_band(tmp_path / "out" / "explanation.tif", None)
    assert bands.shape[0] == 3 and np.isfinite(bands[:2]).all()


def test_a_joint_stretch_of_two_data_types_needs_both_dates_to_say_what_they_mean(
    tmp_path, ckpt, pair
):
    """uint8 values beside uint16 reflectance with a scale: one stretch of raw 0-255 and 0-1
    values made everything change (helper-88); refused unless both dates have units."""
    image = read_band(pair[0], None)
    pre = write_scene(tmp_path / "pre.tif", image, bands_first=True)
    post = write_scene(tmp_path / "post.tif", image.astype(np.uint16) * 40, bands_first=True)
    with rasterio.open(post, "r+") as dst:
        dst.scales = (0.025,) * 3
    joint = ["explain.enabled=false", "input.scale=percentile_joint"]
    with pytest.raises(SceneFailure, match="must hold one data type, but .*uint8 and .*uint16"):
        run_scene(tmp_path / "one", ckpt, pre, post, *joint)
    with rasterio.open(pre, "r+") as dst:
        dst.scales = (1.0,) * 3
        dst.offsets = (0.0001,) * 3  # says what its values mean: about as stored
    run_scene(tmp_path / "both", ckpt, pre, post, *joint)
    assert (read_band(tmp_path / "both" / "run" / "pre" / "change.tif") == 0).all()


def test_16_bit_four_band_scene_equals_its_8_bit_rgb_conversion(tmp_path, ckpt, pair, threshold):
    rgb = [read_band(p, None) for p in pair]  # 3 x H x W uint8
    rng = np.random.default_rng(0)
    # 12-bit reflectance in BGRN band order: bands=[3,2,1] is red, green, blue
    sixteen = [
        np.concatenate(
            [
                (x[::-1].astype(np.uint16) * 16 + 100),
                rng.integers(0, 4096, (1, 128, 128), dtype=np.uint16),
            ]
        )
        for x in rgb
    ]
    paths = [
        write_scene(tmp_path / f"{d}16.tif", s, bands_first=True)
        for d, s in zip(("pre", "post"), sixteen, strict=True)
    ]
    fixed = [
        "input.bands=[3,2,1]",
        "input.scale=fixed",
        "input.scale_min=100",
        f"input.scale_max={100 + 255 * 16}",
    ]
    run_scene(
        tmp_path / "fixed", ckpt, *paths, f"threshold={threshold}", "explain.enabled=false", *fixed
    )
    run_scene(tmp_path / "rgb", ckpt, *pair, f"threshold={threshold}", "explain.enabled=false")
    for raster in ("change.tif", "probability.tif"):  # the same network input, to the value
        np.testing.assert_array_equal(
            read_band(tmp_path / "fixed" / "run" / "pre16" / raster),
            read_band(tmp_path / "rgb" / "run" / "pre" / raster),
        )

    # percentile stretch: the 8-bit conversion with the stretch the run reports gives the same mask
    report = run_scene(
        tmp_path / "pct",
        ckpt,
        *paths,
        f"threshold={threshold}",
        "explain.enabled=false",
        "input.bands=[3,2,1]",
    )
    scaling = report["scenes"][0]["scaling"]
    converted = []
    for date, data in zip(("pre", "post"), sixteen, strict=True):
        lo = np.array(scaling[date]["lo"])[:, None, None]
        hi = np.array(scaling[date]["hi"])[:, None, None]
        eight = np.rint(np.clip((data[[2, 1, 0]].astype(float) - lo) / (hi - lo) * 255, 0, 255))
        converted.append(
            write_scene(tmp_path / f"{date}8.tif", eight.astype(np.uint8), bands_first=True)
        )
    run_scene(
        tmp_path / "eight", ckpt, *converted, f"threshold={threshold}", "explain.enabled=false"
    )
    for raster in ("change.tif", "probability.tif"):
        np.testing.assert_array_equal(
            read_band(tmp_path / "pct" / "run" / "pre16" / raster),
            read_band(tmp_path / "eight" / "run" / "pre8" / raster),
        )
    # the stretch is the 2-98 % of the valid pixels of each band (here every pixel: 128² is
    # under the sample's side, so the sample is the whole scene)
    for date, data in zip(("pre", "post"), sixteen, strict=True):
        expected = np.percentile(data[[2, 1, 0]].reshape(3, -1).astype(float), [2, 98], axis=1)
        np.testing.assert_allclose(scaling[date]["lo"], expected[0])
        np.testing.assert_allclose(scaling[date]["hi"], expected[1])


@pytest.mark.parametrize("only_one_date", ["beyond the pre grid", "under post nodata"])
def test_the_percentile_stretch_reads_pixels_valid_in_both_dates(
    tmp_path, ckpt, threshold, only_one_date
):
    """Two 12-bit dates with the same pixels where both have data: a bright field that only one
    date has (beyond the other's footprint, or under its nodata) must not stretch the dates
    differently, or the same values read as change everywhere."""
    pre8, _ = synthetic_pair(128)
    pre = pre8.astype(np.uint16) * 40 + 1000
    if only_one_date == "beyond the pre grid":  # 64 more columns east: the post is reprojected
        post = np.concatenate([pre, np.full((128, 64, 3), 12000, np.uint16)], axis=1)
        nodata = {}
    else:
        pre[:, :40] = 9000
        post = pre.copy()
        post[:, :40] = 0
        nodata = {"nodata": 0}
    paths = [
        write_scene(tmp_path / "pre.tif", pre, **nodata),
        write_scene(tmp_path / "post.tif", post, **nodata),
    ]
    report = run_scene(tmp_path, ckpt, *paths, f"threshold={threshold}", "explain.enabled=false")
    summary = report["scenes"][0]
    assert summary["post_reprojected"] is (only_one_date == "beyond the pre grid")
    assert summary["scaling"]["pre"] == summary["scaling"]["post"]
    assert summary["valid_pixels"] == (128 * 128 if not nodata else 128 * 88)
    assert summary["changed_pixels"] == 0


def assert_same_outputs(folder: Path, other: Path) -> None:
    """Two runs' outputs agree: the mask exactly, the probability to its last step, the
    explanation to float rounding (windows batched differently after a resume), the polygons
    exactly (their post share to float rounding)."""
    np.testing.assert_array_equal(read_band(folder / "change.tif"), read_band(other / "change.tif"))
    p_a = read_band(folder / "probability.tif").astype(int)
    assert np.abs(p_a - read_band(other / "probability.tif").astype(int)).max() <= 1
    ours_e, theirs_e = (read_band(f / "explanation.tif", None) for f in (folder, other))
    np.testing.assert_allclose(ours_e[:2], theirs_e[:2], rtol=1e-3, atol=1e-9)  # the maps
    np.testing.assert_allclose(ours_e[2], theirs_e[2], atol=1e-4)  # share: a ratio of small sums
    ours, theirs = (
        json.loads((f / "change.geojson").read_text())["features"] for f in (folder, other)
    )
    assert [f["geometry"] for f in ours] == [f["geometry"] for f in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["properties"]["pixels"] == b["properties"]["pixels"]
        assert a["properties"]["mean_probability"] == pytest.approx(
            b["properties"]["mean_probability"], abs=2e-5
        )
        assert a["properties"]["post_share"] == pytest.approx(
            b["properties"]["post_share"], rel=1e-3
        )


def killed_after_two_blocks(run, ckpt, pair, overrides, monkeypatch) -> Path:
    """A run of ``pair`` into ``run`` stopped as a kill stops it, with two blocks written and
    logged; returns the scene's folder."""
    real = changecam.geo.write.SceneFiles.write_block
    calls = {"n": 0}

    def dies_after_two(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(changecam.geo.write.SceneFiles, "write_block", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_scene(run, ckpt, *pair, *overrides)
    monkeypatch.setattr(changecam.geo.write.SceneFiles, "write_block", real)
    return run / "run" / "pre"


def test_rasters_only_and_a_resume_that_adds_the_polygons(
    tmp_path, ckpt, pair, threshold, monkeypatch
):
    overrides = [f"threshold={threshold}", "explain.enabled=false"]
    rasters_only = ["predict.polygons=false", "predict.overviews=false"]
    run_scene(tmp_path / "whole", ckpt, *pair, *overrides)
    whole = tmp_path / "whole" / "run" / "pre"
    report = run_scene(tmp_path / "rasters", ckpt, *pair, *overrides, *rasters_only)
    folder = tmp_path / "rasters" / "run" / "pre"
    assert report["scenes"][0]["polygons"] is None and not report["scenes"][0]["overviews"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "blocks.jsonl",
        "change.tif",
        "probability.tif",
        "scene.json",
    ]
    for name in ("change.tif", "probability.tif"):
        with rasterio.open(folder / name) as ours, rasterio.open(whole / name) as theirs:
            assert ours.overviews(1) == [] and theirs.overviews(1) == [2, 4]
            np.testing.assert_array_equal(ours.read(1), theirs.read(1))
    # killed with rasters only, resumed with the polygons: the two blocks it kept are traced
    # from the rasters, the other two as they are written
    folder = killed_after_two_blocks(
        tmp_path / "killed", ckpt, pair, [*overrides, *rasters_only], monkeypatch
    )
    report = run_scene(tmp_path / "killed", ckpt, *pair, *overrides, "predict.resume=true")
    assert report["scenes"][0]["resumed_blocks"] == 2 and report["scenes"][0]["overviews"]
    ours, theirs = (
        json.loads((f / "change.geojson").read_text())["features"] for f in (folder, whole)
    )
    assert ours and [f["geometry"] for f in ours] == [f["geometry"] for f in theirs]
    assert [f["properties"]["pixels"] for f in ours] == [f["properties"]["pixels"] for f in theirs]
    with rasterio.open(folder / "change.tif") as src:
        assert src.overviews(1) == [2, 4]
    # refused by the config guard, before the scene (SceneSettings refuses it too, for the API)
    with pytest.raises(ConfigError, match="predict.polygons='no' must be true or false"):
        run_scene(tmp_path / "bad", ckpt, *pair, "predict.polygons=no")
    assert not (tmp_path / "bad" / "run" / "pre").exists()


def test_a_killed_run_resumes_to_the_same_outputs(tmp_path, ckpt, pair, threshold, monkeypatch):
    overrides = [f"threshold={threshold}"]
    pair = tuple(Path(shutil.copy(path, tmp_path / path.name)) for path in pair)  # touched below
    run_scene(tmp_path / "whole", ckpt, *pair, *overrides)
    folder = killed_after_two_blocks(tmp_path / "killed", ckpt, pair, overrides, monkeypatch)
    assert not list(folder.glob("*.tif")) and not list(folder.glob("*.geojson"))
    assert not (folder / "scene.json").exists()
    assert not (tmp_path / "killed" / "run" / "predictions.json").exists()
    report = run_scene(tmp_path / "killed", ckpt, *pair, *overrides, "predict.resume=true")
    assert report["scenes"][0]["resumed_blocks"] == 2 and report["scenes"][0]["blocks"] == 4
    assert_same_outputs(folder, tmp_path / "whole" / "run" / "pre")
    mtime = (folder / "change.tif").stat().st_mtime_ns
    again = run_scene(tmp_path / "killed", ckpt, *pair, *overrides, "predict.resume=true")
    assert again["scenes"] == report["scenes"], "a finished scene is kept as it is"
    assert (folder / "change.tif").stat().st_mtime_ns == mtime
    with pytest.raises(SceneFailure, match="predict.resume=true but .* other settings"):
        run_scene(tmp_path / "killed", ckpt, *pair, "threshold=0.1", "predict.resume=true")
    # another post file of the same size, copied in with the old one's modification time
    # (cp -p, rsync -a): no setting can resume it
    stat = pair[1].stat()
    replacement = tmp_path / "other_post.tif"
    write_scene(replacement, read_band(pair[0], None), bands_first=True)
    assert replacement.stat().st_size == stat.st_size
    os.replace(replacement, pair[1])
    os.utime(pair[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(
        SceneFailure,
        match=r"the input files are not those .* \(post\.sample_sha256: \"\w+\" -> \"\w+\"\).* "
        "rerun without predict.resume",
    ):
        run_scene(tmp_path / "killed", ckpt, *pair, *overrides, "predict.resume=true")


def test_a_killed_appends_partial_line_is_gone_from_the_resumed_log(
    tmp_path, ckpt, pair, threshold, monkeypatch, caplog
):
    """The partial line a kill left in ``blocks.jsonl`` is warned about once, by the resume that
    finds it (its several readers of the log read it once), not by every later one: that resume
    writes the log again without it, and its own records go on lines of their own."""
    folder = killed_after_two_blocks(tmp_path, ckpt, pair, [f"threshold={threshold}"], monkeypatch)
    log_path = folder / "blocks.jsonl"
    with open(log_path, "a") as f:
        f.write('{"block": 2, "changed": 1')  # the third block's record, cut by the kill
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="changecam"):
        report = run_scene(tmp_path, ckpt, *pair, f"threshold={threshold}", "predict.resume=true")
    assert caplog.text.count("line 4 is incomplete") == 1
    assert report["scenes"][0]["resumed_blocks"] == 2
    lines = log_path.read_text().splitlines()
    assert [json.loads(line).get("block") for line in lines] == [None, 0, 1, 2, 3]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="changecam"):
        run_scene(tmp_path, ckpt, *pair, f"threshold={threshold}", "predict.resume=true")
    assert "incomplete" not in caplog.text


@pytest.mark.parametrize("partial", [".probability.tif.part", ".explanation.tif.part"])
def test_a_partial_raster_cut_short_is_computed_again(
    tmp_path, ckpt, pair, threshold, monkeypatch, caplog, partial
):
    """A partial raster whose last tiles are gone (a full disk, a copy cut short) is not
    resumed from: its header lists tiles past its end (the probability's last ones are its
    internal mask's), so the scene starts over, saying which file, and ends as a whole run."""
    overrides = [f"threshold={threshold}"]
    run_scene(tmp_path / "whole", ckpt, *pair, *overrides)
    folder = killed_after_two_blocks(tmp_path / "killed", ckpt, pair, overrides, monkeypatch)
    damaged = folder / partial
    os.truncate(damaged, damaged.stat().st_size - 100)
    with caplog.at_level(logging.WARNING, logger="changecam"):
        report = run_scene(tmp_path / "killed", ckpt, *pair, *overrides, "predict.resume=true")
    assert f"{damaged} is truncated" in caplog.text and "starting over" in caplog.text
    assert report["scenes"][0]["resumed_blocks"] == 0
    assert_same_outputs(folder, tmp_path / "whole" / "run" / "pre")


def test_a_finished_scene_survives_a_metadata_change_and_an_older_log(tmp_path, ckpt, pair):
    """chmod (ctime) changes no input, and a log written before changecam recorded the network
    and the inputs' content samples resumes as it did: the finished scene is kept; a run that
    starts over from it writes every key again."""
    pair = tuple(Path(shutil.copy(path, tmp_path / path.name)) for path in pair)
    run_scene(tmp_path, ckpt, *pair, "explain.enabled=false")
    folder = tmp_path / "run" / "pre"
    log_path = folder / "blocks.jsonl"
    lines = log_path.read_text().splitlines()
    header = json.loads(lines[0])
    settings = header["settings"]
    assert "network" in settings and "sample_sha256" in settings["post"]
    for date in ("pre", "post"):
        del settings[date]["sample_sha256"]
    for key in ("network", "checkpoint_size", "checkpoint_sample_sha256"):
        del settings[key]
    log_path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    pair[1].chmod(0o444)
    mtime = (folder / "change.tif").stat().st_mtime_ns
    report = run_scene(tmp_path, ckpt, *pair, "explain.enabled=false", "predict.resume=true")
    assert report["scenes"][0]["changed_pixels"] > 0
    assert (folder / "change.tif").stat().st_mtime_ns == mtime, "kept, not predicted again"
    # the same old header, rasters gone: the run starts over and logs what it records now
    log_path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    (folder / "scene.json").unlink()
    for raster in folder.glob("*.tif"):
        raster.unlink()
    run_scene(tmp_path, ckpt, *pair, "explain.enabled=false", "predict.resume=true")
    settings = json.loads(log_path.read_text().splitlines()[0])["settings"]
    assert "network" in settings and "sample_sha256" in settings["post"]
    assert "checkpoint_sample_sha256" in settings


def test_gdal_threads_reach_the_writer_thread_and_change_no_value(
    tmp_path, ckpt, pair, threshold, monkeypatch
):
    real = changecam.geo.write.SceneFiles.write_block
    seen: dict[str, set] = {}

    def recording(self, *args, **kwargs):
        seen.setdefault(self.folder.parent.parent.name, set()).add(
            rasterio.env.get_gdal_config("GDAL_NUM_THREADS")
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(changecam.geo.write.SceneFiles, "write_block", recording)
    before = rasterio.env.get_gdal_config("GDAL_NUM_THREADS")
    run_scene(tmp_path / "one", ckpt, *pair, f"threshold={threshold}", "predict.gdal_threads=1")
    run_scene(tmp_path / "every_cpu", ckpt, *pair, f"threshold={threshold}")  # the default
    assert seen == {"one": {1}, "every_cpu": {"ALL_CPUS"}}  # rasterio reads "1" as 1
    assert rasterio.env.get_gdal_config("GDAL_NUM_THREADS") == before, "restored after the run"
    one, every = (tmp_path / name / "run" / "pre" for name in ("one", "every_cpu"))
    for raster in ("change", "probability", "explanation"):
        np.testing.assert_array_equal(
            read_band(one / f"{raster}.tif", None), read_band(every / f"{raster}.tif", None)
        )
    assert (one / "change.geojson").read_text() == (every / "change.geojson").read_text()
    for bad in ("0", "ALL_CPUS"):
        with pytest.raises(SceneError, match="predict.gdal_threads=.* must be an integer >= 1"):
            run_scene(tmp_path / "bad", ckpt, *pair, f"predict.gdal_threads={bad}")
    assert not (tmp_path / "bad" / "run" / "pre").exists()


def test_gdal_block_cache_is_128_mib_while_a_scene_runs(
    tmp_path, ckpt, pair, threshold, monkeypatch
):
    # rasterio reads an integer GDAL_CACHEMAX as bytes: 128 would be a 128-byte cache, under
    # which every tile an overview or a decimated read touches is decoded again and again
    real = changecam.geo.write.SceneFiles.write_block
    seen: set = set()

    def recording(self, *args, **kwargs):
        seen.add(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))  # GDAL's own size, in bytes
        return real(self, *args, **kwargs)

    monkeypatch.setattr(changecam.geo.write.SceneFiles, "write_block", recording)
    before = rasterio.env.get_gdal_config("GDAL_CACHEMAX")
    run_scene(tmp_path, ckpt, *pair, f"threshold={threshold}")
    assert seen == {128 * 1024 * 1024}
    assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == before, "restored after the run"


def test_a_trained_unet_predicts_and_explains_a_scene_like_its_whole_image(
    tmp_path, unet_ckpt, pair
):
    report = run_scene(tmp_path, unet_ckpt, *pair)
    folder = tmp_path / "run" / "pre"
    summary = report["scenes"][0]
    assert summary["explain_layer"] == "enc2"  # the U-Net's deepest per-date layer
    net = load_network(unet_ckpt)
    x_pre, x_post = (image_to_tensor(changed_pair(128)[i])[None] for i in (0, 1))
    expected = torch.sigmoid(sliding_window_logits(net, x_pre, x_post, SlidingWindow(window=32)))
    got = read_band(folder / "probability.tif") / 65535
    np.testing.assert_allclose(got, expected[0, 0].numpy(), atol=0.5 / 65535 + 1e-6)
    explanation = read_band(folder / "explanation.tif", None)
    assert np.isfinite(explanation[:2]).all() and np.abs(explanation[:2]).max() > 0
    # each window's HiResCAM of its own predicted change (explain_batch, checked against
    # captum elsewhere), blended like the logits by the whole-image sliding window: a wrong
    # sign, a swap of the dates or another target passed the check above (helper-144)
    target = Target("predicted", threshold=report["threshold"])

    class Explained(torch.nn.Module):
        size_multiple = net.size_multiple

        def forward(self, pre, post):
            exp = explain_batch(net, pre, post, taps=["enc2"], target=target, methods=["hirescam"])
            maps = [exp.map(f"{d}/enc2", "hirescam", upsampled=True) for d in ("pre", "post")]
            return torch.stack(maps, dim=1)

    expected = sliding_window_logits(Explained(), x_pre, x_post, SlidingWindow(window=32))[0]
    assert expected.abs().max() > 0
    np.testing.assert_allclose(explanation[:2], expected.numpy(), rtol=1e-4, atol=1e-6)


def test_a_contrastive_explanation_splits_difference_evidence_evenly(
    tmp_path, ckpt, pair, threshold
):
    """DifferenceNet's logit is ``gain * sum |A_post - A_pre| - offset``: date-contrastive
    HiResCAM gives both dates ``gain * |A_post - A_pre|`` summed over the bands, the same map,
    so every post share is exactly 0.5, the polygons' too (HiResCAM's differ)."""
    report = run_scene(
        tmp_path, ckpt, *pair, f"threshold={threshold}", "explain.method=contrastive"
    )
    summary = report["scenes"][0]
    assert summary["explain_method"] == "contrastive"
    assert summary["explanation_bands"] == ["pre_contrastive", "post_contrastive", "post_share"]
    folder = tmp_path / "run" / "pre"
    with rasterio.open(folder / "explanation.tif") as src:
        assert src.descriptions == ("pre_contrastive", "post_contrastive", "post_share")
        assert src.tags()["explain_method"] == "contrastive"
        pre, post, share = src.read()
    np.testing.assert_array_equal(pre, post)
    assert pre[roof_mask()].min() > 0
    assert np.unique(share[np.isfinite(share)]).tolist() == [0.5]
    assert summary["post_share"] == 0.5
    polygons = json.loads((folder / "change.geojson").read_text())["features"]
    assert {f["properties"]["post_share"] for f in polygons} == {0.5}

    hirescam = run_scene(tmp_path / "h", ckpt, *pair, f"threshold={threshold}")["scenes"][0]
    assert hirescam["explain_method"] == "hirescam" and hirescam["post_share"] != 0.5
    # a scene explains each window's prediction, as ever: the PNG path's record of what it
    # explains is not a scene's setting (it refused scenes finished before it, helper-157)
    started = json.loads((tmp_path / "h/run/pre/blocks.jsonl").read_text().splitlines()[0])
    assert "threshold" in started["settings"]
    assert "explained_prediction" not in started["settings"]


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
@pytest.mark.parametrize("alpha", ["added by the reprojection", "the file's own"])
def test_an_alpha_band_masks_every_data_type(tmp_path, ckpt, dtype, alpha):
    """GDAL takes an alpha band as a mask for 8- and 16-bit unsigned bands only: the alpha a
    reprojection adds to a post scene without nodata, or a file's own, must mask int16 and
    float scenes too (everything valid is change here, so a missed mask is change)."""
    pre, post = changed_pair(128)
    pre_path = write_scene(tmp_path / "pre.tif", pre.astype(dtype))
    covered = np.zeros((128, 128), bool)
    covered[:, 64:] = True
    if alpha == "added by the reprojection":  # the post covers the right half only
        east = Affine.translation(64 * PIXEL, 0) @ TRANSFORM
        post_path = write_scene(tmp_path / "post.tif", post[:, 64:].astype(dtype), transform=east)
        extra = []
    else:
        opacity = np.where(covered, 255, 0).astype(np.uint8)[..., None]
        post_path = write_scene(
            tmp_path / "post.tif",
            np.concatenate([post, opacity], axis=2).astype(dtype),
            photometric="RGB",
            alpha="YES",
        )
        extra = ["input.bands=[1,2,3]"]
    scale = ["input.scale=fixed", "input.scale_min=0", "input.scale_max=255"]
    report = run_scene(
        tmp_path,
        ckpt,
        pre_path,
        post_path,
        "threshold=0.0",
        "explain.enabled=false",
        *scale,
        *extra,
    )
    change = read_band(tmp_path / "run" / "pre" / "change.tif")
    np.testing.assert_array_equal(change == 255, ~covered)
    assert (change[covered] == 1).all()
    assert report["scenes"][0]["valid_pixels"] == covered.sum()


def test_nodata_is_judged_on_the_selected_bands(tmp_path, ckpt):
    """A pixel whose selected bands all hold the nodata value is nodata, whatever the bands left
    out hold; one where only a left-out band is nodata is valid."""
    pre, post = changed_pair(128)
    nir = np.full((128, 128, 1), 50, np.uint8)
    pre4, post4 = (np.concatenate([image, nir], axis=2) for image in (pre, post))
    pre4[20:40, 20:40, :3] = 0  # no data in red, green, blue; the NIR band has a value
    post4[5:10, 5:10, 3] = 0  # only the NIR band, left out, is nodata
    paths = [
        write_scene(tmp_path / f"{name}.tif", image, nodata=0, photometric="MINISBLACK")
        for name, image in (("pre", pre4), ("post", post4))
    ]
    run_scene(
        tmp_path, ckpt, *paths, "threshold=0.0", "explain.enabled=false", "input.bands=[1,2,3]"
    )
    change = read_band(tmp_path / "run" / "pre" / "change.tif")
    invalid = np.zeros((128, 128), bool)
    invalid[20:40, 20:40] = True
    invalid |= (pre == 0).all(axis=2) | (post == 0).all(axis=2)  # generator pixels black in RGB
    np.testing.assert_array_equal(change == 255, invalid)


def test_a_nodata_value_comes_before_an_alpha_band(tmp_path, ckpt):
    """A 4-band uint8 file written with GDAL's defaults is labelled RGBA, though its fourth
    band is often near-infrared: with a nodata value, as in GDAL, that value decides and a 0
    in the fourth band is not a hole; without one, the alpha does."""
    pre, post = changed_pair(128)
    nir = np.full((128, 128, 1), 50, np.uint8)
    nir[5:10, 5:10] = 0  # dark water in the near-infrared
    pre4, post4 = (np.concatenate([image, nir], axis=2) for image in (pre, post))
    pre4[20:40, 20:40, :3] = 0  # no data in red, green, blue
    invalid = np.zeros((128, 128), bool)
    invalid[20:40, 20:40] = True
    invalid |= (pre == 0).all(axis=2) | (post == 0).all(axis=2)
    for nodata, holes in ((0, invalid), (None, nir[..., 0] == 0)):
        folder = tmp_path / str(nodata)
        paths = [
            write_scene(folder / f"{name}.tif", image, nodata=nodata)
            for name, image in (("pre", pre4), ("post", post4))
        ]
        with rasterio.open(paths[0]) as src:
            assert src.colorinterp[3] == ColorInterp.alpha
        overrides = ["threshold=0.0", "explain.enabled=false", "input.bands=[1,2,3]"]
        run_scene(folder, ckpt, *paths, *overrides)
        change = read_band(folder / "run" / "pre" / "change.tif")
        np.testing.assert_array_equal(change == 255, holes)


def test_pixels_outside_the_post_footprint_are_nodata(tmp_path, ckpt, pair, threshold):
    """A post scene that covers only the upper rows: the rest is nodata, never change, and no
    polygon reaches into it; a hole inside a roof is cut out of its polygon."""
    pre, post = changed_pair(128)
    with rasterio.open(pair[0]) as src:
        top = src.transform
    short = write_scene(tmp_path / "post_short.tif", post[:100], transform=top)
    hole = np.zeros((128, 128), bool)
    hole[58:62, 60:64] = True  # inside the roof that crosses the block edges
    pre_holed = pre.copy()
    pre_holed[hole] = 0
    pre_path = write_scene(tmp_path / "pre.tif", pre_holed, nodata=0)
    report = run_scene(tmp_path, ckpt, pre_path, short, f"threshold={threshold}")
    assert report["scenes"][0]["post_reprojected"] is True  # another size: another grid
    folder = tmp_path / "run" / "pre"
    change = read_band(folder / "change.tif")
    invalid = hole.copy()
    invalid[100:] = True
    invalid |= pre_holed.max(axis=2) == 0  # pre pixels that happen to be 0 in every band
    assert ((change == 255) == invalid).all()
    expected = roof_mask() & ~invalid
    assert (change[expected] == 1).all()
    features = json.loads((folder / "change.geojson").read_text())["features"]
    burnt = rasterize(
        [(shape(f["geometry"]), 1) for f in features], out_shape=(128, 128), transform=TRANSFORM
    )
    np.testing.assert_array_equal(burnt == 1, change == 1)
    holed = [shape(f["geometry"]) for f in features if shape(f["geometry"]).interiors]
    assert len(holed) == 1 and holed[0].interiors[0].envelope.area == pytest.approx(16 * PIXEL**2)


def test_a_folder_of_scene_pairs_batches_windows_and_shows_progress(
    tmp_path, ckpt, pair, monkeypatch, capfd
):
    """``input.dir`` with ``A/`` and ``B/`` GeoTIFFs paired by name; ``predict.batch_size``
    windows per forward pass; a progress bar in windows and megapixels."""
    import geo_scenes
    from changecam.cli.predict import predict
    from helpers import compose_train

    for folder in ("A", "B"):
        (tmp_path / "scenes" / folder).mkdir(parents=True)
    for name in ("east", "west"):
        for folder, source in zip(("A", "B"), pair, strict=True):
            (tmp_path / "scenes" / folder / f"{name}.tif").write_bytes(source.read_bytes())
    batches: list[int] = []
    real = geo_scenes.DifferenceNet.forward

    def recording(self, pre, post):
        batches.append(pre.shape[0])
        return real(self, pre, post)

    monkeypatch.setattr(geo_scenes.DifferenceNet, "forward", recording)
    overrides = [o for o in FAST if not o.startswith("predict.")]
    cfg = compose_train(
        tmp_path,
        [
            *overrides,
            "predict.block_size=64",
            "predict.batch_size=3",
            "predict.progress=true",
            f"ckpt_path={ckpt}",
            f"input.dir={tmp_path / 'scenes'}",
            "explain.enabled=false",
        ],
        "predict",
    )
    report = predict(cfg)
    assert [scene["name"] for scene in report["scenes"]] == ["east", "west"]
    for name in ("east", "west"):
        assert (read_band(tmp_path / "run" / name / "change.tif")[roof_mask()] == 1).all()
    # 5 x 5 windows of 32 px a scene (stride 24), each computed once, in batches of 3 (a
    # block's last one smaller); the bar and scene.json count each window once
    assert sum(batches) == 2 * 25 and max(batches) == 3 and set(batches) <= {1, 2, 3}
    assert report["scenes"][0]["windows"] == 25
    err = capfd.readouterr().err
    assert "25/25 [" in err and "window" in err and "0.02/0.02 MP" in err
    assert "scene east" in err and "scene west" in err


def test_the_overlay_figure_renders_a_predicted_scene(tmp_path, ckpt, pair, threshold, monkeypatch):
    from PIL import Image

    from helpers import script_module

    module = script_module("render_scene_overlay")
    # from another working folder than predict.py's, of inputs given relative to its own, and
    # without polygons (predict.polygons=false): both failed (helper-146)
    monkeypatch.chdir(pair[0].parent)
    relative = [Path(p.name) for p in pair]
    for polygons in ("true", "false"):
        run = tmp_path / polygons
        run_scene(
            run,
            ckpt,
            *relative,
            f"threshold={threshold}",
            "explain.enabled=false",
            f"predict.polygons={polygons}",
        )
        monkeypatch.chdir(tmp_path)
        out = module.render(run / "run" / "pre", run / "overlay.png", side=128)
        with Image.open(out) as image:
            width, height = image.size
            pixels = np.asarray(image.convert("RGB"))
        assert width > height > 300
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # the scene, not blank
        monkeypatch.chdir(pair[0].parent)


def test_the_overlay_script_draws_any_data_type_and_passes_every_override(monkeypatch):
    """A 16-bit post was drawn clipped to white, ``--side`` did not limit it, and ``--demo``'s
    first predict.py override was taken for the scene folder (helper-119)."""
    from helpers import script_module

    module = script_module("render_scene_overlay")
    wide = np.linspace(1000, 11200, 3 * 40 * 50).reshape(3, 40, 50).astype(np.uint16)
    shown = module.displayable(wide)
    assert shown.dtype == np.uint8 and shown.min() == 0 and shown.max() == 255
    assert 0.3 < (shown > 127).mean() < 0.7
    eight = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    assert module.displayable(eight) is eight
    # nodata (65535 here) takes no part in the stretch: the valid pixels were drawn 0..8
    valid = np.ones((40, 50), bool)
    valid[:, :20] = False
    holed = np.where(valid, wide, 65535).astype(np.uint16)
    shown = module.displayable(holed, valid)[:, valid]
    assert shown.min() == 0 and shown.max() == 255 and 0.3 < (shown > 127).mean() < 0.7
    for bad in (["--side", "0", "scene"], ["scene", "threshold=0.9"]):
        with pytest.raises(SystemExit):
            module.main(bad)  # --side 0 divided by zero; overrides without --demo were ignored
    seen = {}
    monkeypatch.setattr(
        module, "demo", lambda ckpt, size, work, overrides: seen.update(o=overrides)
    )
    monkeypatch.setattr(module, "render", lambda *a: "drawn")
    module.main(["--demo", "--ckpt", "a.ckpt", "predict.batch_size=2", "device=cpu"])
    assert seen["o"] == ["predict.batch_size=2", "device=cpu"]


def test_the_synthetic_scene_pair_is_georeferenced_and_tiled(tmp_path):
    from changecam.geo.synthetic import ORIGIN as SYNTHETIC_ORIGIN
    from changecam.geo.synthetic import PIXEL as SYNTHETIC_PIXEL
    from changecam.geo.synthetic import write_synthetic_scene

    pre, post = write_synthetic_scene(tmp_path, 300, tile=128)
    for path in (pre, post):
        with rasterio.open(path) as src:
            assert src.crs == rasterio.crs.CRS.from_epsg(32650)
            assert src.transform == rasterio.transform.from_origin(
                *SYNTHETIC_ORIGIN, SYNTHETIC_PIXEL, SYNTHETIC_PIXEL
            )
            assert (src.width, src.height, src.count, src.dtypes[0]) == (300, 300, 3, "uint8")
            assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
            assert src.profile["compress"] == "deflate"
    a, b = read_band(pre, None), read_band(post, None)
    assert a.std() > 10 and (a != b).any(), "generator scenes, with change between the dates"
    assert not np.array_equal(a[:, :128, :128], a[:, :128, 128:256]), "a new scene per tile"


def test_png_pairs_keep_the_png_path(tmp_path, ckpt):
    pre, post = synthetic_pair(64)
    write_png(tmp_path / "pre.png", pre)
    write_png(tmp_path / "post.png", post)
    report = run_scene(
        tmp_path, ckpt, tmp_path / "pre.png", tmp_path / "post.png", "explain.enabled=false"
    )
    assert [p["name"] for p in report["pairs"]] == ["pre"]
    assert read_probability(tmp_path / "run" / "probabilities" / "pre.png").shape == (64, 64)


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, unet_ckpt):
    import os
    import subprocess
    import sys

    from helpers import REPO, kill_when_logged, paused_after

    pre, post = synthetic_pair(512)
    paths = [write_scene(tmp_path / f"{d}.tif", x) for d, x in (("pre", pre), ("post", post))]
    args = [
        *FAST,
        f"ckpt_path={unet_ckpt}",
        f"input.pre={paths[0]}",
        f"input.post={paths[1]}",
        "threshold=0.61",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(run: Path, *extra: str) -> list[str]:
        return [sys.executable, str(REPO / "predict.py"), *args, f"hydra.run.dir={run}", *extra]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(  # waits after its third block until it is killed
        paused_after("changecam.geo.scene:BlockLog.add", 3, command(killed)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when_logged(proc, killed / "pre" / "blocks.jsonl", '"block"')
    assert not list((killed / "pre").glob("*.tif")) and not (killed / "predictions.json").exists()
    subprocess.run(command(killed, "predict.resume=true"), env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(command(whole), env=env, check=True, capture_output=True)
    summary = json.loads((killed / "pre" / "scene.json").read_text())
    assert summary["resumed_blocks"] == 3  # killed in the pause after the third block
    assert_same_outputs(killed / "pre", whole / "pre")


def test_the_runner_module_is_reachable_by_its_own_name():
    """``changecam.geo.predict_scene`` is the function the package exports; its module has another
    name, so patching or timing the module (benchmarks/scene_timeline.py) reaches the runner."""
    import importlib
    import inspect

    import changecam.geo

    module = importlib.import_module("changecam.geo.scene")
    assert inspect.ismodule(changecam.geo.scene) and changecam.geo.scene is module
    assert changecam.geo.predict_scene is module.predict_scene


@pytest.mark.parametrize("resume", [True, False])
def test_a_scene_gone_from_the_inputs_loses_its_outputs(tmp_path, ckpt, pair, caplog, resume):
    """Scenes x and y predicted, y's files then taken from input.dir, the run dir predicted
    again: y's folder, which looked finished beside a report that no longer lists it, is
    removed with a warning naming it (helper-71); x's is kept or predicted again."""
    from changecam.cli.predict import predict
    from helpers import compose_train

    for stem in ("x", "y"):
        for folder, source in zip(("A", "B"), pair, strict=True):
            target = tmp_path / "scenes" / folder / f"{stem}.tif"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    overrides = [*FAST, f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'scenes'}"]
    overrides.append("explain.enabled=false")
    predict(compose_train(tmp_path, overrides, "predict"))
    run = tmp_path / "run"
    (run / "y" / "notes.txt").write_text("the analyst's")  # not the scene's: kept
    for folder in ("A", "B"):
        (tmp_path / "scenes" / folder / "y.tif").unlink()
    again = [*overrides, f"predict.resume={str(resume).lower()}"]
    with caplog.at_level("WARNING", logger="changecam"):
        report = predict(compose_train(tmp_path, again, "predict"))
    assert [s["name"] for s in report["scenes"]] == ["x"]
    assert (
        "removing the outputs of 1 scene(s) that are not among this run's inputs: y" in caplog.text
    )
    assert sorted(p.name for p in (run / "y").iterdir()) == ["notes.txt"]
    assert (run / "x" / "scene.json").is_file()


def test_a_gdal_write_error_on_a_full_disk_stops_the_run_as_a_full_disk(
    tmp_path, ckpt, pair, monkeypatch, capsys
):
    """GDAL's write error names no cause; when a probe finds the disk full, the command stops
    with the documented message rather than GDAL's (helper-76)."""
    import rasterio.errors

    import changecam.cli.scenes as scenes
    from changecam.atomic import DiskFullError

    def gdal_write_error(self, *args, **kwargs):
        raise rasterio.errors.RasterioIOError("TIFFAppendToStrip:Write error at scanline 0")

    monkeypatch.setattr(changecam.geo.write.SceneFiles, "write_block", gdal_write_error)
    monkeypatch.setattr(scenes, "probed_disk_full", lambda folder, what: DiskFullError(what))
    with pytest.raises(SystemExit) as caught:
        run_scene(tmp_path, ckpt, *pair, "explain.enabled=false")
    assert caught.value.code == 1
    assert f"no space left on device while writing {tmp_path / 'run'}" in capsys.readouterr().err


def test_a_gdal_error_in_one_scene_fails_that_scene_alone_and_a_resume_finishes_it(
    tmp_path, ckpt, pair, monkeypatch
):
    """A GDAL error that is neither a refusal nor a full disk (here a write error on a disk
    with room) fails its scene alone: the other scenes are predicted, the report lists it, the
    command ends with an error naming it, nothing of it looks finished, and
    ``predict.resume=true`` finishes it as an uninterrupted run makes it."""
    import rasterio.errors

    for stem in ("bad", "ok"):
        for folder, source in zip(("A", "B"), pair, strict=True):
            target = tmp_path / "scenes" / folder / f"{stem}.tif"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    real_write_block = changecam.geo.write.SceneFiles.write_block
    written = {"bad": 0}

    def failing_in_bad(self, *args, **kwargs):
        if self.folder.name == "bad":
            written["bad"] += 1
            if written["bad"] == 2:  # after one block is on disk
                raise rasterio.errors.RasterioIOError("TIFFAppendToStrip:Write error")
        return real_write_block(self, *args, **kwargs)

    overrides = [
        *FAST,
        f"ckpt_path={ckpt}",
        f"input.dir={tmp_path / 'scenes'}",
        "explain.enabled=false",
        "predict.block_size=64",
    ]
    monkeypatch.setattr(changecam.geo.write.SceneFiles, "write_block", failing_in_bad)
    cfg = compose_train(tmp_path, overrides, "predict")
    with pytest.raises(
        SceneFailure, match=r"1 of 2 scene\(s\) refused or failed, with no output from this run"
    ):
        predict(cfg)
    run = tmp_path / "run"
    report = json.loads((run / "predictions.json").read_text())
    assert [s["name"] for s in report["scenes"]] == ["ok"]
    assert [f["name"] for f in report["failed"]] == ["bad"]
    assert "Write error" in report["failed"][0]["error"]
    assert written["bad"] == 2
    assert finished_looking(run / "bad") == []

    monkeypatch.setattr(changecam.geo.write.SceneFiles, "write_block", real_write_block)
    cfg = compose_train(tmp_path, [*overrides, "predict.resume=true"], "predict")
    resumed = predict(cfg)
    assert [s["name"] for s in resumed["scenes"]] == ["bad", "ok"]
    for name in ("change.tif", "probability.tif", "change.geojson"):
        assert (run / "bad" / name).read_bytes() != b""
    with (
        rasterio.open(run / "bad" / "change.tif") as a,
        rasterio.open(run / "ok" / "change.tif") as b,
    ):
        np.testing.assert_array_equal(a.read(), b.read())


def predict_with_one_refused(
    tmp_path: Path, ckpt: Path, pair, refused: str, post_crs: str | None = None
) -> dict:
    """predict.py on ``input.dir`` scenes ``refused`` and ``ok`` (copies of ``pair``; the
    refused one's post in ``post_crs`` if given), where ``refused`` is refused and ``ok``
    predicted; returns ``predictions.json``."""
    from changecam.cli.predict import predict
    from helpers import compose_train

    for stem in (refused, "ok"):
        for folder, source in zip(("A", "B"), pair, strict=True):
            target = tmp_path / "scenes" / folder / f"{stem}.tif"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    if post_crs is not None:
        with rasterio.open(pair[1]) as src:
            post = src.read().transpose(1, 2, 0)
        local = Affine(PIXEL, 0, 0, 0, -PIXEL, 64.0)
        write_scene(tmp_path / "scenes" / "B" / f"{refused}.tif", post, local, post_crs)
    cfg = compose_train(
        tmp_path,
        [*FAST, f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'scenes'}", "explain.enabled=false"],
        "predict",
    )
    with pytest.raises(
        SceneFailure, match=r"1 of 2 scene\(s\) refused, with no output from this run"
    ):
        predict(cfg)
    report = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert [s["name"] for s in report["scenes"]] == ["ok"]
    assert [f["name"] for f in report["failed"]] == [refused]
    return report


@pytest.mark.parametrize(
    "name", ["predictions.json", "predict.log", "predictions.jsonl", "masks", "panels"]
)
def test_a_scene_named_like_a_run_file_is_refused_and_the_others_run(tmp_path, ckpt, pair, name):
    """``<run>/<name>`` must not be the report (written last) or the run's log, nor the PNG
    path's log or folders, which a PNG run into the same folder clears (helper-134: a scene
    ``predictions.jsonl`` broke the next PNG run there): the scene is refused naming it, the
    other scenes are predicted and the report is written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "predict.log").write_text("the run's log\n")
    report = predict_with_one_refused(tmp_path, ckpt, pair, name)
    assert (
        f"would be written to {run / name}, which is the run directory's own"
        in (report["failed"][0]["error"])
    )
    assert (run / "predict.log").read_text() == "the run's log\n"


LOCAL_CRS = 'LOCAL_CS["arbitrary",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'


def test_a_post_scene_whose_crs_has_no_way_into_the_pre_crs_is_refused_alone(tmp_path, ckpt, pair):
    """A post scene in a local (engineering) CRS beside a UTM pre: PROJ's error is no
    RasterioError, and it stopped the whole run with no report (helper-134)."""
    report = predict_with_one_refused(tmp_path, ckpt, pair, "local", post_crs=LOCAL_CRS)
    error = report["failed"][0]["error"]
    assert f"{tmp_path / 'scenes' / 'B' / 'local.tif'}'s CRS" in error
    assert "cannot be taken into the CRS EPSG:32650" in error


def test_a_run_whose_every_scene_is_refused_writes_its_report(tmp_path, ckpt, pair):
    """The report lists the refused scenes under ``failed`` also when no scene was predicted
    (helper-134: none was written)."""
    with rasterio.open(pair[1]) as src:
        post = src.read().transpose(1, 2, 0)
    write_scene(tmp_path / "scenes" / "A" / "x.tif", post)
    write_scene(tmp_path / "scenes" / "B" / "x.tif", post[..., :2])  # 2 bands against 3
    cfg = compose_train(
        tmp_path,
        [*FAST, f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'scenes'}", "explain.enabled=false"],
        "predict",
    )
    report_file = tmp_path / "run" / "predictions.json"
    with pytest.raises(
        SceneFailure, match=rf"1 of 1 scene\(s\) refused.*see 'failed' in {report_file}"
    ):
        predict(cfg)
    report = json.loads(report_file.read_text())
    assert report["scenes"] == [] and [f["name"] for f in report["failed"]] == ["x"]


@pytest.mark.parametrize("stem", [".", ".."])
def test_a_scene_named_dot_or_dot_dot_is_refused_and_writes_nothing_outside_its_folder(
    tmp_path, ckpt, pair, stem
):
    """``...tif`` is scene ``..`` and ``..tif`` scene ``.``: ``<run>/<name>`` would be the run
    directory's parent or the run directory itself."""
    report = predict_with_one_refused(tmp_path, ckpt, pair, stem)
    assert f"is named {stem!r}" in report["failed"][0]["error"]
    scene_outputs = ("*.tif", "*.geojson", "scene.json", "blocks.jsonl")
    for folder in (tmp_path, tmp_path / "run"):
        assert not [p for pattern in scene_outputs for p in folder.glob(pattern)], folder


def test_a_joint_percentile_stretch_is_one_for_both_dates(tmp_path, ckpt, threshold):
    """New bright roofs over a tenth of a 12-bit post scene move its own 98th percentile, so
    ``percentile`` maps its unchanged pixels to other values than the pre date's; with
    ``percentile_joint`` both dates share one stretch, the 2-98 % of both samples together."""
    pre8, _ = synthetic_pair(128)
    pre = pre8.astype(np.uint16) * 40 + 1000
    post = pre.copy()
    post[:40, :40] = 16000  # a tenth of the scene, brighter than anything else
    paths = [write_scene(tmp_path / "pre.tif", pre), write_scene(tmp_path / "post.tif", post)]
    scaling = {}
    for scale in ("percentile", "percentile_joint"):
        report = run_scene(
            tmp_path / scale, ckpt, *paths, f"input.scale={scale}", "explain.enabled=false"
        )
        scaling[scale] = report["scenes"][0]["scaling"]
    from changecam.geo.bands import Scaling

    def network_input(record: dict, image: np.ndarray) -> np.ndarray:
        return Scaling(tuple(record["lo"]), tuple(record["hi"])).apply(image.transpose(2, 0, 1))

    unchanged = np.ones((128, 128), bool)
    unchanged[:40, :40] = False
    own = scaling["percentile"]
    assert own["post"]["hi"][0] == pytest.approx(16000)  # the roofs' value
    differs = network_input(own["pre"], pre) != network_input(own["post"], post)
    assert differs.any(axis=0)[unchanged].mean() > 0.9  # unchanged pixels darkened in the post
    joint = scaling["percentile_joint"]
    assert joint["pre"] == joint["post"]
    same = network_input(joint["pre"], pre) == network_input(joint["post"], post)
    assert same.all(axis=0)[unchanged].all()
    both = np.concatenate([pre.reshape(-1, 3), post.reshape(-1, 3)]).astype(float)
    expected = np.percentile(both, [2, 98], axis=0)
    np.testing.assert_allclose(joint["pre"]["lo"], expected[0])
    np.testing.assert_allclose(joint["pre"]["hi"], expected[1])


def test_a_joint_percentile_stretch_needs_one_data_type(tmp_path):
    from changecam.geo import SceneError, SceneSettings
    from changecam.geo.bands import pair_scalings
    from changecam.geo.grid import open_pair

    pre8, post8 = synthetic_pair(64)
    pre = write_scene(tmp_path / "pre.tif", pre8.astype(np.uint16) * 40)
    post = write_scene(tmp_path / "post.tif", post8.astype(np.int16))
    assert SceneSettings(scale="percentile_joint").scale == "percentile_joint"
    with (
        open_pair(pre, post) as pair,
        pytest.raises(
            SceneError, match=r"percentile_joint .*pre.tif holds uint16 and .*post.tif int16"
        ),
    ):
        pair_scalings(pair.pre, pair.post, (1, 2, 3), "percentile_joint")


def test_a_rerun_of_the_other_input_kind_removes_the_earlier_outputs(tmp_path, ckpt, pair):
    """Scenes, then PNG pairs into the same run folder (and the reverse) left the first run's
    outputs beside a report that did not list them (helper-100)."""
    images = changed_pair(128)
    pngs = [write_png(tmp_path / f"{name}.png", image) or tmp_path / f"{name}.png"
            for name, image in zip(("a", "b"), images, strict=True)]  # fmt: skip
    no_panels = ["explain.enabled=false"]
    run = tmp_path / "run"
    run_scene(tmp_path, ckpt, *pair, *no_panels)
    assert (run / "pre" / "scene.json").is_file()
    png = compose_train(
        tmp_path,
        [*FAST, f"ckpt_path={ckpt}", f"input.pre={pngs[0]}", f"input.post={pngs[1]}", *no_panels],
        "predict",
    )
    assert [p["name"] for p in predict(png)["pairs"]] == ["a"]
    assert not (run / "pre").exists(), "the earlier run's scene"
    assert (run / "masks" / "a.png").is_file()
    run_scene(tmp_path, ckpt, *pair, *no_panels)
    assert not (run / "masks" / "a.png").exists() and not (run / "predictions.jsonl").exists()
    assert (run / "pre" / "scene.json").is_file()
    # no predict run of PNG pairs here (an explain.py run's panels, say): nothing is removed
    write_png(run / "panels" / "explained.png", images[0])
    run_scene(tmp_path, ckpt, *pair, *no_panels)
    assert (run / "panels" / "explained.png").is_file()

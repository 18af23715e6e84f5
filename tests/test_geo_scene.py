"""GeoTIFF scenes: grids kept, reprojection, bands and scaling, nodata, polygons, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from torch import nn

from changecam.geo.predict_scene import SceneRun, predict_scene
from changecam.geo.scene import SceneError, SceneSettings
from changecam.models.sliding_window import SlidingWindow

UTM50 = CRS.from_epsg(32650)
ORIGIN = (500_000.0, 3_400_000.0)  # metres in EPSG:32650
PIXEL = 0.5
WINDOW = SlidingWindow(window=32, overlap=0.25, batch_size=4)


class BrightnessChange(nn.Module):
    """A known-answer change network: logit = 40 * (mean |post - pre| over channels - 0.25).

    Pixel-wise, so its mask is exactly the pixels whose dates differ by more than a quarter of
    the range, whatever the window, halo or block.
    """

    size_multiple = 1

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        return 40 * ((post - pre).abs().mean(dim=1, keepdim=True) - 0.25)


def scene_images(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pre = rng.integers(60, 120, (3, size, size)).astype(np.uint8)
    post = pre.copy()
    post[:, 20:40, 30:60] = 250  # a 20 × 30 px building appears
    post[:, 70:80, 10:20] = 250  # and a 10 × 10 px one
    return pre, post


def write_tif(
    path: Path, data: np.ndarray, transform=None, crs=UTM50, nodata=None, mkdir: bool = False
) -> Path:
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    transform = transform or from_origin(*ORIGIN, PIXEL, PIXEL)
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "transform": transform,
        "nodata": nodata,
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def run(tmp_path: Path, pre: Path, post: Path, name: str = "out", **kwargs) -> dict:
    scene = kwargs.pop("scene", SceneSettings())
    settings = SceneRun(block=kwargs.pop("block", 40), **kwargs)
    return predict_scene(BrightnessChange(), pre, post, tmp_path / name, WINDOW, scene, settings)


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    pre, post = scene_images()
    return write_tif(tmp_path / "pre.tif", pre), write_tif(tmp_path / "post.tif", post)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_outputs_keep_the_grid_and_polygons_match_the_mask(tmp_path, pair):
    summary = run(tmp_path, *pair)
    out = tmp_path / "out"
    mask = read(out / "change.tif")
    expected = np.zeros((96, 96), np.uint8)
    expected[20:40, 30:60] = 1
    expected[70:80, 10:20] = 1
    assert np.array_equal(mask, expected)
    with rasterio.open(pair[0]) as src:
        for name in ("change.tif", "probability.tif"):
            with rasterio.open(out / name) as ds:
                assert ds.crs == src.crs and ds.transform == src.transform
                assert ds.overviews(1)  # built for QGIS
    features = json.loads((out / "change.geojson").read_text())["features"]
    assert sorted(f["properties"]["area_m2"] for f in features) == [25.0, 150.0]  # px * 0.25 m²
    left, bottom, right, top = rasterio.open(pair[0]).bounds
    for f in features:
        for x, y in f["geometry"]["coordinates"][0]:
            assert left <= x <= right and bottom <= y <= top
        assert f["properties"]["mean_probability"] > 0.99
    assert summary["polygons"] == 2 and not list(out.glob("*.partial.tif"))
    # the area filter
    run(tmp_path, *pair, name="filtered", min_area_m2=100)
    kept = json.loads((tmp_path / "filtered" / "change.geojson").read_text())["features"]
    assert [f["properties"]["area_m2"] for f in kept] == [150.0]


def test_a_reprojected_post_scene_gives_the_same_mask(tmp_path, pair):
    pre, post = scene_images()
    coarse = post[:, ::2, ::2].copy()  # the post scene at 2 × the pixel size
    post2 = write_tif(tmp_path / "post_coarse.tif", coarse, from_origin(*ORIGIN, 1.0, 1.0))
    run(tmp_path, pair[0], pair[1], name="aligned")
    run(tmp_path, pair[0], post2, name="warped")
    a, b = read(tmp_path / "aligned" / "change.tif"), read(tmp_path / "warped" / "change.tif")
    assert a.shape == b.shape
    assert (a != b).mean() < 0.03  # resampling at the buildings' edges only
    with pytest.raises(SceneError, match="align=strict and the grids differ"):
        run(tmp_path, pair[0], post2, name="strict", scene=SceneSettings(align="strict"))
    assert not (tmp_path / "strict" / "change.tif").exists()


def test_nodata_in_either_date_stays_nodata(tmp_path):
    pre, post = scene_images()
    post = post.astype(np.uint8)
    post[:, 0:10, :] = 0
    pre_path = write_tif(tmp_path / "pre.tif", pre, nodata=0)
    post_path = write_tif(tmp_path / "post.tif", post, nodata=0)
    run(tmp_path, pre_path, post_path)
    mask = read(tmp_path / "out" / "change.tif")
    assert (mask[:10] == 255).all() and (mask[10:] != 255).all()
    assert (read(tmp_path / "out" / "probability.tif")[:10] == 0).all()


def test_sixteen_bit_four_bands_with_bands_equals_its_rgb_conversion(tmp_path):
    pre, post = scene_images()

    # a 4-band B, G, R, NIR 12-bit scene whose fixed 0-4095 scaling is exactly the 8-bit one
    def to16(rgb: np.ndarray) -> np.ndarray:
        wide = ((rgb.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)
        return np.stack([wide[2], wide[1], wide[0], np.full_like(wide[0], 1000)])

    p16 = write_tif(tmp_path / "pre16.tif", to16(pre))
    q16 = write_tif(tmp_path / "post16.tif", to16(post))
    scene = SceneSettings(bands=(3, 2, 1), scale="fixed", scale_min=0, scale_max=4095)
    run(tmp_path, p16, q16, name="wide", scene=scene)
    p8, q8 = write_tif(tmp_path / "pre8.tif", pre), write_tif(tmp_path / "post8.tif", post)
    run(tmp_path, p8, q8, name="rgb")
    assert np.array_equal(
        read(tmp_path / "wide" / "change.tif"), read(tmp_path / "rgb" / "change.tif")
    )
    with pytest.raises(SceneError, match="4 bands and .* 3"):
        run(tmp_path, p16, q8, name="counts")
    with pytest.raises(SceneError, match="band 5 is out of range"):
        run(tmp_path, p16, q16, name="range", scene=SceneSettings(bands=(5, 2, 1)))


def test_kill_and_resume_gives_the_same_outputs(tmp_path, pair):
    run(tmp_path, *pair, name="whole")

    class Killed(Exception):
        pass

    def kill_after_three(index: int) -> None:
        if index == 2:
            raise Killed

    with pytest.raises(Killed):
        predict_scene(
            BrightnessChange(),
            *pair,
            tmp_path / "killed",
            WINDOW,
            run=SceneRun(block=40),
            on_block=kill_after_three,
        )
    killed = tmp_path / "killed"
    assert not (killed / "change.tif").exists() and not (killed / "change.geojson").exists()
    seen: list[int] = []
    predict_scene(
        BrightnessChange(),
        *pair,
        killed,
        WINDOW,
        run=SceneRun(block=40, resume=True),
        on_block=seen.append,
    )
    assert seen == [3, 4, 5, 6, 7, 8]  # 9 blocks of 40² in 96²; the first three were kept
    for name in ("change.tif", "probability.tif"):
        assert np.array_equal(read(killed / name), read(tmp_path / "whole" / name))
    assert (killed / "change.geojson").read_text() == (
        tmp_path / "whole" / "change.geojson"
    ).read_text()


def test_bad_scenes_fail_clearly_and_leave_nothing_finished(tmp_path, pair):
    pre, post = scene_images()
    far = write_tif(tmp_path / "far.tif", post, from_origin(600_000.0, 3_400_000.0, PIXEL, PIXEL))
    with pytest.raises(SceneError, match="do not overlap"):
        run(tmp_path, pair[0], far, name="far")
    no_crs = write_tif(tmp_path / "nocrs.tif", post, crs=None)
    with pytest.raises(SceneError, match="has no CRS but the other scene has one"):
        run(tmp_path, pair[0], no_crs, name="nocrs")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(pair[1].read_bytes()[:300])
    with pytest.raises(SceneError, match="truncated.tif: not a readable GeoTIFF"):
        run(tmp_path, pair[0], truncated, name="truncated")
    empty = write_tif(tmp_path / "empty.tif", np.zeros_like(post, dtype=np.uint16), nodata=0)
    with pytest.raises(SceneError, match="empty.tif: every pixel is nodata"):
        run(tmp_path, empty, empty, name="empty")
    for name in ("far", "nocrs", "truncated", "empty"):
        assert not (tmp_path / name / "change.tif").exists()
        assert not (tmp_path / name / "change.geojson").exists()


def test_explanation_raster_and_each_polygons_post_share(tmp_path):
    """Gradient × input of the pixel-wise model: an appeared building's evidence is all post
    (post share 1), a vanished one's all pre (0)."""
    pre, post = scene_images()
    pre[:, 70:80, 10:20] = 250  # the small building vanishes instead of appearing
    post[:, 70:80, 10:20] = pre[:, 0:10, 0:10]
    a, b = write_tif(tmp_path / "pre.tif", pre), write_tif(tmp_path / "post.tif", post)
    run(tmp_path, a, b, explain_layer="input")
    out = tmp_path / "out"
    with rasterio.open(out / "explanation.tif") as ds, rasterio.open(a) as src:
        assert ds.count == 3 and ds.crs == src.crs and ds.transform == src.transform
        pre_map, post_map, share = ds.read()
    assert (post_map[20:40, 30:60] > 0).all() and (pre_map[20:40, 30:60] < 0).all()
    assert (share[20:40, 30:60] == 1).all() and (share[70:80, 10:20] == 0).all()
    features = json.loads((out / "change.geojson").read_text())["features"]
    shares = {f["properties"]["area_m2"]: f["properties"]["post_share"] for f in features}
    assert shares == {150.0: 1.0, 25.0: 0.0}

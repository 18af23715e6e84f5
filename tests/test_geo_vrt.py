"""GDAL VRTs as scenes: a stack of single-band files (what ``gdalbuildvrt -separate`` writes
for Sentinel-2's per-band files) predicts exactly like the stacked GeoTIFF, through
``input.pre``/``input.post`` and ``input.dir``, and so does one reading them from a zip; a
missing, truncated or unreadable source and a VRT that reads itself are refused before any
output; a resume refuses a scene whose source changed; large source blocks are warned about."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from changecam.cli.predict import predict
from changecam.geo import SceneError, SceneSettings, predict_scene
from changecam.geo.scene import input_record, made_from
from changecam.models import SiameseUNet
from changecam.models.sliding_window import SlidingWindow
from geo_scenes import (
    CRS,
    FAST,
    TRANSFORM,
    changed_pair,
    difference_checkpoint,
    read_band,
    run_scene,
    write_scene,
)
from helpers import compose_train
from test_geo_scene import assert_same_outputs

SPEC = SlidingWindow(window=32, batch_size=8)
SETTINGS = SceneSettings(block_size=64, progress=False)


def write_vrt(
    vrt: Path, sources: list[str], height: int, width: int, relative: bool = True
) -> Path:
    """At ``vrt``, a VRT whose band ``i`` is band 1 of ``sources[i]`` (on the test grid)."""
    bands = [
        f'<VRTRasterBand dataType="Byte" band="{i + 1}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="{int(relative)}">{source}</SourceFilename>'
        "<SourceBand>1</SourceBand>"
        f'<SourceProperties RasterXSize="{width}" RasterYSize="{height}" DataType="Byte" '
        'BlockXSize="32" BlockYSize="32"/>'
        f'<SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
        "</SimpleSource></VRTRasterBand>"
        for i, source in enumerate(sources)
    ]
    geotransform = ", ".join(str(v) for v in TRANSFORM.to_gdal())
    vrt.parent.mkdir(parents=True, exist_ok=True)
    vrt.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{CRS}</SRS>'
        f"<GeoTransform>{geotransform}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    return vrt


def write_band_stack(vrt: Path, sources: Path, image: np.ndarray, **profile) -> Path:
    """Each band of ``image`` (H x W x C) as a single-band GeoTIFF in ``sources``, and at
    ``vrt`` a VRT stacking them (paths relative to the VRT, as ``gdalbuildvrt`` writes)."""
    height, width, count = image.shape
    files = [
        write_scene(sources / f"band{i + 1}.tif", image[..., i : i + 1], **profile)
        for i in range(count)
    ]
    return write_vrt(vrt, [os.path.relpath(f, vrt.parent) for f in files], height, width)


def test_a_vrt_band_stack_predicts_like_the_stacked_geotiff(tmp_path):
    ckpt = difference_checkpoint(tmp_path / "difference.ckpt")
    pre, post = changed_pair(128)
    tif_pre = write_scene(tmp_path / "tif" / "scene.tif", pre)
    tif_post = write_scene(tmp_path / "tif_post" / "scene.tif", post)
    run_scene(tmp_path / "from_tif", ckpt, tif_pre, tif_post, "threshold=0.5")

    # input.pre / input.post
    vrt_pre = write_band_stack(tmp_path / "vrt" / "scene.vrt", tmp_path / "bands_pre", pre)
    vrt_post = write_band_stack(tmp_path / "vrt_post" / "scene.vrt", tmp_path / "bands_post", post)
    report = run_scene(tmp_path / "from_vrt", ckpt, vrt_pre, vrt_post, "threshold=0.5")
    assert [s["name"] for s in report["scenes"]] == ["scene"]
    tif_out, vrt_out = (tmp_path / run / "run" / "scene" for run in ("from_tif", "from_vrt"))
    assert read_band(vrt_out / "change.tif").sum() > 0
    assert_same_outputs(vrt_out, tif_out)
    with rasterio.open(vrt_out / "change.tif") as ours, rasterio.open(tif_pre) as scene:
        assert ours.crs == scene.crs and ours.transform == scene.transform

    # input.dir: A/ and B/ hold the VRTs only (their band files live elsewhere)
    for sub, image in (("A", pre), ("B", post)):
        write_band_stack(tmp_path / "dir" / sub / "scene.vrt", tmp_path / f"dir_{sub}", image)
    cfg = compose_train(
        tmp_path / "from_dir",
        [*FAST, f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'dir'}", "threshold=0.5"],
        "predict",
    )
    assert [s["name"] for s in predict(cfg)["scenes"]] == ["scene"]
    assert_same_outputs(tmp_path / "from_dir" / "run" / "scene", tif_out)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return SiameseUNet(base_channels=4, depth=2).eval()


@pytest.mark.parametrize("damage", ["missing", "truncated", "not a raster"])
def test_a_vrt_whose_source_is_missing_or_damaged_is_refused_naming_it(net, tmp_path, damage):
    pre, post = changed_pair(64)
    pre_vrt = write_band_stack(tmp_path / "pre.vrt", tmp_path / "pre_bands", pre)
    post_vrt = write_band_stack(tmp_path / "post.vrt", tmp_path / "post_bands", post)
    source = tmp_path / "post_bands" / "band2.tif"
    if damage == "missing":
        source.unlink()
        match = f"{post_vrt} reads {source}, which does not exist"
    elif damage == "truncated":
        source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        match = f"{source} is truncated"
    else:
        source.write_bytes(b"these are not the pixels you are looking for")
        match = f"{post_vrt} reads {source}, which cannot be read as a raster"
    out = tmp_path / "out"
    with pytest.raises(SceneError, match=match):
        predict_scene(net, pre_vrt, post_vrt, out, SPEC, SETTINGS)
    assert not out.exists() or not [p for p in out.rglob("*") if p.suffix in (".tif", ".json")]


def test_a_resume_refuses_a_vrt_whose_source_changed(net, tmp_path):
    pre, post = changed_pair(64)
    pre_vrt = write_band_stack(tmp_path / "pre.vrt", tmp_path / "pre_bands", pre)
    post_vrt = write_band_stack(tmp_path / "post.vrt", tmp_path / "post_bands", post)
    out = tmp_path / "out"
    predict_scene(net, pre_vrt, post_vrt, out, SPEC, SETTINGS)
    assert made_from(out, pre_vrt, post_vrt)
    # the VRT file itself is untouched: only its source says the scene is another one
    write_scene(tmp_path / "post_bands" / "band3.tif", np.zeros_like(post[..., :1]))
    assert not made_from(out, pre_vrt, post_vrt)
    # a resume refuses the changed scene and leaves no outputs made from the old one
    with pytest.raises(
        SceneError,
        match=r"the input files are not those .* \(post\.sources\[2\]\.mtime_ns: \d+ -> \d+[;)]",
    ):
        predict_scene(net, pre_vrt, post_vrt, out, SPEC, SETTINGS, resume=True)
    assert not (out / "change.tif").exists() and not (out / "scene.json").exists()


@pytest.mark.parametrize("through", ["directly", "through another VRT"])
def test_a_vrt_reading_itself_is_refused(net, tmp_path, through):
    """A VRT that reads itself (GDAL opens it lazily, and fails at the first pixel): refused
    as it is opened, not a recursion or a bare read error."""
    if through == "directly":
        write_vrt(tmp_path / "a.vrt", ["a.vrt"] * 3, 64, 64)
    else:
        write_vrt(tmp_path / "a.vrt", ["b.vrt"] * 3, 64, 64)
        write_vrt(tmp_path / "b.vrt", ["a.vrt"] * 3, 64, 64)
    pre = write_scene(tmp_path / "pre.tif", changed_pair(64)[0])
    with pytest.raises(SceneError, match="a.vrt reads itself"):
        predict_scene(net, pre, tmp_path / "a.vrt", tmp_path / "out", SPEC, SETTINGS)


def test_a_local_source_whose_name_has_a_colon_is_checked_and_recorded(net, tmp_path, monkeypatch):
    """``S2A_T31:tile.tif`` looks like a GDAL ``DRIVER:`` name, but it is a file: recorded for
    a resume like any file. Once gone it cannot be told from a GDAL name, so it is named when
    its first block is read, and no output looks finished."""
    monkeypatch.chdir(tmp_path)  # a source name not relative to the VRT is read from here
    pre, post = changed_pair(64)
    names = [f"S2A_T31:band{i + 1}.tif" for i in range(3)]
    for i, name in enumerate(names):
        write_scene(tmp_path / name, post[..., i : i + 1])
    post_vrt = write_vrt(tmp_path / "post.vrt", names, 64, 64, relative=False)
    record = input_record(post_vrt)
    assert [s["path"] for s in record["sources"]] == [str(tmp_path / n) for n in names]
    assert all("size" in s for s in record["sources"])
    (tmp_path / names[1]).unlink()
    pre_path = write_scene(tmp_path / "pre.tif", pre)
    with pytest.raises(SceneError, match="S2A_T31:band2.tif: No such file"):
        predict_scene(net, pre_path, post_vrt, tmp_path / "out", SPEC, SETTINGS)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".tif", ".json")]


def test_a_vrt_reading_a_zip_predicts_like_its_files(net, tmp_path):
    """Sources GDAL reads by a virtual name (``/vsizip/``, ``/vsicurl/``...) are not local
    files: they are read, not refused as missing, and recorded by name for a resume."""
    pre, post = changed_pair(64)
    plain = write_band_stack(tmp_path / "plain.vrt", tmp_path / "bands", post)
    archive = tmp_path / "bands.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for i in range(3):
            zipped.write(tmp_path / "bands" / f"band{i + 1}.tif", f"band{i + 1}.tif")
    names = [f"/vsizip/{archive}/band{i + 1}.tif" for i in range(3)]
    zipped_vrt = write_vrt(tmp_path / "zipped.vrt", names, 64, 64, relative=False)
    pre_path = write_scene(tmp_path / "pre.tif", pre)
    for post_path, out in ((plain, "plain"), (zipped_vrt, "zipped")):
        predict_scene(net, pre_path, post_path, tmp_path / out, SPEC, SETTINGS)
    np.testing.assert_array_equal(
        read_band(tmp_path / "zipped" / "probability.tif"),
        read_band(tmp_path / "plain" / "probability.tif"),
    )
    assert [s["path"] for s in input_record(zipped_vrt)["sources"]] == names


def test_a_vrt_over_a_file_of_large_blocks_is_warned_about(net, tmp_path, monkeypatch, caplog):
    """The VRT's own blocks say nothing of its sources': a source stored as one strip is
    named in the warning, with the command that tiles it."""
    import changecam.geo.grid

    monkeypatch.setattr(changecam.geo.grid, "LARGE_BLOCK_BYTES", 64 * 64 - 1)
    pre, post = changed_pair(64)
    strips = {"tiled": False, "blockysize": 64, "compress": "deflate"}
    post_vrt = write_band_stack(tmp_path / "post.vrt", tmp_path / "bands", post, **strips)
    pre_path = write_scene(tmp_path / "pre.tif", pre)
    with caplog.at_level("WARNING", logger="changecam"):
        predict_scene(net, pre_path, post_vrt, tmp_path / "out", SPEC, SETTINGS)
    warnings = [r.getMessage() for r in caplog.records if "blocks of" in r.getMessage()]
    assert len(warnings) == 1  # one for the VRT, not one per file (a mosaic has thousands)
    assert warnings[0].startswith(
        f"{post_vrt} reads 3 files stored in large blocks; the first: "
        f"{tmp_path / 'bands' / 'band1.tif'} is stored in blocks of 64x64 px"
    )

"""The background block writer: blocks on disk before the log lists them, in order, and an
error in either of its threads (writer, tracer) raised in the caller's."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin

import changecam.geo.write
from changecam.geo.grid import Grid
from changecam.geo.polygons import RegionTracer, geojson_crs
from changecam.geo.windows import Block
from changecam.geo.write import SETTINGS_TAG, SceneFiles, write_share_overviews
from changecam.geo.writer import BlockWriter
from geo_scenes import garble_first_tile

GRID = Grid(rasterio.crs.CRS.from_epsg(32650), from_origin(0, 32, 0.5, 0.5), 64, 32)
BLOCKS = [Block(i, 0, 32 * i, 32, 32, 0, 32 * i, 32, 32, (0,), (0,)) for i in range(2)]


TAG = "the settings' hash"


def scene_files(tmp_path) -> SceneFiles:
    files = SceneFiles(tmp_path, explain=False, tile=16)
    files.create(GRID, {SETTINGS_TAG: TAG})
    return files


def test_each_block_is_on_disk_before_the_log_lists_it(tmp_path):
    files = scene_files(tmp_path)
    first = np.full((32, 32), 0.9, np.float32)
    first[:, :8] = 0.1
    second = np.full((32, 32), 0.8, np.float32)
    valid = np.ones((32, 32), bool)
    logged = []

    def done(record):
        with rasterio.open(files.partial("change")) as src:
            record["on_disk"] = src.read(1, window=BLOCKS[record["block"]].window).tolist()
        logged.append(record)

    tracer = RegionTracer(GRID)
    with BlockWriter(files, tracer, 0.5, done) as writer:
        for block, probability in zip(BLOCKS, (first, second), strict=True):
            writer.submit(block, probability, valid, None)
    assert [r["block"] for r in logged] == [0, 1]
    assert [r["on_disk"] for r in logged] == [
        (first > 0.5).astype(np.uint8).tolist(),
        (second > 0.5).astype(np.uint8).tolist(),
    ]
    assert [r["changed"] for r in logged] == [24 * 32, 32 * 32]
    # one region across the inner edge: the two blocks' pieces joined, their sums added
    (feature,) = tracer.features()
    assert feature["properties"]["pixels"] == 56 * 32
    expected = (24 * 32 * round(0.9 * 65535) + 32 * 32 * round(0.8 * 65535)) / 65535 / (56 * 32)
    assert feature["properties"]["mean_probability"] == pytest.approx(
        expected, rel=1e-6
    )  # float32 values


def test_blocks_and_published_files_are_fsynced_before_they_count(tmp_path, monkeypatch):
    """Through a power loss too: the block's tiles before its log line, every whole file before
    its final name."""
    files = SceneFiles(tmp_path, explain=True, tile=16, polygons=False)
    files.create(GRID, {})
    events: list[str] = []
    real_fsync = changecam.geo.write.fsync_file
    monkeypatch.setattr(
        changecam.geo.write,
        "fsync_file",
        lambda path: (events.append(f"fsync {path.name}"), real_fsync(path))[1],
    )
    valid = np.ones((32, 32), bool)
    explanation = np.ones((3, 32, 32), np.float32)
    with BlockWriter(files, None, 0.5, lambda r: events.append(f"log {r['block']}")) as writer:
        for block in BLOCKS:
            writer.submit(block, np.full((32, 32), 0.9, np.float32), valid, explanation)
    partials = [f"fsync {files.partial(w).name}" for w in ("change", "probability", "explanation")]
    assert events == [*partials, "log 0", *partials, "log 1"]
    events.clear()
    files.publish()
    assert events == partials and all(files.final(w).is_file() for w in files.rasters)


def test_an_error_in_the_writer_is_raised_in_the_caller_and_nothing_after_it_is_logged(
    tmp_path, monkeypatch
):
    files = scene_files(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SceneFiles, "write_block", broken)
    logged = []
    probability, valid = np.zeros((32, 32), np.float32), np.ones((32, 32), bool)
    with pytest.raises(OSError, match="disk full"):
        with BlockWriter(files, RegionTracer(GRID), 0.5, logged.append) as writer:
            for block in BLOCKS:
                writer.submit(block, probability, valid, None)
    assert logged == []


def test_an_error_in_the_tracer_is_raised_in_the_caller(tmp_path, monkeypatch):
    files = scene_files(tmp_path)

    def broken(self, *args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(RegionTracer, "add_block", broken)
    logged = []
    probability, valid = np.full((32, 32), 0.9, np.float32), np.ones((32, 32), bool)
    with pytest.raises(RuntimeError, match="tracing failed"):
        with BlockWriter(files, RegionTracer(GRID), 0.5, logged.append) as writer:
            for block in BLOCKS:
                writer.submit(block, probability, valid, None)
    # written and logged before tracing: a resume traces logged blocks from the rasters
    assert [r["block"] for r in logged][:1] == [0]


def test_blocks_still_waiting_when_the_caller_fails_are_neither_written_nor_logged(
    tmp_path, monkeypatch
):
    import threading
    import time

    files = scene_files(tmp_path)
    real = SceneFiles.write_block
    writing = threading.Event()
    writers: list[BlockWriter] = []

    def slow(self, block, *args, **kwargs):
        writing.set()
        deadline = time.monotonic() + 120  # a hang guard: the caller's failure ends the wait
        while not writers[0].stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)  # block 0 finishes only once the caller has failed
        return real(self, block, *args, **kwargs)

    monkeypatch.setattr(SceneFiles, "write_block", slow)
    logged = []
    probability = np.full((32, 32), 0.9, np.float32)
    valid = np.ones((32, 32), bool)
    with pytest.raises(RuntimeError, match="the network failed"):
        with BlockWriter(files, None, 0.5, logged.append) as writer:
            writers.append(writer)
            writer.submit(BLOCKS[0], probability, valid, None)
            assert writing.wait(120)
            writer.submit(BLOCKS[1], probability, valid, None)  # waits in the queue
            raise RuntimeError("the network failed")
    assert [r["block"] for r in logged] == [0], "the block being written finishes; no other"
    with rasterio.open(files.partial("change")) as src:
        assert (src.read(1, window=BLOCKS[1].window) != 1).all(), "block 1 never written"


def explanation_raster(path, bands: np.ndarray, factors: list[int]) -> None:
    """A band-interleaved float32 explanation raster with GDAL's average overviews."""
    _, height, width = bands.shape
    profile = SceneFiles(path.parent, explain=True, tile=16).profile(
        "explanation", Grid(GRID.crs, GRID.transform, width, height)
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews(factors, Resampling.average)


def test_an_overview_share_is_the_share_of_the_evidence_it_covers(tmp_path):
    """Two 2 x 2 cells: per-pixel shares 0, NaN, NaN, 1 average to 0.5 (GDAL), but together
    the post date holds 3 of the 4 units of evidence; negative evidence counts as none."""
    pre = np.array([[1, 0, -5, 2], [0, 0, 0, 0]], np.float32)
    post = np.array([[0, 0, 2, -1], [0, 3, 0, 0]], np.float32)
    with np.errstate(invalid="ignore"):
        share = np.clip(post, 0, None) / (np.clip(pre, 0, None) + np.clip(post, 0, None))
    path = tmp_path / "explanation.tif"
    explanation_raster(path, np.stack([pre, post, share]), [2])
    with rasterio.open(path, overview_level=0) as src:
        assert src.read(3)[0, 0] == pytest.approx(0.5)  # GDAL's average of the shares
    write_share_overviews(path, [2])
    with rasterio.open(path, overview_level=0) as src:
        np.testing.assert_allclose(src.read(3), [[0.75, 0.5]])
        np.testing.assert_allclose(src.read(1), [[0.25, -0.75]])  # the evidence: GDAL's
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.read(1), pre)  # full resolution untouched
        assert "ReLU" in src.tags(3)["overview"]


def test_the_share_evidence_raster_is_a_bigtiff(tmp_path, monkeypatch):
    """Its two float bands and their overviews outgrow a classic TIFF's 4 GiB from about
    28000² (where explanation.tif itself is a BigTIFF): written as one whatever its size."""
    path = tmp_path / "explanation.tif"
    explanation_raster(path, np.ones((3, 8, 8), np.float32), [2])
    real_share_of, magics = changecam.geo.write.share_of, []

    def share_of(pre, post):  # called while the evidence raster is there
        (evidence,) = [p for p in tmp_path.iterdir() if p.name != "explanation.tif"]
        magics.append(evidence.read_bytes()[2:4])
        return real_share_of(pre, post)

    monkeypatch.setattr(changecam.geo.write, "share_of", share_of)
    write_share_overviews(path, [2])
    assert magics == [b"\x2b\x00"], "little-endian BigTIFF (43); a classic TIFF is 42"
    assert [p.name for p in tmp_path.iterdir()] == ["explanation.tif"]


@pytest.mark.parametrize("strip_pixels", [2, 1 << 20])
def test_share_overviews_of_every_level_are_the_evidence_sums(tmp_path, monkeypatch, strip_pixels):
    """Sides that are multiples of every factor: each overview pixel covers whole 2^k x 2^k
    cells, whose ReLU sums give the share; nodata and negative evidence count as none. Read a
    tile row at a time or whole."""
    monkeypatch.setattr(changecam.geo.write, "SHARE_STRIP_PIXELS", strip_pixels)
    rng = np.random.default_rng(0)
    height, width = 64, 48
    bands = rng.normal(size=(3, height, width)).astype(np.float32)
    bands[:2, :9, :11] = np.nan
    bands[:2, 40:60, 20:40] = -1.0  # no evidence: NaN share
    evidence = np.nan_to_num(np.clip(bands[:2], 0, None)).astype(np.float64)
    path = tmp_path / "explanation.tif"
    explanation_raster(path, bands, [2, 4, 8, 16])
    write_share_overviews(path, [2, 4, 8, 16])
    for level, factor in enumerate([2, 4, 8, 16]):
        sums = evidence.reshape(2, height // factor, factor, width // factor, factor).sum((2, 4))
        with np.errstate(invalid="ignore"):
            expected = np.where(sums.sum(0) > 0, sums[1] / sums.sum(0), np.nan)
        with rasterio.open(path, overview_level=level) as src:
            np.testing.assert_allclose(src.read(3), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("height", "width", "factors"),
    [
        (2, 7, (2, 4)),
        (75, 53, (2, 4, 8)),
        (33, 130, (2, 4, 8)),
        (320, 24, (2, 4, 8, 16)),  # rasterio reports 2, 4, 8, 12
        (1100, 5, (2, 4, 8)),  # rasterio reports 2, 2, 5
    ],
)
def test_share_overviews_follow_gdals_footprints_on_odd_sides(tmp_path, height, width, factors):
    """Where a side is not a multiple of the factor, GDAL's overview pixels cover fractional
    footprints (7 pixels into 4: 1.75 each). With non-negative evidence and no nodata (whose
    pixels GDAL leaves out of its averages, while they count as no evidence here) GDAL's own
    averages of bands 1 and 2 are those footprints' weighted means, so the share must be their
    ratio: any other footprint (e.g. aligned 2 x 2 cells) puts the share beside the evidence.
    Narrow scenes: rasterio reports the factors as width / overview width rounded, which
    gave the evidence another footprint or no level to read (helper-92)."""
    rng = np.random.default_rng(1)
    bands = np.abs(rng.normal(size=(3, height, width))).astype(np.float32)
    bands[:2, -(height // 3) :, -(width // 3) :] = 0.0
    if (height, width) == (2, 7):  # helper-25's case: pre in column 6, post in column 5
        bands[:2] = 0.0
        bands[0, :, 6], bands[1, :, 5] = 1.0, 1.0
    path = tmp_path / "explanation.tif"
    explanation_raster(path, bands, list(factors))
    write_share_overviews(path, list(factors))
    for level in range(len(factors)):
        with rasterio.open(path, overview_level=level) as src:
            pre, post, share = src.read().astype(np.float64)
        with np.errstate(invalid="ignore"):
            expected = np.where(pre + post > 0, post / (pre + post), np.nan)
        np.testing.assert_allclose(share, expected, rtol=1e-5, atol=1e-6)


def test_the_geojson_names_the_scenes_crs_exactly_and_probability_carries_its_scale(tmp_path):
    def name(crs) -> str:
        return geojson_crs(Grid(crs, GRID.transform, 64, 32))["properties"]["name"]

    assert name(GRID.crs) == "urn:ogc:def:crs:EPSG::32650"
    # a UTM zone on the International ellipsoid, no datum: ED50 (EPSG:23032) is a close
    # match, about 100 m off; its WKT is exact
    ellipsoid_only = rasterio.crs.CRS.from_string("+proj=utm +zone=32 +ellps=intl +units=m")
    assert not name(ellipsoid_only).startswith("urn:") and "International" in name(ellipsoid_only)
    # no member would read as WGS84
    assert name(None).startswith("LOCAL_CS[")
    files = scene_files(tmp_path)
    with rasterio.open(files.partial("probability")) as src:
        assert src.scales == (1 / 65535,) and src.offsets == (0.0,)


def test_blocks_are_compressed_at_gdals_default_level_not_the_creation_one(tmp_path):
    """What write.ZLEVEL's comment and the README say: a level given when a file is created does
    not outlive that session, so the DEFLATE blocks (change.tif's), each written in an update
    of the file, are compressed at GDAL's default level (6), not write.ZLEVEL (1). If a GDAL
    keeps the level, this fails: update the docs (and the benchmark figures)."""
    rng = np.random.default_rng(0)
    side = 256
    # a probability near the threshold: a change mask of scattered pixels, which the two
    # levels compress to different sizes
    probability = (0.5 + rng.normal(0, 0.1, (side, side))).astype(np.float32)
    grid = Grid(GRID.crs, GRID.transform, side, side)
    block = Block(0, 0, 0, side, side, 0, 0, side, side, (0,), (0,))
    files = SceneFiles(tmp_path / "scene", explain=False, tile=side)
    files.create(grid, {})
    written = files.write_block(block, probability, np.ones((side, side), bool), 0.5, None)
    with rasterio.open(files.partial("change")) as src:
        written_size = src.block_size(1, 0, 0)
    profile = files.profile("change", grid)  # the raster's own creation options
    assert profile["compress"] == "deflate"
    sizes = {}
    for level in (1, 6):
        path = tmp_path / f"level{level}.tif"
        with rasterio.open(path, "w", **{**profile, "zlevel": level}) as dst:
            dst.write(written.change, 1)
        with rasterio.open(path) as src:
            sizes[level] = src.block_size(1, 0, 0)
    assert changecam.geo.write.ZLEVEL == 1 and sizes[1] != sizes[6]
    assert written_size == sizes[6]


def test_probability_reads_back_as_encoded_with_its_mask(tmp_path):
    """probability.tif gives back every encoded value, 0 and 65535 included, and its mask."""
    rng = np.random.default_rng(1)
    probability = rng.random((32, 32)).astype(np.float32)
    probability[0, :8], probability[1, :8] = 0.0, 1.0
    valid = np.ones((32, 32), bool)
    valid[20:, 25:] = False
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        files = scene_files(tmp_path)  # masked: it may have nodata
        written = files.write_block(BLOCKS[0], probability, valid, 0.5, None)
        with rasterio.open(files.partial("probability")) as src:
            window = BLOCKS[0].window
            read, mask = src.read(1, window=window), src.read_masks(1, window=window)
        files.read_back([BLOCKS[0]])  # a resume's check decodes the block and its mask
    encoded = np.round(probability.astype(np.float64) * 65535).astype(np.uint16)  # README's p·65535
    assert encoded[0, :8].max() == 0 and encoded[1, :8].min() == 65535
    assert np.array_equal(read, encoded) and np.array_equal(read, written.probability)
    assert np.array_equal(mask > 0, valid)


def test_a_partial_raster_damaged_inside_is_named_when_read_back(tmp_path):
    """A resume traces the earlier run's blocks from its partial rasters: a tile garbled since
    (its bytes, not its length) fails there with the file named and the way out."""
    from changecam.geo.grid import SceneError

    files = scene_files(tmp_path)
    probability = np.full((32, 32), 0.9, np.float32)
    files.write_block(BLOCKS[0], probability, np.ones((32, 32), bool), 0.5, None)
    path = files.partial("change")
    garble_first_tile(path)
    tracer = RegionTracer(GRID)
    with pytest.raises(
        SceneError,
        match=r"\.change\.tif\.part, written by the run being resumed, "
        r"cannot be read back at block 0 .*rerun without predict.resume",
    ):
        tracer.add_from_rasters([BLOCKS[0]], path, files.partial("probability"), None)


@pytest.mark.parametrize("image", ["probability", "its mask"])
def test_a_resumes_read_back_names_a_garbled_tile_of_the_probability_or_its_mask(tmp_path, image):
    """The check a resume makes of the blocks it keeps decodes probability.tif's internal
    mask too (the polygons never read it): a garbled tile in either is named."""
    from changecam.geo.grid import SceneError

    valid = np.ones((32, 32), bool)
    valid[20:, 25:] = False
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        files = scene_files(tmp_path)  # masked: it may have nodata
        files.write_block(BLOCKS[0], np.full((32, 32), 0.7, np.float32), valid, 0.5, None)
        files.read_back([BLOCKS[0]])
        # the mask is the file's second image
        garble_first_tile(files.partial("probability"), 2 if image == "its mask" else 1)
        with pytest.raises(SceneError, match=r"\.probability\.tif\.part, written by the run"):
            files.read_back([BLOCKS[0]])


def test_a_partial_raster_cut_anywhere_is_not_taken_as_complete(tmp_path):
    """Cut at any byte, a partial raster with a block written is found short: its main image's
    tiles, its internal mask's directory, values and tiles are all checked against its length
    (GDAL reads a cut directory chain as ending there, and a cut mask as none)."""
    from changecam.geo.grid import SceneError, check_every_image_complete, tiff_directories

    files = scene_files(tmp_path)  # masked: probability.tif carries a mask
    probability = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    valid = np.ones((32, 32), bool)
    valid[:4] = False
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):  # inside the file, as predict_scene sets
        files.write_block(BLOCKS[0], probability, valid, 0.5, None)
    path = files.partial("probability")
    assert tiff_directories(path) == 2  # the image and its mask
    assert files.partials_readable(TAG)
    assert not files.partials_readable("another run's"), "made with other settings"
    whole = path.read_bytes()
    for size in range(len(whole) - 1, 0, -1):
        path.write_bytes(whole[:size])
        with pytest.raises(SceneError, match="truncated|not a TIFF"):
            check_every_image_complete(path)
    path.write_bytes(whole[: len(whole) - 20])  # opens, but its mask's tile is gone
    assert not files.partials_readable(TAG)


@pytest.mark.parametrize("options", [{"BIGTIFF": "YES"}, {"ENDIANNESS": "BIG"}])
def test_tiff_directories_reads_bigtiff_and_big_endian_files(tmp_path, options):
    from changecam.geo.grid import SceneError, check_every_image_complete, tiff_directories

    path = tmp_path / "overviews.tif"
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint16"}
    profile |= {"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"}
    with rasterio.open(path, "w", **profile, **options) as dst:
        dst.write(np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64))
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4], Resampling.average)
    assert tiff_directories(path) == 3
    whole = path.read_bytes()
    for size in range(len(whole) - 1, 0, -7):
        path.write_bytes(whole[:size])
        with pytest.raises(SceneError):
            check_every_image_complete(path)

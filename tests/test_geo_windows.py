"""Scene blocks: their halo windows blend to the whole-image result, each window runs once,
and the reader thread hands its errors over."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import rasterio
import torch

import changecam.geo.bands
from changecam.geo.scene import window_last_use
from changecam.geo.windows import block_grid, prefetched
from changecam.models import SiameseUNet
from changecam.models.sliding_window import (
    SlidingWindow,
    blend_windows,
    num_windows,
    pad_to,
    sliding_window_logits,
)


@pytest.mark.parametrize("size", [(60, 100), (20, 90)], ids=str)
def test_blocks_blend_like_the_whole_image_and_run_each_window_once(size):
    torch.manual_seed(0)
    net = SiameseUNet(base_channels=4, depth=2).eval()
    spec = SlidingWindow(window=32, overlap=0.25, batch_size=5)
    pre, post = torch.rand(1, 3, *size), torch.rand(1, 3, *size)
    whole = sliding_window_logits(net, pre, post, spec)
    blocks = block_grid(*size, 48, spec)
    last_use = window_last_use(blocks)
    runs = []

    def forward(a, b):
        runs.append(len(a))
        with torch.no_grad():
            return net(a, b).float()

    reuse: dict = {}
    out = torch.full_like(whole, float("nan"))
    for block in blocks:
        region = (
            slice(block.region_row, block.region_row + block.region_height),
            slice(block.region_col, block.region_col + block.region_width),
        )
        # padded like the runner pads a scene narrower than one window (rows of (20, 90))
        x_pre, x_post = (
            pad_to(x[..., region[0], region[1]], 32, 32, spec.pad_mode) for x in (pre, post)
        )
        blended = blend_windows(
            forward,
            (x_pre, x_post),
            block.rows,
            block.cols,
            spec,
            reuse=reuse,
            origin=(block.region_row, block.region_col),
        )
        for start in [k for k in reuse if last_use[k] <= block.index]:
            del reuse[start]
        r, c = block.row - block.region_row, block.col - block.region_col
        out[..., block.row : block.row + block.height, block.col : block.col + block.width] = (
            blended[..., r : r + block.height, c : c + block.width]
        )
    assert reuse == {}, "every window is dropped once no block needs it"
    assert sum(runs) == num_windows(*size, spec), "each window of the scene runs exactly once"
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "side, window, stride, block", [(200, 32, 17, 48), (150, 32, 24, 64), (97, 20, 7, 16)]
)
def test_each_block_reads_exactly_the_windows_that_touch_it(side, window, stride, block):
    """Brute force: a block's windows are every whole-scene window that covers one of its
    pixels, and its region is their union (clipped to the scene)."""
    from changecam.models.sliding_window import window_starts

    spec = SlidingWindow(window=window, overlap=1 - stride / window)
    assert spec.stride == stride
    starts = window_starts(side, window, stride)
    for b in block_grid(side, side, block, spec):
        for first, length, region_first, offsets in (
            (b.row, b.height, b.region_row, b.rows),
            (b.col, b.width, b.region_col, b.cols),
        ):
            touching = [s for s in starts if s < first + length and s + window > first]
            assert [region_first + o for o in offsets] == touching
        assert b.region_row == min(b.region_row + r for r in b.rows)
        assert b.region_row + b.region_height == min(side, b.region_row + b.rows[-1] + window)


def test_the_reader_thread_hands_over_its_error():
    spec = SlidingWindow(window=32)
    blocks = block_grid(64, 64, 32, spec)

    def read(block):
        if block.index == 2:
            raise OSError("tile 2 is truncated")
        return block

    seen = []
    with pytest.raises(OSError, match="tile 2 is truncated"):
        for item in prefetched(blocks, read, depth=1):
            seen.append(item.index)
    assert seen == [0, 1]


@pytest.mark.parametrize(
    "side, step, layout",
    [
        (30, 4, {}),
        (34, 3, {}),  # 3: not a divisor of the 32 px tile
        (34, 3, {"tiled": False, "blockysize": 5, "compress": "deflate"}),  # 5-row strips
        (13, 8, {"tiled": False, "blockysize": 1}),  # one-row strips, fewer than the step
    ],
)
def test_the_scaling_sample_takes_every_kth_pixel(tmp_path, monkeypatch, side, step, layout):
    import numpy as np
    import rasterio

    import changecam.geo.bands
    from geo_scenes import write_scene

    rng = np.random.default_rng(0)
    image = rng.integers(0, 4096, (100, 70, 4), dtype=np.uint16)
    path = write_scene(tmp_path / "s.tif", image, nodata=0, **layout)
    monkeypatch.setattr(changecam.geo.bands, "SAMPLE_SIDE", side)  # 100 px: every step-th
    with rasterio.open(path) as src:
        if layout:
            assert src.block_shapes[0] == (layout["blockysize"], 70)
        data, valid = changecam.geo.bands.decimated_sample(src, (3, 1))
    every = image[::step, ::step]
    np.testing.assert_array_equal(data, every[..., [2, 0]].transpose(2, 0, 1))
    np.testing.assert_array_equal(valid, (every != 0).any(-1))


def test_the_change_overview_is_the_majority_of_the_valid_pixels(tmp_path):
    """change.tif's first overview: 1 where at least half of the valid pixels of each 2x2 are
    change (a tie counts as change), 0 where fewer are, 255 where none is valid."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from changecam.geo.grid import Grid
    from changecam.geo.windows import Block
    from changecam.geo.write import SceneFiles

    rng = np.random.default_rng(0)
    grid = Grid(rasterio.crs.CRS.from_epsg(32650), from_origin(0, 64, 0.5, 0.5), 64, 64)
    probability = rng.random((64, 64)).astype(np.float32)
    valid = rng.random((64, 64)) > 0.2
    files = SceneFiles(tmp_path, explain=False, tile=16)
    files.create(grid, {})
    files.write_block(
        Block(0, 0, 0, 64, 64, 0, 0, 64, 64, (0,), (0,)), probability, valid, 0.5, None
    )
    files.build_overviews(grid)
    change = np.where(valid, probability > 0.5, 255).astype(np.uint8)
    quads = change.reshape(32, 2, 32, 2).transpose(0, 2, 1, 3).reshape(32, 32, 4)
    counted, ones = (quads != 255).sum(-1), (quads == 1).sum(-1)
    expected = np.where(counted == 0, 255, 2 * ones >= counted).astype(np.uint8)
    with rasterio.open(files.partial("change")) as src:
        assert src.overviews(1) == [2, 4, 8]
        overview = src.read(1, out_shape=(32, 32))
    np.testing.assert_array_equal(overview, expected)


def test_a_pixel_exactly_at_the_threshold_is_not_change(tmp_path):
    """Change is ``p > threshold``, as in the PNG path: a tie is no change."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from changecam.geo.grid import Grid
    from changecam.geo.windows import Block
    from changecam.geo.write import SceneFiles

    grid = Grid(rasterio.crs.CRS.from_epsg(32650), from_origin(0, 16, 0.5, 0.5), 16, 16)
    probability = np.full((16, 16), 0.5, np.float32)
    probability[:, 8:] = np.nextafter(np.float32(0.5), np.float32(1))
    files = SceneFiles(tmp_path, explain=False, tile=16)
    files.create(grid, {})
    written = files.write_block(
        Block(0, 0, 0, 16, 16, 0, 0, 16, 16, (0,), (0,)),
        probability,
        np.ones((16, 16), bool),
        0.5,
        None,
    )
    assert (written.change[:, :8] == 0).all() and (written.change[:, 8:] == 1).all()


def test_an_all_valid_scene_writes_no_mask_and_refuses_nodata(tmp_path):
    """A scene whose inputs have no nodata writes probability.tif without a mask (GDAL reads
    every pixel as valid); a nodata pixel there would be a bug and is refused, not dropped."""
    import numpy as np
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.transform import from_origin

    from changecam.geo.grid import Grid
    from changecam.geo.windows import Block
    from changecam.geo.write import SceneFiles

    grid = Grid(rasterio.crs.CRS.from_epsg(32650), from_origin(0, 32, 0.5, 0.5), 32, 32)
    block = Block(0, 0, 0, 32, 32, 0, 0, 32, 32, (0,), (0,))
    probability = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    for masked in (True, False):
        files = SceneFiles(tmp_path / str(masked), explain=False, tile=16, masked=masked)
        files.create(grid, {})
        files.write_block(block, probability, np.ones((32, 32), bool), 0.5, None)
        with rasterio.open(files.partial("probability")) as src:
            expected = [MaskFlags.per_dataset] if masked else [MaskFlags.all_valid]
            assert src.mask_flag_enums == (expected,)
            assert (src.dataset_mask() == 255).all()
            np.testing.assert_array_equal(src.read(1), np.round(probability * 65535))
    holed = np.ones((32, 32), bool)
    holed[0, 0] = False
    with pytest.raises(ValueError, match="block 0 has nodata"):
        files.write_block(block, probability, holed, 0.5, None)


def test_a_run_with_fewer_outputs_removes_the_files_an_earlier_run_left(tmp_path):
    """Starting over with the explanation or the polygons off removes an earlier run's
    explanation.tif and change.geojson, which would otherwise look like this run's."""
    from changecam.geo.write import SceneFiles

    earlier = SceneFiles(tmp_path, explain=True)
    for what in earlier.outputs:
        earlier.final(what).write_text("earlier")
        earlier.partial(what).write_text("earlier")
    fewer = SceneFiles(tmp_path, explain=False, polygons=False)
    assert fewer.outputs == ("change", "probability")
    fewer.remove()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "transform",
    [(0.5, 0.0, 0.0, -0.5), (0.5, 0.0, 0.0, 0.5), (0.5, 0.125, -0.25, -0.5)],
    ids=["north-up", "south-up", "rotated"],
)
def test_region_texts_place_each_region_by_the_grid_transform(transform):
    """Each region's geometry text is its outline placed by the grid's transform, computed here
    by hand, with its exterior counter-clockwise and its holes clockwise in the CRS whichever
    way the grid is oriented; its bounds and its properties are that region's."""
    import json

    import shapely
    from affine import Affine
    from shapely.geometry import MultiPolygon, Polygon, box, shape

    from changecam.geo.grid import Grid
    from changecam.geo.polygons import Piece, region_texts

    a, b, d, e = transform
    x0, y0 = 399_872.0, 3_510_144.0
    holed = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 2)]])
    outlines = [holed, MultiPolygon([holed, box(10, 0, 12, 3)])]
    pieces = [Piece(g, int(g.area), 0.5 * g.area, 1.0, 3.0) for g in outlines]
    grid = Grid(None, Affine(a, b, x0, d, e, y0), 20, 20)
    bounds, texts = region_texts(pieces, grid, metres=True)

    def by_hand(polygon):
        def ring(coords):
            return [(a * x + b * y + x0, d * x + e * y + y0) for x, y in coords]

        return Polygon(ring(polygon.exterior.coords), [ring(r.coords) for r in polygon.interiors])

    for outline, bound, text in zip(outlines, bounds, texts, strict=True):
        geometry, properties = (json.loads(line) for line in text.split("\n"))
        placed = shape(geometry)
        parts = [by_hand(p) for p in getattr(outline, "geoms", [outline])]
        expected = shapely.orient_polygons(parts[0] if len(parts) == 1 else MultiPolygon(parts))
        assert shapely.equals_exact(placed, expected, 0)
        for polygon in getattr(placed, "geoms", [placed]):
            assert polygon.exterior.is_ccw and not any(r.is_ccw for r in polygon.interiors)
        assert list(bound) == list(expected.bounds)
        assert properties == {
            "pixels": int(outline.area),
            "area_m2": int(outline.area) * abs(a * e - b * d),
            "mean_probability": 0.5,
            "post_share": 0.75,
        }


def test_traced_outlines_are_exact_pixel_edges_wherever_the_block_lies():
    """A known answer: a ring with a hole, a region in that hole, and two regions touching
    only at a corner, in a block at (col 100, row 40): each outline follows its pixels' edges
    in scene pixel coordinates."""
    import cv2
    import numpy as np
    from shapely.geometry import Polygon, box

    from changecam.geo.polygons import trace_labels

    change = np.zeros((12, 16), np.uint8)
    change[1:6, 1:6] = 1
    change[2:5, 2:5] = 0  # the ring's hole
    change[3, 3] = 1  # inside the hole
    change[8, 8] = change[9, 9] = 1  # corner to corner: two regions (4-connected)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        change, connectivity=4, ltype=cv2.CV_32S
    )
    inside = np.flatnonzero(change)
    outlines = trace_labels(labels, stats, inside, labels.ravel()[inside], (100, 40))
    assert outlines[0] is None and count == 5
    expected = {
        labels[1, 1]: Polygon(
            [(101, 41), (106, 41), (106, 46), (101, 46)],
            [[(102, 42), (105, 42), (105, 45), (102, 45)]],
        ),
        labels[3, 3]: box(103, 43, 104, 44),
        labels[8, 8]: box(108, 48, 109, 49),
        labels[9, 9]: box(109, 49, 110, 50),
    }
    for label, polygon in expected.items():
        assert outlines[label].equals(polygon), (label, outlines[label].wkt)


def test_packed_tracing_gives_the_outlines_of_tracing_the_whole_block(monkeypatch):
    """Sparse regions are traced from their bounding boxes packed into a small raster: the
    outlines (holes, nested and diagonal neighbours included) are those traced from the whole
    block, and GDAL is given a fraction of its pixels."""
    import cv2
    import numpy as np
    import rasterio.features

    from changecam.geo import polygons

    rng = np.random.default_rng(3)
    blurred = cv2.GaussianBlur(rng.random((300, 260)), (0, 0), 2)
    change = (blurred > np.quantile(blurred, 0.93)).astype(np.uint8)
    change[rng.random(change.shape) < 0.01] ^= 1  # specks, and holes in the regions
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        change, connectivity=4, ltype=cv2.CV_32S
    )
    inside = np.flatnonzero(change)
    flat = labels.ravel()[inside]
    assert count > 50 and change.mean() < 0.1

    traced_pixels = []
    shapes = rasterio.features.shapes

    def counting(source, **kwargs):
        traced_pixels.append(source.size)
        return shapes(source, **kwargs)

    monkeypatch.setattr(rasterio.features, "shapes", counting)
    packed = polygons.trace_labels(labels, stats, inside, flat, (512, 1024))
    monkeypatch.setattr(polygons, "PACK_FRACTION", 0.0)
    whole = polygons.trace_labels(labels, stats, inside, flat, (512, 1024))
    assert traced_pixels[1] == labels.size and traced_pixels[0] <= labels.size / 2
    holes = 0
    for label in range(1, count):
        assert packed[label].equals(whole[label]), label
        assert packed[label].area == (labels == label).sum()
        holes += len(packed[label].interiors)
    assert holes > 0


@pytest.mark.parametrize(
    "transform",
    [
        # EPSG:4326, one arc-second: block edges inexact (traced in the CRS, split in two)
        (8.5, 47.4, 1 / 3600, 1 / 3600),
        (399_872.3, 3_510_144.7, 0.3, 0.3),  # UTM at 0.3 m (its edges happen to agree here)
        (399_872.0, 3_510_144.0, 0.5, 0.5),  # exact binary fractions
    ],
    ids=["arcsecond", "0.3m", "0.5m"],
)
def test_a_region_cut_by_block_edges_is_one_polygon_on_any_grid(transform):
    """Traced per block in pixel coordinates, the pieces of one region share their edges
    exactly, whatever the pixel size; placed in the CRS once, the polygon covers its pixels."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from shapely.geometry import box, shape

    from changecam.geo.grid import Grid
    from changecam.geo.polygons import RegionTracer

    affine = from_origin(*transform)
    crs = rasterio.crs.CRS.from_epsg(4326 if transform[2] < 0.01 else 32650)
    grid = Grid(crs, affine, 192, 192)
    change = np.zeros((192, 192), np.uint8)
    change[70:150, 20:180] = 1  # crosses block edges both ways, and two four-block corners
    change[170:180, 5:15] = 1  # inside one block
    change[63, 63] = change[64, 64] = 1  # touch at a block corner only: two regions
    tracer = RegionTracer(grid)
    for block in block_grid(192, 192, 64, SlidingWindow(window=32)):
        window = np.s_[block.row : block.row + block.height, block.col : block.col + block.width]
        probability = np.full((block.height, block.width), 40000, np.uint16)
        tracer.add_block(block, change[window], probability, None)
    features = tracer.features()
    assert sorted(f["properties"]["pixels"] for f in features) == [1, 1, 100, 80 * 160]
    big = next(f for f in features if f["properties"]["pixels"] == 80 * 160)
    geometry = shape(big["geometry"])
    left, top = affine * (20, 70)
    right, bottom = affine * (180, 150)
    expected = box(left, bottom, right, top)
    assert geometry.geom_type == "Polygon" and not geometry.interiors
    assert geometry.symmetric_difference(expected).area <= 1e-9 * expected.area


def test_a_regions_vertices_do_not_depend_on_the_block_size():
    """Joined across block edges, a region keeps no vertex where its pieces met (a point in
    the middle of a straight edge): traced with 32-, 64- or 128-pixel blocks (the scene
    whole), every region has the same vertices, so the same normalised coordinates."""
    import cv2
    import shapely
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from shapely.geometry import shape

    from changecam.geo.grid import Grid
    from changecam.geo.polygons import RegionTracer

    grid = Grid(CRS.from_epsg(32650), from_origin(399872, 3510144, 0.5, 0.5), 128, 128)
    rng = np.random.default_rng(3)
    change = (rng.random((16, 16)) < 0.45).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    change[20:100, 30:40] = 1  # a long straight edge across three block rows

    def pixels(geometries):  # each region's pixel count x 0.25 m², from the mask
        labels = cv2.connectedComponents(change, connectivity=4)[1]
        for g in geometries:
            row, col = rasterio.transform.rowcol(
                grid.transform, *g.representative_point().coords[0]
            )
            yield (labels == labels[row, col]).sum() * 0.25

    traced = {}
    for size in (32, 64, 128):
        tracer = RegionTracer(grid)
        for block in block_grid(128, 128, size, SlidingWindow(window=32)):
            rows = np.s_[block.row : block.row + block.height]
            window = (rows, np.s_[block.col : block.col + block.width])
            probability = np.full((block.height, block.width), 40000, np.uint16)
            tracer.add_block(block, change[window], probability, None)
        geometries = [shape(f["geometry"]) for f in tracer.features()]
        tracer.close()
        assert all(
            g.is_valid and g.area == f for g, f in zip(geometries, pixels(geometries), strict=True)
        )
        traced[size] = sorted(shapely.normalize(g).wkt for g in geometries)
    assert len(traced[128]) > 5
    assert traced[32] == traced[128] and traced[64] == traced[128]


@pytest.mark.parametrize("copy", ["overviews", "cog"])
def test_the_scaling_sample_ignores_overviews(tmp_path, monkeypatch, copy):
    """A scene with averaged overviews (or its COG copy) holds the same pixels, so it gets the
    same sample and the same stretch as the scene without them (the overviews' averaging had
    pulled the 98th percentile of this noise from 4000 down to about 2960)."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    from rasterio.enums import Resampling

    import changecam.geo.bands
    from geo_scenes import write_scene

    rng = np.random.default_rng(0)
    image = rng.integers(300, 4001, (256, 256, 3), dtype=np.uint16)
    image[:, :20] = 0  # a nodata border
    plain = write_scene(tmp_path / "plain.tif", image, nodata=0)
    if copy == "overviews":
        other = write_scene(tmp_path / "other.tif", image, nodata=0)
        with rasterio.open(other, "r+") as dst:
            dst.build_overviews([2, 4, 8], Resampling.average)
    else:
        other = tmp_path / "other.tif"
        with rasterio.open(plain) as src:
            rasterio.shutil.copy(
                src, other, driver="COG", blocksize=64, overview_resampling="average"
            )
    monkeypatch.setattr(changecam.geo.bands, "SAMPLE_SIDE", 64)  # every 4th pixel
    samples, scalings = [], []
    for path in (plain, other):
        with rasterio.open(path) as src:
            assert bool(src.overviews(1)) == (path == other)
            samples.append(changecam.geo.bands.decimated_sample(src, (1, 2, 3)))
            scalings.append(
                changecam.geo.bands.estimate_scaling(
                    src, (1, 2, 3), "percentile", sample=samples[-1]
                )
            )
    np.testing.assert_array_equal(samples[0][0], samples[1][0])
    np.testing.assert_array_equal(samples[0][1], samples[1][1])
    assert scalings[0] == scalings[1]
    every = image[::4, ::4]
    np.testing.assert_array_equal(samples[0][0], every.transpose(2, 0, 1))
    assert scalings[0].hi[0] > 3900  # the full-resolution tail, not the averaged one


def test_the_decimated_sample_holds_one_strip_not_the_date(tmp_path, monkeypatch):
    """Each strip is copied down to its sample before the next is read: a view would keep
    every strip, the whole 16-bit date, alive until the end."""
    monkeypatch.setattr(changecam.geo.bands, "SAMPLE_SIDE", 128)  # every 16th pixel
    side, tile = 2048, 128
    path = tmp_path / "u16.tif"
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint16"}
    profile |= {"tiled": True, "blockxsize": tile, "blockysize": tile}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.arange(side * side * 3, dtype=np.uint16).reshape(3, side, side))
    with rasterio.open(path) as src:
        tracemalloc.start()
        try:
            data, valid = changecam.geo.bands.decimated_sample(src, (1, 2, 3))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    date = side * side * 3 * 2  # 24 MiB
    assert data.shape == (3, 128, 128) and valid.all()
    assert peak < date / 4, (
        f"peak {peak / 2**20:.1f} MiB while sampling a {date / 2**20:.0f} MiB date"
    )


def test_regions_inside_a_block_are_spilled_not_kept(tmp_path):
    """A region inside its block is finished at once: only the pieces at inner block edges
    stay in memory, the spill is an unnamed file (nothing in the folder), and the features
    come back in order with their records."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from changecam.geo.grid import Grid
    from changecam.geo.polygons import RegionTracer

    grid = Grid(CRS.from_epsg(32650), from_origin(399872, 3510144, 0.5, 0.5), 128, 128)
    change = np.zeros((128, 128), np.uint8)
    change[4:6, 4:6] = change[10:13, 40:42] = change[70:72, 90:93] = 1  # inside their blocks
    change[60:68, 20:24] = 1  # across the edge of rows 63 | 64
    tracer = RegionTracer(grid, tmp_path)
    for block in block_grid(128, 128, 64, SlidingWindow(window=32)):
        window = np.s_[block.row : block.row + block.height, block.col : block.col + block.width]
        probability = np.full((block.height, block.width), 40000, np.uint16)
        tracer.add_block(block, change[window], probability, None)
    assert list(tmp_path.iterdir()) == []
    assert [len(pieces) for pieces in tracer.open.values()] == [1, 1]  # the two halves
    features = tracer.features(min_area_m2=1.0)  # 4 px = 1 m²: all kept
    assert [f["properties"]["pixels"] for f in features] == [4, 6, 32, 6]  # north first
    assert [f["id"] for f in features] == [1, 2, 3, 4]
    assert len(tracer.features(min_area_m2=1.5)) == 3
    tracer.close()

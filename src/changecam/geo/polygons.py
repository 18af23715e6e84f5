"""One polygon per changed region of a scene, built block by block in bounded memory.

Each block of ``change.tif``, as the writer thread wrote it (or read back from the partial
raster for blocks a killed run wrote: :class:`RegionTracer`), is labelled into 4-connected
regions (:func:`cv2.connectedComponentsWithStats`, which also gives their bounding boxes and
pixel counts), and each region is traced into a polygon by
:func:`rasterio.features.shapes` (4-connected too; from the regions' bounding boxes packed
together where they cover little of the block: :func:`trace_labels`) in scene pixel
coordinates, where the edge two blocks share is the same integer seen from either side (in the
CRS it need not be: with a pixel size such as 1/3600° or 0.3 m, ``x0 + 1024 a + 1024 a`` and
``x0 + 2048 a`` can differ in the last bit, and the two halves of a region would share no
segment to be joined by). Each whole region is mapped to the scene's CRS once, by its affine
transform (a block's regions together: :func:`region_texts`). Per region the block
sums what its record needs: pixel count, summed probability, summed positive pre and post
HiResCAM. Regions that touch an inner block edge are joined with their neighbours across it
(shapely: pieces whose boundaries share a segment, not just a corner), summing their sums.
Every record carries:

* ``area_m2``: pixel count × pixel area (``null`` when that is not the ground area in m²: a CRS
  not in metres, or one whose areas are more than 1 % off the ground's in the scene, such as
  Web Mercator away from the equator; :func:`area_problem`) and ``pixels``;
* ``mean_probability``: the mean change probability of its pixels;
* ``post_share``: ``ΣReLU(post) / (ΣReLU(pre) + ΣReLU(post))`` of the explanation raster's
  HiResCAM bands over its pixels (``null`` without an explanation, or where both are 0).

A region inside its block is finished as soon as its block is traced: placed in the CRS and
spilled as GeoJSON text to an unnamed temporary file, with only its sort key (8 bytes a field)
kept, so memory grows with the pieces at inner block edges and with the largest region, not
with the number of regions.

``predict.min_area_m2`` drops smaller regions (pixels × pixel area; the runner refuses it where
``area_m2`` would be ``null``). Exterior rings run counter-clockwise in the CRS, holes clockwise
(RFC 7946), whichever way the grid's transform is oriented.
"""

from __future__ import annotations

import json
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
import rasterio.crs
import rasterio.features
import rasterio.warp
import shapely
from affine import Affine
from shapely import STRtree
from shapely.ops import unary_union

from changecam.atomic import atomic_open, strict_json
from changecam.data.io import PROBABILITY_SCALE
from changecam.geo.gdal_lock import GDAL_LOCK
from changecam.geo.grid import Grid
from changecam.geo.windows import Block
from changecam.geo.write import read_partial_block


@dataclass
class Piece:
    """A changed region of one block (or several joined pieces)."""

    geometry: Any
    pixels: int
    probability_sum: float
    pre_mass: float
    post_mass: float
    open_edge: bool = False  # touches an inner block edge: may continue in a neighbour
    parts: list[Any] = field(default_factory=list)

    def absorb(self, other: Piece) -> None:
        self.parts.append(other.geometry)
        self.pixels += other.pixels
        self.probability_sum += other.probability_sum
        self.pre_mass += other.pre_mass
        self.post_mass += other.post_mass


def block_pieces(
    block: Block,
    change: np.ndarray,
    probability: np.ndarray,
    explanation: np.ndarray | None,
    grid: Grid,
) -> list[Piece]:
    """The changed regions of one block (``change`` == 1) with their sums, in scene pixel
    coordinates; ``probability`` as written (uint16, ``p * 65535``)."""
    changed = (change == 1).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        changed, connectivity=4, ltype=cv2.CV_32S
    )
    if count <= 1:
        return []
    # the sums over the changed pixels alone (a few per cent of a block), in the same order
    inside = np.flatnonzero(changed)
    flat = labels.ravel()[inside]
    pixels = stats[:, cv2.CC_STAT_AREA]
    prob_sum = np.bincount(
        flat,
        weights=(probability.ravel()[inside].astype(np.float32) / PROBABILITY_SCALE).astype(
            np.float64
        ),
        minlength=count,
    )
    if explanation is not None:
        pre, post = (
            np.nan_to_num(np.clip(band.ravel()[inside], 0, None)).astype(np.float64)
            for band in explanation[:2]
        )
        pre_mass = np.bincount(flat, weights=pre, minlength=count)
        post_mass = np.bincount(flat, weights=post, minlength=count)
    else:
        pre_mass = post_mass = np.full(count, np.nan)
    edges: set[int] = set()
    if block.row > 0:
        edges |= set(labels[0].tolist())
    if block.row + block.height < grid.height:
        edges |= set(labels[-1].tolist())
    if block.col > 0:
        edges |= set(labels[:, 0].tolist())
    if block.col + block.width < grid.width:
        edges |= set(labels[:, -1].tolist())
    outlines = trace_labels(labels, stats, inside, flat, (block.col, block.row))
    return [
        Piece(
            geometry=outlines[label],
            pixels=int(pixels[label]),
            probability_sum=float(prob_sum[label]),
            pre_mass=float(pre_mass[label]),
            post_mass=float(post_mass[label]),
            open_edge=label in edges,
        )
        for label in range(1, count)
    ]


# GDAL's polygonize scans every pixel it is given (about 14 ms a megapixel on these CPUs), and
# changed regions are mostly a few per cent of a block: each region's bounding box is packed
# into a smaller raster, shelf by shelf, and traced there unless the packed raster would be
# larger than this fraction of the block
PACK_FRACTION = 0.5


def trace_labels(
    labels: np.ndarray,
    stats: np.ndarray,
    inside: np.ndarray,
    flat: np.ndarray,
    origin: tuple[int, int],
) -> list[Any]:
    """The outline of each labelled region of a block (4-connected, as labelled), in scene
    pixel coordinates: index ``k`` is label ``k``'s (Multi)Polygon (index 0, the background,
    ``None``).

    Args:
        labels: int32 ``h x w``: 0 background, regions ``1 .. count - 1`` (each non-empty).
        stats: ``count x 5``, row ``k`` label ``k``'s bounding box (left, top, width, height)
            and pixel count, as :func:`cv2.connectedComponentsWithStats` gives them (row 0 the
            background).
        inside: the flat indices of the labelled pixels.
        flat: their labels.
        origin: the block's ``(col, row)`` in the scene.
    """
    count = len(stats)
    if count <= 1:
        return [None] * count
    height, width = labels.shape
    rows, cols = np.divmod(inside, width)
    left, top, widths, heights = (stats[1:, i].astype(np.int64) for i in range(4))
    # shelves of the tallest boxes first, each as wide as the block
    place_row, place_col = [0] * (count - 1), [0] * (count - 1)
    box_heights, box_widths = heights.tolist(), widths.tolist()
    shelf_top = shelf_height = x = 0
    for k in np.argsort(-heights, kind="stable").tolist():
        if x + box_widths[k] > width:
            shelf_top, shelf_height, x = shelf_top + shelf_height, 0, 0
        place_row[k], place_col[k] = shelf_top, x
        x += box_widths[k]
        shelf_height = max(shelf_height, box_heights[k])
    packed_height = shelf_top + shelf_height
    if packed_height <= PACK_FRACTION * height:
        rows_at, cols_at = np.asarray(place_row), np.asarray(place_col)
        canvas = np.zeros((packed_height, width), np.int32)
        k = flat - 1
        canvas[rows - top[k] + rows_at[k], cols - left[k] + cols_at[k]] = flat
        shift = np.stack([left - cols_at, top - rows_at], axis=1)
    else:
        canvas, shift = labels, np.zeros((count - 1, 2), np.int64)
    with GDAL_LOCK:  # GDAL's polygonize, beside the reader and writer threads (geo.gdal_lock)
        traced = list(rasterio.features.shapes(canvas, mask=canvas > 0, connectivity=4))
    # all polygons built at once from their rings' coordinates (each ring's first point
    # repeated last, as shapely keeps it), shifted into the scene: integers, exact
    values = np.array([int(value) for _, value in traced], dtype=np.int64)
    rings = [ring for geom, _ in traced for ring in geom["coordinates"]]
    ring_counts = [len(geom["coordinates"]) for geom, _ in traced]
    ring_lengths = np.array([len(ring) for ring in rings])
    coords = np.array(list(chain.from_iterable(rings)), dtype=np.float64)
    polygon_of_ring = np.repeat(np.arange(len(traced)), ring_counts)
    coords += np.repeat((shift[values - 1] + np.asarray(origin))[polygon_of_ring], ring_lengths, 0)
    polygons = shapely.polygons(
        shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), ring_lengths)),
        indices=polygon_of_ring,
    )
    outlines: list[Any] = [None] * count
    for polygon, value in zip(polygons.tolist(), values.tolist(), strict=True):
        previous = outlines[value]
        outlines[value] = polygon if previous is None else dissolved([previous, polygon])
    return outlines


def dissolved(polygons: Sequence[Any]) -> Any:
    """The union of traced polygons (scene pixel coordinates) without the vertices where they
    met in the middle of a straight edge, as GDAL traces a region whole: a region's vertices
    do not depend on where the blocks cut it. Exact: the coordinates are integers, and only a
    vertex on the line through its neighbours goes (a ring's first one included)."""
    union = unary_union(polygons)
    parts = [
        shapely.Polygon(corners(part.exterior), [corners(ring) for ring in part.interiors])
        for part in getattr(union, "geoms", [union])
    ]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def corners(ring: Any) -> np.ndarray:
    """A closed ring's vertices where it turns (its closing point left out)."""
    xy = np.asarray(ring.coords)[:-1]
    before, after = xy - np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0) - xy
    return xy[before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0]


def join_pieces(pieces: Sequence[Piece]) -> list[Piece]:
    """Join open pieces whose boundaries share a segment (one region cut by block edges)."""
    if not pieces:
        return []
    tree = STRtree([p.geometry for p in pieces])
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, piece in enumerate(pieces):
        for j in tree.query(piece.geometry, predicate="intersects"):
            j = int(j)
            if j <= i or root(i) == root(j):
                continue
            if piece.geometry.intersection(pieces[j].geometry).length > 0:  # an edge, not a corner
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    joined = []
    for members in groups.values():
        first = pieces[members[0]]
        merged = Piece(
            first.geometry, first.pixels, first.probability_sum, first.pre_mass, first.post_mass
        )
        for k in members[1:]:
            merged.absorb(pieces[k])
        if merged.parts:
            merged.geometry = dissolved([first.geometry, *merged.parts])
            merged.parts = []
        joined.append(merged)
    return joined


AREA_TOLERANCE = 0.01  # how far a pixel's CRS area may be from its ground area, as a fraction


def area_problem(grid: Grid) -> str | None:
    """Why pixel count × pixel area is not a region's ground area in m² in this scene's CRS,
    or ``None`` when it is: the CRS is projected in metres and, at a 5 × 5 grid of points over
    the scene (corners and edges included), a pixel's area in the CRS is within
    :data:`AREA_TOLERANCE` of its area on the ellipsoid (UTM inside its zone, equal-area
    projections; not Web Mercator beyond about 3° from the equator, which enlarges areas by
    about 1/cos² of the latitude). A point the CRS cannot place on the globe (outside its
    domain) leaves the areas unknown, and so does one that places none."""
    crs = grid.crs
    if crs is None or not crs.is_projected:
        return f"is in {crs.to_string() if crs else 'no CRS'}, not a projected CRS in metres"
    units = (crs.linear_units or "").lower()
    if units not in ("metre", "meter", "m", "metres", "meters"):
        return f"is in {crs.to_string()}, whose unit is {crs.linear_units!r}, not metres"
    scales = areal_scales(grid)
    placed = [scale for scale in scales if scale is not None]
    if len(placed) < len(scales):
        return (
            f"is in {crs.to_string()}, which cannot place this scene (or part of it) on the globe "
            "(outside the projection's domain), so its ground areas are unknown"
        )
    worst = max(placed, key=lambda scale: abs(scale - 1))
    if abs(worst - 1) > AREA_TOLERANCE:
        return (
            f"is in {crs.to_string()}, where a pixel's area is {worst:.4g}× its ground area "
            "in this scene (not an equal-area projection there)"
        )
    return None


def metric_crs(grid: Grid) -> bool:
    """Whether pixel count × pixel area is a region's ground area in m²: :func:`area_problem`."""
    return area_problem(grid) is None


AREA_POINTS = 5  # areal_scales' points a side


def areal_scales(grid: Grid) -> list[float | None]:
    """A pixel's area in the CRS over its area on the WGS 84 ellipsoid (in a Lambert
    azimuthal equal-area projection centred on it), at :data:`AREA_POINTS` × AREA_POINTS
    pixels spread evenly over the scene, corners included; ``None`` where PROJ cannot place
    the pixel on the globe (outside the projection's domain, or not finite)."""
    t = grid.transform
    cols = np.linspace(0.5, grid.width - 0.5, AREA_POINTS)
    rows = np.linspace(0.5, grid.height - 0.5, AREA_POINTS)
    return [pixel_areal_scale(grid.crs, t, col, row) for row in rows for col in cols]


def pixel_areal_scale(crs: Any, t: Affine, col: float, row: float) -> float | None:
    """The pixel centred at ``(col, row)``: its area in ``crs`` over its ground area (see
    :func:`areal_scales`), or ``None`` where PROJ cannot place it."""
    corners = [
        t @ (col + dc, row + dr) for dc, dr in ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))
    ]
    x, y = t @ (col, row)
    try:
        (lon,), (lat,) = rasterio.warp.transform(crs, "EPSG:4326", [x], [y])
        if not (np.isfinite(lon) and np.isfinite(lat)):
            return None
        laea = rasterio.crs.CRS.from_proj4(
            f"+proj=laea +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m +no_defs"
        )
        xs, ys = rasterio.warp.transform(crs, laea, *zip(*corners, strict=True))
    except Exception:  # noqa: BLE001 - PROJ's CPLE errors (rasterio._err): outside its domain
        return None
    ground = 0.5 * abs(sum(xs[i] * ys[(i + 1) % 4] - xs[(i + 1) % 4] * ys[i] for i in range(4)))
    if not (np.isfinite(ground) and ground > 0):
        return None
    return abs(t.determinant) / ground


class RegionTracer:
    """The changed regions of a scene, collected block by block: from each block as it is
    written (:meth:`add_block`) or, for blocks an earlier run wrote, read back from the partial
    rasters (:meth:`add_from_rasters`). Both see the same values, so a resumed scene traces the
    same polygons as an uninterrupted one.

    Memory does not grow with the number of regions: a region inside its block is finished at
    once (placed in the CRS, written as GeoJSON text to an unnamed temporary file in
    ``spill_dir``) and only its sort key stays in memory; only the pieces that touch an inner
    block edge wait in memory for :meth:`features` to join them."""

    def __init__(self, grid: Grid, spill_dir: Path | None = None) -> None:
        self.grid = grid
        self.open: dict[int, list[Piece]] = {}  # per block index: pieces that may continue
        self.spill = tempfile.TemporaryFile(dir=spill_dir, prefix=".polygons-")  # noqa: SIM115
        # one sort key per finished region, in flat arrays (8 bytes a field, not a Python
        # object each): north first (-top), then west (left), then its block and place there
        self.keys = {name: array(kind) for name, kind in KEY_FIELDS.items()}

    @cached_property
    def metres(self) -> bool:
        """:func:`metric_crs` of the grid (25 points, two PROJ transformations each, about 7 ms
        here), found when the first region is finished (mostly in the tracer thread), not when
        the tracer is made (in the network's thread)."""
        with GDAL_LOCK:  # PROJ through GDAL, beside the reader and writer threads
            return metric_crs(self.grid)

    def add_block(
        self,
        block: Block,
        change: np.ndarray,
        probability: np.ndarray,
        explanation: np.ndarray | None,
    ) -> None:
        """One block's values as written: ``change`` (1 = change), ``probability`` (uint16,
        ``p * 65535``), ``explanation`` (``3 x h x w`` or ``None``)."""
        if not (change == 1).any():
            return
        pieces = block_pieces(block, change, probability, explanation, self.grid)
        open_pieces = [piece for piece in pieces if piece.open_edge]
        if open_pieces:
            self.open[block.index] = open_pieces
        self._finish([p for p in pieces if not p.open_edge], block.index)

    def _finish(self, pieces: Sequence[Piece], origin: int) -> None:
        """Place whole regions in the CRS and spill their GeoJSON text; keep their sort keys
        (``origin``: their block's index, or :data:`JOINED`; then their order in ``pieces``)."""
        if not pieces:
            return
        bounds, texts = region_texts(pieces, self.grid, self.metres)
        offset = self.spill.seek(0, 2)
        data = [text.encode() for text in texts]
        self.spill.write(b"".join(data))
        lengths = [len(d) for d in data]
        starts = np.cumsum([offset, *lengths[:-1]]).tolist()
        columns = (
            (-bounds[:, 3]).tolist(),  # -top
            bounds[:, 0].tolist(),  # left
            [origin] * len(pieces),
            list(range(len(pieces))),
            starts,
            lengths,
            [piece.pixels for piece in pieces],
        )
        for column, values in zip(self.keys.values(), columns, strict=True):
            column.extend(values)

    def add_from_rasters(
        self,
        blocks: Sequence[Block],
        change_path: Path,
        probability_path: Path,
        explanation_path: Path | None,
    ) -> None:
        """``blocks`` read back from the (partial) rasters."""
        if not blocks:
            return
        with rasterio.open(change_path) as change_ds, rasterio.open(probability_path) as prob_ds:
            expl_ds = rasterio.open(explanation_path) if explanation_path is not None else None
            try:
                for block in blocks:
                    change = read_partial_block(change_ds, block, 1)
                    if not (change == 1).any():
                        continue
                    probability = read_partial_block(prob_ds, block, 1)
                    explanation = read_partial_block(expl_ds, block) if expl_ds else None
                    self.add_block(block, change, probability, explanation)
            finally:
                if expl_ds is not None:
                    expl_ds.close()

    def close(self) -> None:
        """Let go of the spill (its features can no longer be read)."""
        self.spill.close()

    def features(self, min_area_m2: float = 0.0) -> SceneFeatures:
        """The regions (pieces cut by block edges joined, taken in block order whatever order
        the blocks came in, so the joined geometries are the same), largest northing first
        (ties: the regions inside one block in block order, then the joined ones); regions under
        ``min_area_m2`` dropped."""
        pieces = [piece for index in sorted(self.open) for piece in self.open[index]]
        self.open = {}
        self._finish(join_pieces(pieces), JOINED)
        keys = {name: np.array(column, dtype=column.typecode) for name, column in self.keys.items()}
        order = np.lexsort([keys[name] for name in reversed(SORT_FIELDS)])
        order = order[keys["pixels"][order] * self.grid.pixel_area >= min_area_m2]
        return SceneFeatures(self.spill, keys["offset"][order], keys["length"][order])


# a finished region's key: where it sorts (north first, then west, then its block and its
# place in it; joined regions after every block's own, in the order they were joined), where
# its text lies in the spill, and its pixel count (for min_area_m2)
JOINED = 2**62  # the "block" of the joined regions
KEY_FIELDS = {
    "neg_top": "d",
    "left": "d",
    "block": "q",
    "order": "q",
    "offset": "q",
    "length": "q",
    "pixels": "q",
}
SORT_FIELDS = ("neg_top", "left", "block", "order")


@dataclass
class SceneFeatures:
    """The scene's features in their order, read from the spill one at a time: ``texts()`` as
    GeoJSON text (what :func:`write_geojson` writes), iteration as dicts; ids count from 1."""

    spill: Any
    offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def texts(self) -> Iterator[str]:
        for number, (offset, length) in enumerate(zip(self.offsets, self.lengths, strict=True), 1):
            self.spill.seek(int(offset))
            geometry, properties = self.spill.read(int(length)).decode().split("\n", 1)
            yield (
                f'{{"type": "Feature", "id": {number}, "geometry": {geometry}, '
                f'"properties": {{"id": {number}, {properties[1:]}}}'
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (json.loads(text) for text in self.texts())


def scene_polygons(
    tracer: RegionTracer,
    read_back: Sequence[Block],
    change_path: Path,
    probability_path: Path,
    explanation_path: Path | None,
    min_area_m2: float = 0.0,
) -> SceneFeatures:
    """The features of the scene's changed regions (see the module docstring): the blocks
    ``tracer`` saw written, plus ``read_back`` read from the partial rasters."""
    tracer.add_from_rasters(read_back, change_path, probability_path, explanation_path)
    return tracer.features(min_area_m2)


def region_texts(pieces: Sequence[Piece], grid: Grid, metres: bool) -> tuple[np.ndarray, list[str]]:
    """Whole regions (in scene pixel coordinates) placed in the scene's CRS, exterior rings
    counter-clockwise (RFC 7946, also on a south-up or mirrored grid): their bounds in the CRS
    (``n x 4``: left, bottom, right, top) and each one's record as two lines of JSON, the
    geometry, then the properties (``id`` is added when it is written). All regions at once
    (shapely's array functions: a scene has thousands of regions); the geometry's text is
    GEOS's compact GeoJSON, every coordinate written so that it reads back as the same float
    (not always in Python's shortest digits)."""
    t = grid.transform

    def to_crs(xy: np.ndarray) -> np.ndarray:  # shapely.affinity.affine_transform's arithmetic
        x, y = xy.T
        return np.stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f], axis=1)

    pixels = np.array([piece.geometry for piece in pieces], dtype=object)
    placed = shapely.orient_polygons(shapely.transform(pixels, to_crs))
    texts = []
    for piece, geometry in zip(pieces, shapely.to_geojson(placed).tolist(), strict=True):
        total = piece.pre_mass + piece.post_mass
        post_share = piece.post_mass / total if np.isfinite(total) and total > 0 else None
        properties = strict_json(
            {
                "pixels": piece.pixels,
                "area_m2": piece.pixels * grid.pixel_area if metres else None,
                "mean_probability": piece.probability_sum / piece.pixels,
                "post_share": post_share,
            }
        )
        texts.append(f"{geometry}\n{json.dumps(properties, allow_nan=False)}")
    return shapely.bounds(placed), texts


# GDAL reads a GeoJSON without a ``crs`` member (or with a null one) as WGS84: a scene without
# a CRS is named a local one instead
LOCAL_CRS = 'LOCAL_CS["unknown",UNIT["metre",1]]'


def geojson_crs(grid: Grid) -> dict[str, Any]:
    """The ``crs`` member naming the scene's CRS: its EPSG code only when the CRS is exactly
    that code's (a UTM zone on another ellipsoid would otherwise be named, say, ED50, and land
    about 100 m off), else its WKT; a scene without one gets a local CRS."""
    crs = grid.crs
    if crs is None:
        name = LOCAL_CRS
    else:
        epsg = crs.to_epsg(confidence_threshold=100)
        name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def write_geojson(path: Path, features: SceneFeatures, grid: Grid) -> int:
    """A GeoJSON FeatureCollection in the scene's CRS (named in its GeoJSON 2008 ``crs``
    member, which QGIS and GDAL read; RFC 7946 readers take every file as WGS84), written
    atomically, one feature at a time from the spill; returns how many. The features' text is
    strict JSON already (:func:`region_texts`)."""
    head: dict[str, Any] = {"type": "FeatureCollection", "crs": geojson_crs(grid)}
    count = 0
    with atomic_open(path, "w") as f:
        f.write(json.dumps(head, allow_nan=False)[:-1] + ', "features": [\n')
        for count, text in enumerate(features.texts(), start=1):
            f.write(("" if count == 1 else ",\n") + text)
        f.write("\n]}\n")
    return count


__all__ = [
    "Piece",
    "RegionTracer",
    "SceneFeatures",
    "area_problem",
    "block_pieces",
    "geojson_crs",
    "join_pieces",
    "metric_crs",
    "region_texts",
    "scene_polygons",
    "write_geojson",
]

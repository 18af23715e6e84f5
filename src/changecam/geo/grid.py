"""The two dates of a scene on one pixel grid: open a pair, compare grids, reproject the post.

The pre scene's grid (CRS, affine transform, width and height) is the grid of every output.
If the post scene has the same grid it is read as it is; otherwise ``input.align=reproject``
(the default) reads it through a :class:`rasterio.vrt.WarpedVRT` onto the pre grid (bilinear;
pixels outside the post scene are masked), and ``input.align=strict`` refuses the pair naming
both grids. A pair without any overlap, or with a CRS on one side only, is refused.

A scene is a GeoTIFF (or COG) or a GDAL VRT of GeoTIFFs (e.g. Sentinel-2 bands stacked from
separate files with ``gdalbuildvrt -separate``, or a mosaic of tiles).
"""

from __future__ import annotations

import logging
import re
import shlex
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import rasterio
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Interleaving, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

log = logging.getLogger("changecam")
Align = Literal["reproject", "strict"]
ALIGNS: tuple[str, ...] = get_args(Align)


class SceneError(ValueError):
    """A scene pair changecam refuses (unreadable, misaligned, no overlap, bad bands ...)."""


@dataclass(frozen=True)
class Grid:
    """A raster's pixel grid: CRS (or ``None``), affine transform and size."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @classmethod
    def of(cls, dataset: Any) -> Grid:
        return cls(dataset.crs, dataset.transform, dataset.width, dataset.height)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        xs, ys = [], []
        for col, row in ((0, 0), (self.width, 0), (0, self.height), (self.width, self.height)):
            x, y = self.transform @ (col, row)
            xs.append(x)
            ys.append(y)
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in CRS units squared (|determinant| of the transform)."""
        return abs(self.transform.determinant)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def describe(self) -> str:
        crs = self.crs.to_string() if self.crs else "no CRS"
        t = self.transform
        return (
            f"{crs}, {self.width}x{self.height} px, origin ({exact(t.c)}, {exact(t.f)}), "
            f"pixel ({exact(t.a)}, {exact(t.e)})"
            + (f", rotation ({exact(t.b)}, {exact(t.d)})" if t.b or t.d else "")
        )

    def same_as(self, other: Grid) -> bool:
        return (
            self.crs == other.crs
            and self.transform.almost_equals(other.transform, precision=1e-9)
            and (self.width, self.height) == (other.width, other.height)
        )


def open_raster(path: str | Path, stack: ExitStack) -> Any:
    """Open a raster for reading inside ``stack``; unreadable files name themselves (a GDAL
    VRT's missing or truncated sources too). A VRT's sources stored in large blocks are
    warned about here (:func:`large_block_warning`); a plain file's, once its bands are chosen.

    Raises:
        SceneError: the file (or a file a VRT reads) is missing or is not a raster GDAL can read.
    """
    path = Path(path)
    if not path.is_file():
        raise SceneError(f"input scene {path} does not exist")
    try:
        dataset = stack.enter_context(rasterio.open(path))
    except RasterioError as err:
        raise SceneError(
            f"{path} cannot be read as a GeoTIFF (corrupt or truncated?): {err}"
        ) from err
    except UnicodeError as err:  # GDAL takes UTF-8 paths only
        raise SceneError(
            f"{str(path)!r} cannot be opened: its path is not valid UTF-8, which GDAL needs; "
            "rename it"
        ) from err
    check_opened_complete(dataset, path)
    large = []
    for source in vrt_sources(path):
        if not is_local(source):
            continue  # /vsizip/, /vsicurl/, DRIVER:...: GDAL reads it when a block needs it
        if not Path(source).is_file():
            raise SceneError(f"{path} reads {source}, which does not exist")
        try:
            with rasterio.open(source) as opened:
                check_opened_complete(opened, Path(source))
                large.append(large_block_warning(opened, opened.indexes, Path(source)))
        except RasterioError as err:
            raise SceneError(
                f"{path} reads {source}, which cannot be read as a raster: {err}"
            ) from err
    large = [w for w in large if w is not None]
    if large:  # one warning for the VRT: a mosaic may read thousands of such files
        many = f"{path} reads {len(large)} files stored in large blocks; the first: "
        log.warning((many if len(large) > 1 else "") + large[0])
    return dataset


def is_local(source: str) -> bool:
    """Whether a file name GDAL reads is a plain file on disk: one that exists, or one that is
    neither a ``/vsi…`` virtual file (``/vsizip/``, ``/vsicurl/``, ...) nor a ``DRIVER:…``
    connection string."""
    try:
        if Path(source).exists():
            return True
    except OSError:  # e.g. a name too long to be a file
        return False
    return not source.startswith("/vsi") and re.match(r"[A-Za-z]\w+:", source) is None


def vrt_sources(path: Path) -> list[str]:
    """The files a GDAL VRT reads, nested VRTs' too (sorted; plain files as absolute paths,
    virtual ones as GDAL names them); none for other files.

    Raises:
        SceneError: a VRT cannot be parsed, or it reads itself (directly or through others).
    """
    if path.suffix.lower() != ".vrt":
        return []
    found: set[str] = set()
    collect_sources(path.resolve(), (), found, set())
    return sorted(found)


def collect_sources(vrt: Path, chain: tuple[Path, ...], found: set[str], done: set[Path]) -> None:
    """Add the files ``vrt`` reads to ``found``, depth first; ``chain``: the VRTs that led here,
    ``done``: the VRTs already collected (a nested VRT several others read is read once)."""
    if vrt in chain:
        route = " -> ".join(str(p) for p in (*chain, vrt))
        raise SceneError(f"{chain[0]} reads itself ({route})")
    if vrt in done:
        return
    try:
        with rasterio.open(vrt) as dataset:
            files = list(dataset.files)[1:]  # GDAL lists the VRT itself first
    except RasterioError as err:
        raise SceneError(f"{vrt} cannot be read as a GDAL VRT: {err}") from err
    for name in files:
        source = str(Path(name).resolve()) if is_local(name) else name
        found.add(source)
        if source.lower().endswith(".vrt") and is_local(source) and Path(source).is_file():
            collect_sources(Path(source), (*chain, vrt), found, done)
    done.add(vrt)


def check_complete(dataset: Any, path: Path) -> None:
    """Refuse a TIFF whose tiles (or strips) reach past the end of the file, from its
    header alone: a cut download is named before any pixel is computed. (A tile corrupt inside
    the file is found when it is decoded.)

    Raises:
        SceneError: the file is shorter than its tiles need.
    """
    if dataset.driver != "GTiff":
        return
    size = path.stat().st_size
    separate = dataset.interleaving == Interleaving.band  # each band has its own tiles
    bands = range(1, dataset.count + 1) if separate else (1,)
    for band in bands:
        tile_rows, tile_cols = dataset.block_shapes[band - 1]
        for i in range(-(-dataset.height // tile_rows)):
            for j in range(-(-dataset.width // tile_cols)):
                offset = dataset.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=band)
                length = dataset.get_tag_item(f"BLOCK_SIZE_{j}_{i}", "TIFF", bidx=band)
                if offset is None or length is None:
                    continue  # a sparse tile (none written), or GDAL does not say
                if int(offset) + int(length) > size:
                    raise SceneError(
                        f"{path} is truncated (corrupt or cut short): band {band}'s tile "
                        f"({i}, {j}) ends at byte {int(offset) + int(length)} but the file has "
                        f"{size} bytes"
                    )


# bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., IFD8)
TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
TIFF_TYPE_BYTES |= {13: 4, 16: 8, 17: 8, 18: 8}


def tiff_directories(path: Path) -> int:
    """How many images (directories) a TIFF file chains, read from the file itself (classic
    TIFF and BigTIFF, either byte order), each directory and the values it keeps out of line
    (such as its tile offsets) found inside the file.

    Raises:
        SceneError: it is not a TIFF, or its header, a directory or a directory's values lie
            past the end of the file (cut short: GDAL would take the chain as ending there, or
            read the values as missing).
    """
    size = path.stat().st_size

    def cut_short(what: str) -> SceneError:
        return SceneError(
            f"{path} is truncated (corrupt or cut short): {what} reaches past the end of its "
            f"{size} bytes"
        )

    with open(path, "rb") as f:
        head = f.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        version = struct.unpack(order + "H", head[2:4])[0] if order and len(head) >= 4 else None
        if version not in (42, 43):
            raise SceneError(f"{path} is not a TIFF file")
        big = version == 43
        if len(head) < (16 if big else 8):
            raise cut_short("its header")
        # with the byte order given, struct adds no alignment padding
        count_format, entry_format, inline = ("Q", "HHQQ", 8) if big else ("H", "HHII", 4)
        count_bytes = struct.calcsize(order + count_format)
        entry_bytes = struct.calcsize(order + entry_format)
        next_format = order + entry_format[-1]
        next_bytes = struct.calcsize(next_format)
        offset = struct.unpack_from(next_format, head, 8 if big else 4)[0]
        images, seen = 0, set()
        while offset and offset not in seen:  # (a loop: libtiff refuses the file when read)
            seen.add(offset)
            directory = f"its directory {images + 1} (an image, a mask or an overview)"
            if offset + count_bytes + next_bytes > size:
                raise cut_short(directory)
            f.seek(offset)
            (entries,) = struct.unpack(order + count_format, f.read(count_bytes))
            if entries > (size - offset - count_bytes - next_bytes) // entry_bytes:
                raise cut_short(directory)
            table = f.read(entries * entry_bytes + next_bytes)
            for i in range(entries):
                _, kind, count, value = struct.unpack_from(
                    order + entry_format, table, i * entry_bytes
                )
                length = count * TIFF_TYPE_BYTES.get(kind, 0)  # an unknown type: ignored
                if length > inline and value + length > size:
                    raise cut_short(f"the values of {directory}")
            images += 1
            (offset,) = struct.unpack_from(next_format, table, entries * entry_bytes)
    return images


def check_opened_complete(dataset: Any, path: Path) -> None:
    """An input's :func:`check_every_image_complete` where it is a TIFF (``dataset``, opened,
    is its main image): a file cut inside its internal mask's or an overview's directory
    opens, and GDAL fails only when it reads that directory."""
    if dataset.driver == "GTiff":
        check_every_image_complete(path, dataset)


def check_every_image_complete(path: Path, opened: Any = None) -> None:
    """:func:`check_complete` for every image a GeoTIFF chains (:func:`tiff_directories`;
    ``GTIFF_DIR:n:path``): the main one (``opened``, when the caller has it open), its
    internal masks and its overviews.

    Raises:
        SceneError: a directory, or one of an image's tiles, lies past the end of the file.
    """
    for number in range(1, tiff_directories(path) + 1):
        if number == 1 and opened is not None:
            check_complete(opened, path)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a mask's image
            with rasterio.open(f"GTIFF_DIR:{number}:{path}") as dataset:
                check_complete(dataset, path)


# a file block (tile or strip) decoded larger than this: every window read decodes whole blocks
# (a single-strip 8192² 16-bit scene: 512 MiB each time), so memory and time grow with it
LARGE_BLOCK_BYTES = 32 * 1024 * 1024


def decoded_block_bytes(dataset: Any, bands: Sequence[int]) -> int:
    """Bytes GDAL decodes for one block of ``dataset``'s file: a pixel-interleaved block holds
    every band, a band-interleaved one the selected band (summed over ``bands``)."""
    height, width = dataset.block_shapes[bands[0] - 1]
    interleaved = getattr(dataset.interleaving, "name", None) == "pixel"
    indexes = dataset.indexes if interleaved else sorted(set(bands))
    return sum(height * width * np.dtype(dataset.dtypes[b - 1]).itemsize for b in indexes)


def large_block_warning(dataset: Any, bands: Sequence[int], path: Path) -> str | None:
    """A warning for a file whose blocks are too large to read window by window in bounded
    memory (a whole-image strip, typically), with the command that rewrites it tiled. None for a
    GDAL VRT: its blocks are virtual, read from its sources (see :func:`open_raster`) by window."""
    if dataset.driver == "VRT":
        return None
    size = decoded_block_bytes(dataset, bands)
    if size <= LARGE_BLOCK_BYTES:
        return None
    height, width = dataset.block_shapes[bands[0] - 1]
    path = Path(path)
    tiled = path.with_name(f"{path.stem}_tiled.tif")
    cache_mb = max(512, 2 * -(-size // 2**20))  # the whole block in GDAL's cache while copying
    return (
        f"{path} is stored in blocks of {height}x{width} px ({size / 2**20:.0f} MiB decoded"
        f"{', a single strip' if height == dataset.height else ''}): every window read decodes "
        "whole blocks, so memory and time grow with them and the scene is not read in bounded "
        f"memory. Rewrite it tiled once: GDAL_CACHEMAX={cache_mb} rio convert --co tiled=true "
        "--co blockxsize=256 --co blockysize=256 --co compress=deflate "
        # JPEG's YCbCr encoding goes with JPEG compression only; GDAL decodes it to RGB
        + ("--co photometric=rgb " if is_ycbcr(dataset) else "")
        + f"{shlex.quote(str(path))} {shlex.quote(str(tiled))}"
    )


def is_ycbcr(dataset: Any) -> bool:
    """Whether the file stores YCbCr (JPEG-compressed TIFFs' usual encoding), which GDAL reads
    as RGB."""
    structure = dataset.tags(ns="IMAGE_STRUCTURE")
    return str(structure.get("SOURCE_COLOR_SPACE", "")).upper() == "YCBCR"


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    """Refuse a ``value`` of the setting ``key`` that is not one of ``allowed``.

    Raises:
        SceneError: naming the key, the value and the allowed ones.
    """
    if value not in allowed:
        raise SceneError(f"{key}={value!r} is not allowed; expected one of {list(allowed)}")


def exact(value: float) -> str:
    """``value`` in as few digits as tell it from every other float (``399872``, ``0.5``,
    ``3510144.0000000037``): grids that differ show it."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def check_georeferenced(dataset: Any, path: Path) -> None:
    """Refuse a file without a geotransform that is georeferenced otherwise: by ground control
    points or RPCs alone, or by a CRS alone (a ``gdal_edit -a_srs`` on an image never placed,
    or a ``.tif`` copied without its world file). Read pixel for pixel, it would be compared
    with the other date as if the two were aligned, and its outputs would be labelled with a
    CRS their (column, row) coordinates are not in.

    Raises:
        SceneError: the file has GCPs, RPCs or a CRS but no geotransform.
    """
    if not dataset.transform.is_identity:
        return
    how = "ground control points" if dataset.gcps[0] else "RPCs" if dataset.rpcs else None
    if how is not None:
        raise SceneError(
            f"{path} is georeferenced by {how} only (no geotransform): warp it onto a grid first, "
            f"e.g. gdalwarp -t_srs <CRS> {path.name} {path.stem}_warped.tif"
            + (" -rpc" if how == "RPCs" else "")
        )
    if dataset.crs is not None:
        quoted = shlex.quote(str(path))
        raise SceneError(
            f"{path} has a CRS ({dataset.crs.to_string()}) but no geotransform, so its pixels "
            "have no place in it: give it one (gdal_edit -a_ullr <ulx> <uly> <lrx> <lry> "
            f"{quoted}, or for a GeoTIFF a world file beside it), or remove the CRS of both dates "
            f"(gdal_edit -a_srs None {quoted}) to predict the pair pixel for pixel"
        )


@dataclass(frozen=True)
class ScenePair:
    """An opened pair on the pre grid: ``post`` is the post dataset or its WarpedVRT."""

    pre: Any
    post: Any
    post_source: Any  # the post dataset as stored (band count, dtype, scaling sample)
    grid: Grid
    reprojected: bool
    pre_path: Path
    post_path: Path


def boxes_meet(box: Sequence[float], other: Sequence[float]) -> bool:
    """Whether two ``(left, bottom, right, top)`` boxes share area; ``other``'s left beyond
    its right is a box across the antimeridian (as ``transform_bounds`` gives one)."""
    left, bottom, right, top = box
    other_left, other_bottom, other_right, other_top = other
    if min(top, other_top) <= max(bottom, other_bottom):
        return False
    if other_left <= other_right:
        spans = [(other_left, other_right)]
    else:
        spans = [(other_left, np.inf), (-np.inf, other_right)]
    return any(min(right, r) > max(left, lo) for lo, r in spans)


# what GDAL and PROJ raise through rasterio: its own errors, and the CPLE errors it passes on
# as they are (no coordinate operation between two CRSs, for one)
GDAL_ERRORS = (RasterioError, CPLE_BaseError)


def check_overlap(pre: Grid, post: Grid, pre_path: Path, post_path: Path) -> None:
    """Refuse a pair whose footprints do not intersect. With two CRSs each footprint is taken
    into the other's CRS, and the pair is kept when either meets: a box taken into another CRS
    can come out narrower than what it covers (the whole globe in a UTM zone starts at the
    zone's central meridian), and a pair kept wrongly is refused later, its overlap all nodata.
    """
    if pre.crs is None or post.crs is None or pre.crs == post.crs:
        seen = tuple(post.bounds)
        meets = boxes_meet(pre.bounds, seen)
    else:
        try:
            seen = transform_bounds(post.crs, pre.crs, *post.bounds, densify_pts=21)
        except GDAL_ERRORS as err:  # a local (engineering) CRS has no way into a projected one
            raise SceneError(
                f"{post_path}'s CRS {post.crs.to_string()} cannot be taken into the CRS "
                f"{pre.crs.to_string()} of {pre_path}, so the post scene cannot be placed on the "
                f"pre scene's grid: {err}"
            ) from err
        meets = boxes_meet(pre.bounds, seen)
        if not meets:
            try:
                pre_seen = transform_bounds(pre.crs, post.crs, *pre.bounds, densify_pts=21)
            except Exception:  # noqa: BLE001 - PROJ's CPLE errors: outside the post CRS
                pre_seen = None
            meets = pre_seen is not None and boxes_meet(post.bounds, pre_seen)
    if not meets:
        raise SceneError(
            f"the scenes do not overlap: {pre_path} covers {pre.bounds} and {post_path} covers "
            f"{seen} (in the pre scene's CRS {pre.crs.to_string() if pre.crs else 'none'})"
        )


def warped(post: Any, grid: Grid, resampling: Resampling) -> WarpedVRT:
    """``post`` read on ``grid``. Pixels outside the post scene are masked: by its nodata
    value, its own alpha band, or an alpha band the warp adds."""
    has_alpha = ColorInterp.alpha in post.colorinterp
    return WarpedVRT(
        post,
        crs=grid.crs,
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        resampling=resampling,
        add_alpha=post.nodata is None and not has_alpha,
    )


@contextmanager
def post_on_sample_grid(pair: ScenePair, factor: int) -> Iterator[Any]:
    """The post date on the pixel centres a ``factor``-decimated read of the pre grid takes
    (every ``factor``-th pixel of every ``factor``-th row, from the first), nearest neighbour:
    a reprojected post's percentile sample without warping the whole scene."""
    if not pair.reprojected:
        yield pair.post
        return
    grid = pair.grid
    shift = -(factor - 1) / 2  # a coarse pixel's centre on its first fine pixel's centre
    coarse = Grid(
        grid.crs,
        grid.transform * Affine.translation(shift, shift) * Affine.scale(factor),
        -(-grid.width // factor),
        -(-grid.height // factor),
    )
    with warped(pair.post_source, coarse, Resampling.nearest) as vrt:
        yield vrt


@contextmanager
def open_pair(
    pre_path: str | Path, post_path: str | Path, align: Align = "reproject"
) -> Iterator[ScenePair]:
    """Open both dates; the post one on the pre grid (see the module docstring).

    Raises:
        SceneError: unreadable file, georeferenced by GCPs or RPCs only, CRS on one side
            only, no overlap, (``strict``) different grids, or a post scene GDAL cannot warp.
    """
    check_choice("input.align", align, ALIGNS)
    pre_path, post_path = Path(pre_path), Path(post_path)
    with ExitStack() as stack:
        pre = open_raster(pre_path, stack)
        post = open_raster(post_path, stack)
        for dataset, path in ((pre, pre_path), (post, post_path)):
            check_georeferenced(dataset, path)
        pre_grid, post_grid = Grid.of(pre), Grid.of(post)
        if (pre_grid.crs is None) != (post_grid.crs is None):
            has, lacks = (pre_path, post_path) if post_grid.crs is None else (post_path, pre_path)
            raise SceneError(
                f"{lacks} has no CRS but {has} has one ({(pre_grid.crs or post_grid.crs).to_string()}); "
                "both dates need a CRS (or neither, for pixel-aligned scenes of the same size)"
            )
        if pre_grid.same_as(post_grid):
            if pre_grid.crs is None and pre_grid.transform.is_identity:
                log.warning(
                    "%s is not georeferenced: the pair is read pixel for pixel, the rasters "
                    "carry no georeferencing and change.geojson's coordinates are (column, row)",
                    pre_path,
                )
            yield ScenePair(pre, post, post, pre_grid, False, pre_path, post_path)
            return
        if align == "strict":
            raise SceneError(
                f"input.align=strict: the scenes are on different grids: {pre_path}: "
                f"{pre_grid.describe()}; {post_path}: {post_grid.describe()} "
                "(input.align=reproject reads the post scene on the pre grid)"
            )
        check_overlap(pre_grid, post_grid, pre_path, post_path)
        if pre_grid.crs is None:
            raise SceneError(
                f"the scenes have no CRS and different grids ({pre_path}: {pre_grid.describe()}; "
                f"{post_path}: {post_grid.describe()}): without a CRS they cannot be aligned"
            )
        try:
            vrt = stack.enter_context(warped(post, pre_grid, Resampling.bilinear))
        except GDAL_ERRORS as err:
            raise SceneError(
                f"{post_path} cannot be reprojected onto the grid of {pre_path} "
                f"({pre_grid.describe()}): {err}"
            ) from err
        yield ScenePair(pre, vrt, post, pre_grid, True, pre_path, post_path)


__all__ = [
    "ALIGNS",
    "LARGE_BLOCK_BYTES",
    "Align",
    "Grid",
    "ScenePair",
    "SceneError",
    "check_choice",
    "check_complete",
    "check_georeferenced",
    "check_overlap",
    "collect_sources",
    "decoded_block_bytes",
    "is_local",
    "large_block_warning",
    "open_pair",
    "open_raster",
    "post_on_sample_grid",
    "vrt_sources",
    "warped",
]

"""Cut a scene into output blocks, each with the halo its sliding windows need, and read the
next blocks in a background thread while the network runs.

The sliding windows are those of the *whole* scene (:func:`changecam.models.sliding_window.
window_starts` over its height and width). An output block takes every window that touches it;
the region read is the union of those windows (the block plus a halo of at most one window),
so blending the region's windows (:func:`~changecam.models.sliding_window.blend_windows`) gives
each block pixel exactly the value a whole-scene blend would give. Scenes narrower than one
window are padded like the PNG path pads them.
"""

from __future__ import annotations

import queue
import shlex
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from changecam.geo.bands import Scaling, all_valid, finite_values, valid_mask
from changecam.geo.gdal_lock import GDAL_LOCK
from changecam.geo.grid import SceneError, is_local, vrt_sources
from changecam.models.sliding_window import SlidingWindow, window_starts


@dataclass(frozen=True)
class Block:
    """One output block (``row``, ``col``, ``height``, ``width`` in scene pixels) and the region
    read for it (``region_*``), with the window starts inside that region."""

    index: int
    row: int
    col: int
    height: int
    width: int
    region_row: int
    region_col: int
    region_height: int  # read from the scene (may be less than the windows span: padding)
    region_width: int
    rows: tuple[int, ...]  # window starts, relative to the region
    cols: tuple[int, ...]

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.width, self.height)

    @property
    def region(self) -> Window:
        return Window(self.region_col, self.region_row, self.region_width, self.region_height)

    @property
    def windows(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def pixels(self) -> int:
        return self.height * self.width


def _axis(
    start: int, stop: int, length: int, window: int, stride: int
) -> tuple[int, int, list[int]]:
    """Region start, region length read from the scene, and window starts (relative) of the
    windows covering ``[start, stop)`` along one axis."""
    starts = window_starts(max(length, window), window, stride)
    used = [s for s in starts if s < stop and s + window > start]
    first = used[0]
    end = min(length, used[-1] + window)
    return first, end - first, [s - first for s in used]


def block_grid(height: int, width: int, block: int, spec: SlidingWindow) -> list[Block]:
    """The blocks of a ``height x width`` scene, row-major, ``block`` pixels a side."""
    blocks = []
    for row in range(0, height, block):
        bh = min(block, height - row)
        r0, rh, rows = _axis(row, row + bh, height, spec.window, spec.stride)
        for col in range(0, width, block):
            bw = min(block, width - col)
            c0, cw, cols = _axis(col, col + bw, width, spec.window, spec.stride)
            blocks.append(
                Block(len(blocks), row, col, bh, bw, r0, c0, rh, cw, tuple(rows), tuple(cols))
            )
    return blocks


@dataclass
class Region:
    """The decoded inputs of one block's region: uint8 ``C x H x W`` per date, valid mask."""

    block: Block
    pre: np.ndarray
    post: np.ndarray
    valid: np.ndarray  # bool H x W: valid in both dates


def read_region(
    pre: Any,
    post: Any,
    bands: Sequence[int],
    scaling: tuple[Scaling, Scaling],
    block: Block,
    paths: tuple[Path, Path] | None = None,
) -> Region:
    """Read and scale one block's region of both dates (nodata pixels set to 0). A date whose
    mask flags say every pixel is valid (:func:`~changecam.geo.bands.all_valid`) has no mask to
    read.

    Raises:
        SceneError: a date's tiles cannot be decoded (named by ``paths``, else the dataset's
            name), with GDAL's own message.
    """
    window = block.region
    raw = []
    valid = np.ones((block.region_height, block.region_width), dtype=bool)
    names = paths or (pre.name, post.name)
    for dataset, name in zip((pre, post), names, strict=True):
        try:
            with GDAL_LOCK:  # the writer and tracer threads use GDAL too (geo.gdal_lock)
                data = dataset.read(list(bands), window=window)
                if not all_valid(dataset, bands):
                    valid &= valid_mask(dataset, bands, window)
        except RasterioError as err:
            cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
            raise SceneError(
                f"{name} cannot be decoded at rows {block.region_row}-"
                f"{block.region_row + block.region_height - 1}, columns {block.region_col}-"
                f"{block.region_col + block.region_width - 1} (corrupt or truncated file?): "
                f"{err}{cause}"
            ) from err
        raw.append(finite_values(data, valid))
    arrays = []
    for data, scale, name in zip(raw, scaling, names, strict=True):
        if scale.lo is None and data.dtype != np.uint8:  # valid: in both dates
            check_network_range(data, valid, name, block)
        arrays.append(scale.apply(data))
    if not valid.all():
        for image in arrays:
            image[:, ~valid] = 0
    return Region(block, arrays[0], arrays[1], valid)


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
    memory (a whole-image strip, typically), with the command that rewrites it tiled."""
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
        f"{shlex.quote(str(path))} {shlex.quote(str(tiled))}"
    )


def large_block_warnings(dataset: Any, bands: Sequence[int], path: Path) -> list[str]:
    """:func:`large_block_warning` for the file or, if it is a GDAL VRT, for the plain files it
    reads (every band of each; one warning naming the first and counting the others): a VRT's
    own blocks are virtual, read from its sources by window."""
    sources = [s for s in vrt_sources(Path(path)) if is_local(s) and not s.lower().endswith(".vrt")]
    if not sources:
        warning = large_block_warning(dataset, bands, path)
        return [] if warning is None else [warning]
    large = []
    for source in sources:
        try:
            with rasterio.open(source) as opened:
                warning = large_block_warning(opened, opened.indexes, Path(source))
        except RasterioError:  # gone since it was checked: reading the block will say so
            continue
        if warning is not None:
            large.append(warning)
    if len(large) > 1:
        return [f"{path} reads {len(large)} files stored in large blocks; the first: {large[0]}"]
    return large


def check_network_range(
    data: np.ndarray, valid: np.ndarray, name: Any, block: Block | None = None
) -> None:
    """``input.scale=none``: the valid values (of ``block``, or of the scene's sample when
    ``None``) must already lie in the network's 0-255.

    Raises:
        SceneError: one does not (it would be clipped, silently changing the image).
    """
    values = data[:, valid]
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        where = (
            "in its sample"
            if block is None
            else f"at rows {block.region_row}-{block.region_row + block.region_height - 1}, "
            f"columns {block.region_col}-{block.region_col + block.region_width - 1}"
        )
        raise SceneError(
            f"input.scale=none but {name} has values {low!r} to {high!r} {where}, outside the "
            "network's 0-255; set input.scale=percentile (a 2-98 % stretch per scene) or "
            "input.scale=fixed with input.scale_min/input.scale_max"
        )


_DONE = object()


def prefetched(
    blocks: Sequence[Block], read: Callable[[Block], Region], depth: int = 2
) -> Iterator[Region]:
    """``read(block)`` for every block, in order, decoded by a background thread up to
    ``depth`` blocks ahead; an error in the thread is raised here, and leaving the loop early
    stops the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for block in blocks:
                if stop.is_set():
                    return
                item: Any = read(block)
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer
            slots.put(err)
            return
        slots.put(_DONE)

    thread = threading.Thread(target=worker, name="changecam-scene-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


__all__ = [
    "LARGE_BLOCK_BYTES",
    "Block",
    "Region",
    "block_grid",
    "large_block_warning",
    "large_block_warnings",
    "prefetched",
    "read_region",
]

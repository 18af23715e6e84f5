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
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window

from changecam.geo.bands import Scaling, all_valid, finite_values, read_values, valid_mask
from changecam.geo.gdal_lock import GDAL_LOCK
from changecam.geo.grid import SceneError
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
    def window_starts(self) -> list[tuple[int, int]]:
        """The starts of its windows in scene pixels (row, column), row-major."""
        return [(self.region_row + r, self.region_col + c) for r in self.rows for c in self.cols]

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
                data = read_values(dataset, bands, window)
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
            where = (
                f"at rows {block.region_row}-{block.region_row + block.region_height - 1}, "
                f"columns {block.region_col}-{block.region_col + block.region_width - 1}"
            )
            check_network_range(data, valid, name, where)
        arrays.append(scale.apply(data))
    if not valid.all():
        for image in arrays:
            image[:, ~valid] = 0
    return Region(block, arrays[0], arrays[1], valid)


def check_network_range(data: np.ndarray, valid: np.ndarray, name: Any, where: str) -> None:
    """``input.scale=none``: the valid values of ``data`` (read ``where``) must already lie in
    the network's 0-255.

    Raises:
        SceneError: one does not (it would be clipped, silently changing the image).
    """
    values = data[:, valid]
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise SceneError(
            f"input.scale=none but {name} has values {low!r} to {high!r} {where}, outside the "
            "network's 0-255; set input.scale=percentile (a 2-98 % stretch per date) or "
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
    "Block",
    "Region",
    "block_grid",
    "check_network_range",
    "prefetched",
    "read_region",
]

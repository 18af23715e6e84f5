"""Two georeferenced scenes on one grid, read window by window (rasterio; GDAL from its wheel).

:class:`ScenePair` opens the pre and post GeoTIFF/COG, checks that they can be compared and puts
the post scene on the pre scene's grid: used as it is when CRS, transform and size agree,
reprojected on the fly through a ``WarpedVRT`` (``align="reproject"``) or refused
(``align="strict"``) otherwise. :meth:`ScenePair.read` returns one window of both dates as
uint8 RGB (band selection and scaling applied) and the window's valid-data mask: a pixel that
is nodata (or masked) in either date is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

Align = Literal["reproject", "strict"]
Scale = Literal["auto", "percentile", "fixed"]


class SceneError(ValueError):
    """A scene pair that cannot be read or compared; the message names the file and why."""


@dataclass(frozen=True)
class SceneSettings:
    """How the two scenes are read.

    Args:
        bands: 1-based band indices giving R, G, B (e.g. ``(3, 2, 1)`` for a 4-band B/G/R/NIR
            scene); ``None``: bands 1-3, which both scenes must have the same count of.
        scale: ``auto`` (uint8 as it is, other types ``percentile``), ``percentile`` (each
            scene's 2-98 % per band from a decimated read, to 0-255) or ``fixed``.
        scale_min: ``fixed`` only: the value mapped to 0.
        scale_max: ``fixed`` only: the value mapped to 255.
        align: what to do when the grids differ: ``reproject`` post onto pre's grid or
            refuse (``strict``).
    """

    bands: tuple[int, ...] | None = None
    scale: Scale = "auto"
    scale_min: float | None = None
    scale_max: float | None = None
    align: Align = "reproject"

    def __post_init__(self) -> None:
        if self.align not in ("reproject", "strict"):
            raise SceneError(f"input.align={self.align!r}: choose reproject or strict")
        if self.scale not in ("auto", "percentile", "fixed"):
            raise SceneError(f"input.scale={self.scale!r}: choose auto, percentile or fixed")
        if self.scale == "fixed" and (self.scale_min is None or self.scale_max is None):
            raise SceneError("input.scale=fixed needs input.scale_min and input.scale_max")
        if self.bands is not None and len(self.bands) != 3:
            raise SceneError(f"input.bands={list(self.bands)}: give three bands (R, G, B)")


def _grid(ds) -> str:
    return f"CRS {ds.crs}, {ds.width}x{ds.height} px, transform {tuple(ds.transform)[:6]}"


def _open(path: Path):
    """Open ``path`` and decode a decimated read of every band: a corrupt or truncated file
    fails here, before any output exists."""
    if not path.is_file():
        raise SceneError(f"{path}: no such scene")
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as err:
        raise SceneError(f"{path}: not a readable GeoTIFF ({err})") from err
    try:
        step = max(1, max(ds.width, ds.height) // 256)
        ds.read(out_shape=(ds.count, max(1, ds.height // step), max(1, ds.width // step)))
    except rasterio.errors.RasterioIOError as err:
        ds.close()
        raise SceneError(f"{path}: not a readable GeoTIFF, corrupt or truncated ({err})") from err
    return ds


class ScenePair:
    """The pre and post scene on the pre scene's grid. Use as a context manager."""

    def __init__(self, pre: str | Path, post: str | Path, settings: SceneSettings) -> None:
        self.settings = settings
        self.paths = (Path(pre), Path(post))
        self._files = [_open(self.paths[0])]
        try:
            self._files.append(_open(self.paths[1]))
            self.pre_ds, post_ds = self._files
            self.bands = self._bands(self.pre_ds, post_ds)
            self.post_ds = self._aligned(self.pre_ds, post_ds)
            self.ranges = [
                self._range(ds, path)
                for ds, path in zip((self.pre_ds, self.post_ds), self.paths, strict=True)
            ]
        except BaseException:
            self.close()
            raise

    # -- grid -------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.pre_ds.width

    @property
    def height(self) -> int:
        return self.pre_ds.height

    @property
    def crs(self):
        return self.pre_ds.crs

    @property
    def transform(self):
        return self.pre_ds.transform

    def _aligned(self, pre, post):
        pre_path, post_path = self.paths
        if (pre.crs is None) != (post.crs is None):
            missing = pre_path if pre.crs is None else post_path
            raise SceneError(f"{missing}: has no CRS but the other scene has one; cannot align")
        same = (
            pre.crs == post.crs
            and pre.transform.almost_equals(post.transform)
            and (pre.width, pre.height) == (post.width, post.height)
        )
        if same:
            return post
        if self.settings.align == "strict":
            raise SceneError(
                "input.align=strict and the grids differ:\n"
                f"  pre  {pre_path}: {_grid(pre)}\n  post {post_path}: {_grid(post)}"
            )
        if pre.crs is None:
            raise SceneError(
                f"{pre_path} and {post_path}: grids differ and neither has a CRS to reproject by"
            )
        vrt = WarpedVRT(
            post,
            crs=pre.crs,
            transform=pre.transform,
            width=pre.width,
            height=pre.height,
            resampling=Resampling.bilinear,
            src_nodata=post.nodata,
            nodata=post.nodata if post.nodata is not None else 0,
            add_alpha=post.nodata is None,
        )
        self._files.append(vrt)
        probe = vrt.read_masks(1, out_shape=(min(256, pre.height), min(256, pre.width)))
        if not probe.any():
            raise SceneError(
                f"{pre_path} and {post_path} do not overlap:\n"
                f"  pre  bounds {tuple(pre.bounds)} ({pre.crs})\n"
                f"  post bounds {tuple(post.bounds)} ({post.crs})"
            )
        return vrt

    def _bands(self, pre, post) -> tuple[int, int, int]:
        bands = self.settings.bands
        if bands is None:
            if pre.count != post.count:
                raise SceneError(
                    f"{self.paths[0]} has {pre.count} bands and {self.paths[1]} {post.count}: "
                    "choose the RGB bands with input.bands=[r,g,b]"
                )
            if pre.count < 3:
                raise SceneError(f"{self.paths[0]}: {pre.count} band(s); RGB needs 3")
            return (1, 2, 3)
        for ds, path in zip((pre, post), self.paths, strict=True):
            bad = [b for b in bands if not 1 <= b <= ds.count]
            if bad:
                raise SceneError(
                    f"input.bands={list(bands)}: band {bad[0]} is out of range for {path} "
                    f"({ds.count} bands, 1-based)"
                )
        return tuple(bands)  # type: ignore[return-value]

    def _range(self, ds, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-band (low, high) to map to 0-255, or None for uint8 kept as it is."""
        s = self.settings
        if s.scale == "fixed":
            return np.full(3, s.scale_min, np.float64), np.full(3, s.scale_max, np.float64)
        if s.scale == "auto" and ds.dtypes[0] == "uint8":
            return None
        step = max(1, max(ds.width, ds.height) // 1024)  # a decimated read (an overview if any)
        shape = (3, max(1, ds.height // step), max(1, ds.width // step))
        data = ds.read(list(self.bands), out_shape=shape, masked=True)
        valid = ~np.ma.getmaskarray(data).any(axis=0)
        if not valid.any():
            raise SceneError(f"{path}: every pixel is nodata")
        low = np.array([np.percentile(data[b].data[valid], 2) for b in range(3)])
        high = np.array([np.percentile(data[b].data[valid], 98) for b in range(3)])
        return low, np.maximum(high, low + 1e-6)

    # -- reading ----------------------------------------------------------------------------
    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pre H×W×3 uint8, post H×W×3 uint8, valid H×W bool) of ``window``; the parts of the
        window outside the scene are zeros and invalid."""
        height, width = int(window.height), int(window.width)
        inner = window.intersection(Window(0, 0, self.width, self.height))
        rows = slice(
            int(inner.row_off - window.row_off), int(inner.row_off - window.row_off + inner.height)
        )
        cols = slice(
            int(inner.col_off - window.col_off), int(inner.col_off - window.col_off + inner.width)
        )
        images, valid = [], np.zeros((height, width), dtype=bool)
        valid[rows, cols] = True
        for ds, scale in zip((self.pre_ds, self.post_ds), self.ranges, strict=True):
            data = ds.read(list(self.bands), window=inner, masked=True)
            valid[rows, cols] &= ~np.ma.getmaskarray(data).any(axis=0)
            values = np.asarray(data.data, dtype=np.float64)
            if scale is not None:
                low, high = scale
                values = (values - low[:, None, None]) / (high - low)[:, None, None] * 255.0
            image = np.zeros((height, width, 3), dtype=np.uint8)
            image[rows, cols] = np.rint(np.clip(values, 0, 255)).astype(np.uint8).transpose(1, 2, 0)
            images.append(image)
        return images[0], images[1], valid

    def close(self) -> None:
        for f in reversed(self._files):
            f.close()
        self._files = []

    def __enter__(self) -> ScenePair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

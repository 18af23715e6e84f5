"""The map-ready rasters of one scene, written block by block to hidden partial files that are
renamed into place, all together, only when the whole scene is done.

* ``change.tif``: uint8, 1 = change, 0 = no change, 255 = nodata (either date had none);
* ``probability.tif``: uint16, ``p = value / 65535``, nodata pixels masked (an internal mask);
* ``explanation.tif`` (when explained): float32, bands ``pre_<method>``, ``post_<method>``
  (HiResCAM, or date-contrastive HiResCAM, of the chosen layer, logit contribution per pixel,
  blended like the logits) and ``post_share`` (``ReLU(post) / (ReLU(pre) + ReLU(post))`` per
  pixel; NaN where undefined); nodata NaN.

Every raster has the pre scene's CRS and transform, 256 px tiles, DEFLATE compression and
overviews (built at the end; see :data:`ZLEVEL` for the levels). Until then the files are
``.<name>.part`` beside their final name, which no ``*.tif`` glob matches: a killed run leaves
no file that looks finished, except in the instant the finished files are renamed into place,
before ``scene.json`` is written (a resume takes them back and finishes the scene; a run
without ``resume`` removes them). Each block is written in its own update session (open,
write, close), so a block recorded as done in the scene's log is on disk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from changecam.atomic import fsync_directory, fsync_file, temporary_path
from changecam.data.io import PROBABILITY_SCALE, encode_probability
from changecam.geo.grid import Grid, SceneError, check_every_image_complete
from changecam.geo.windows import Block

log = logging.getLogger("changecam")
TILE = 256  # the rasters' tile side (smaller blocks use their own side)
CHANGE_NODATA = 255
RASTERS = ("change", "probability", "explanation")
# each raster's tag naming the settings it was made with (a hash of the scene's resume record)
SETTINGS_TAG = "changecam_settings"
EXPLANATION_BANDS = ("pre_hirescam", "post_hirescam", "post_share")


def explanation_bands(method: str) -> tuple[str, str, str]:
    """The band names of ``explanation.tif`` explained with ``method``."""
    return (f"pre_{method}", f"post_{method}", "post_share")


# DEFLATE's fastest level, for the overviews (ZLEVEL_OVERVIEW) and the rasters written in one
# session: about as large, built in half the time, and every reader of DEFLATE reads them. The
# blocks do not get it: GDAL keeps a creation's level for that session only (it is not stored
# in the file) and takes none when a file is opened to update it, as each block is, so they
# are compressed at libtiff's default level, 6, as are the post_share overviews rewritten in
# an update (by hand, a 2048² probability raster then written with a predictor: 157 ms in 4
# update sessions, 159 ms in one at level 6, 66 ms at level 1; level 6 0.2 % smaller)
ZLEVEL = 1
OVERVIEW_RESAMPLING = {
    # the mean of the valid 0/1 pixels, rounded: their majority (a tie counts as change), as
    # GDAL's mode would give for two classes, more cheaply (each level from the one below: a
    # majority of majorities beyond x2)
    "change": Resampling.average,
    "probability": Resampling.average,
    "explanation": Resampling.average,
}


@dataclass(frozen=True)
class WrittenBlock:
    """One block as written: ``change`` (uint8, :data:`CHANGE_NODATA` where invalid),
    ``probability`` (uint16, ``p * 65535``) and ``explanation`` (float32 ``3 x h x w``, NaN
    where invalid; ``None`` when not explained)."""

    change: np.ndarray
    probability: np.ndarray
    explanation: np.ndarray | None


def partial_path(path: Path) -> Path:
    """The hidden name a file has until its scene is finished."""
    return path.with_name(f".{path.name}.part")


def tile_side(block_size: int) -> int:
    """The tile side of the rasters for blocks of ``block_size``: 256, or the block side when
    that is not a multiple of 256 (GeoTIFF tiles are multiples of 16), so that every tile is
    written by exactly one block."""
    return TILE if block_size % TILE == 0 else block_size


def read_partial_block(
    dataset: Any, block: Block, band: int | None = None, mask: bool = False
) -> np.ndarray:
    """One block of a partial raster an earlier run wrote (``mask``: its validity mask).

    Raises:
        SceneError: it cannot be decoded (the file was damaged since), naming the file and
            saying to start over.
    """
    try:
        if mask:
            return dataset.read_masks(band, window=block.window)
        return dataset.read(band, window=block.window)
    except rasterio.errors.RasterioError as err:
        raise SceneError(
            f"{dataset.name}, written by the run being resumed, cannot be read back at block "
            f"{block.index} (damaged since?): {err}; rerun without predict.resume"
        ) from err


@dataclass(frozen=True)
class SceneFiles:
    """The output files of one scene in ``folder``. ``masked``: the scene may have nodata,
    so ``probability.tif`` carries a validity mask (without one GDAL reads every pixel as
    valid; GDAL builds its overviews several times faster without a mask to follow).
    ``polygons``: ``change.geojson`` is one of them. ``method``: the explanation's (its band
    names)."""

    folder: Path
    explain: bool
    tile: int = TILE
    masked: bool = True
    polygons: bool = True
    method: str = "hirescam"

    def final(self, what: str) -> Path:
        return self.folder / ("change.geojson" if what == "polygons" else f"{what}.tif")

    def partial(self, what: str) -> Path:
        return partial_path(self.final(what))

    @property
    def rasters(self) -> tuple[str, ...]:
        return RASTERS if self.explain else RASTERS[:2]

    @property
    def bands(self) -> tuple[str, str, str]:
        return explanation_bands(self.method)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*self.rasters, "polygons") if self.polygons else self.rasters

    def profile(self, what: str, grid: Grid) -> dict[str, Any]:
        common = {
            "driver": "GTiff",
            "width": grid.width,
            "height": grid.height,
            "crs": grid.crs,
            "transform": grid.transform,
            "tiled": True,
            "blockxsize": self.tile,
            "blockysize": self.tile,
            "compress": "deflate",
            "zlevel": ZLEVEL,
            "sparse_ok": True,  # tiles not written yet read as nodata and cost nothing
            "BIGTIFF": "IF_SAFER",
        }
        if what == "change":
            return {**common, "count": 1, "dtype": "uint8", "nodata": CHANGE_NODATA}
        if what == "probability":
            # no predictor: a network's probabilities are noisy in their low bits, where the
            # predictor made the blocks 8 % smaller for 48 % more CPU (a trained network's
            # 2048² scene, benchmarks/scene_codecs.py). Lossless LERC would take a third of
            # the CPU, but some QGIS builds (macOS packages, Fedora, openSUSE, Flatpak),
            # Homebrew's GDAL and some rasterio wheels cannot read it: a map-ready file must
            # open anywhere
            return {**common, "count": 1, "dtype": "uint16"}
        # band-interleaved: GDAL built the overviews of this NaN-nodata float raster 2.5x
        # faster than from pixel-interleaved tiles, to the same values, and wrote its blocks a
        # little faster (measured by hand, 2048²); a reader of one band reads a third of it
        return {
            **common,
            "count": 3,
            "dtype": "float32",
            "nodata": float("nan"),
            "predictor": 3,
            "interleave": "band",
        }

    def create(self, grid: Grid, tags: dict[str, str]) -> None:
        """Create the empty partial rasters (replacing any earlier ones)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for what in self.rasters:
            with rasterio.open(self.partial(what), "w", **self.profile(what, grid)) as dst:
                dst.update_tags(**tags)
                if what == "explanation":
                    for band, name in enumerate(self.bands, 1):
                        dst.set_band_description(band, name)
                elif what == "probability":
                    dst.set_band_description(1, "change probability x 65535")
                    dst.scales, dst.offsets = (1 / 65535,), (0.0,)  # GIS tools show 0-1
                else:
                    dst.set_band_description(1, "change (1), no change (0), nodata (255)")

    def partials_readable(self, settings: str) -> bool:
        """Whether every partial raster is there, was made by a run with these ``settings``
        (:data:`SETTINGS_TAG`), opens and holds every tile its header lists (a resumable
        earlier run); a file cut short (a full disk, a copy) is not, and is named in a
        warning."""
        try:
            for what in self.rasters:
                with rasterio.open(self.partial(what)) as src:
                    if src.tags().get(SETTINGS_TAG) != settings:
                        return False
                check_every_image_complete(self.partial(what))
        except (rasterio.errors.RasterioError, OSError):
            return False
        except SceneError as err:
            log.warning("%s", err)
            return False
        return True

    def partials_have_overviews(self) -> bool:
        """Whether a partial raster has overviews (a run killed after building them)."""
        for what in self.rasters:
            with rasterio.open(self.partial(what)) as src:
                if src.overviews(1):
                    return True
        return False

    def read_back(self, blocks: Iterable[Block]) -> None:
        """Decode ``blocks`` of every partial raster, ``probability.tif``'s mask included: a
        resume checks the blocks it keeps before it predicts the others. A tile garbled since
        (its bytes, not its length: :meth:`partials_readable` finds a cut file) is named here;
        nothing else would read every kept tile (the polygons read only the blocks with
        change, and GDAL's overview build logs a tile it cannot decode and goes on).

        Raises:
            SceneError: a block cannot be decoded, naming the file.
        """
        blocks = list(blocks)
        for what in self.rasters:
            with rasterio.open(self.partial(what)) as src:
                for block in blocks:
                    read_partial_block(src, block)
                    if what == "probability" and self.masked:
                        read_partial_block(src, block, 1, mask=True)

    def write_block(
        self,
        block: Block,
        probability: np.ndarray,
        valid: np.ndarray,
        threshold: float,
        explanation: np.ndarray | None,
    ) -> WrittenBlock:
        """Write one block of every raster; closed and fsynced (on disk, also through a power
        loss, before ``blocks.jsonl`` says the block is done) when this returns.

        Args:
            block: where.
            probability: float32 ``h x w``.
            valid: bool ``h x w``: valid in both dates.
            threshold: probability above which a pixel is change.
            explanation: float32 ``3 x h x w`` (:data:`EXPLANATION_BANDS`), or ``None``.

        Returns:
            The values written, as a reader of the files gets them back.
        """
        if not self.masked and not valid.all():  # before anything is written
            raise ValueError(
                f"block {block.index} has nodata, but the scene was taken as all valid"
            )
        window = block.window
        change = np.where(probability > threshold, 1, 0).astype(np.uint8)
        change[~valid] = CHANGE_NODATA
        encoded = encode_probability(probability)
        with rasterio.open(self.partial("change"), "r+") as dst:
            dst.write(change, 1, window=window)
        with rasterio.open(self.partial("probability"), "r+") as dst:
            dst.write(encoded, 1, window=window)
            if self.masked:
                dst.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=window)
        values = None
        if self.explain and explanation is not None:
            values = np.where(valid[None], explanation, np.nan).astype(np.float32)
            with rasterio.open(self.partial("explanation"), "r+") as dst:
                dst.write(values, window=window)
        for what in ("change", "probability", *(("explanation",) if values is not None else ())):
            fsync_file(self.partial(what))
        return WrittenBlock(change, encoded, values)

    def build_overviews(self, grid: Grid) -> None:
        """Overviews (2, 4, ... until under one tile) in every partial raster."""
        factors, factor = [], 2
        while max(grid.width, grid.height) / factor >= self.tile / 2 and factor <= 2**12:
            factors.append(factor)
            factor *= 2
        if not factors:
            return
        with rasterio.Env(ZLEVEL_OVERVIEW=ZLEVEL):
            for what in self.rasters:
                with rasterio.open(self.partial(what), "r+") as dst:
                    dst.build_overviews(factors, OVERVIEW_RESAMPLING[what])
                    dst.update_tags(ns="rio_overview", resampling=OVERVIEW_RESAMPLING[what].name)
            if "explanation" in self.rasters:
                write_share_overviews(self.partial("explanation"), factors)

    def check_overviews_whole(self) -> None:
        """Raise when a partial raster does not hold every tile and directory its header
        lists after :meth:`build_overviews`: GDAL only prints the write errors it meets there
        (a full file system, a file-size limit).

        Raises:
            rasterio.errors.RasterioIOError: naming the raster (a GDAL error of the scene).
        """
        for what in self.rasters:
            try:
                check_every_image_complete(self.partial(what))
            except SceneError as err:
                raise rasterio.errors.RasterioIOError(
                    f"the overviews of {self.final(what).name} were not written whole: {err}"
                ) from err

    def take_back(self, settings: str, overviews: bool) -> list[str]:
        """Rename back to their partial names the final rasters that a run with these
        ``settings`` (:data:`SETTINGS_TAG`) published and whose partial file is gone, so that
        a resume can finish the scene again from them: after a kill between the final renames,
        or with other polygons or ``min_area_m2``. A raster with overviews stays where it is
        when none are asked for (GDAL cannot take them out). Returns the rasters taken back."""
        taken = []
        for what in self.rasters:
            final, partial = self.final(what), self.partial(what)
            if partial.exists() or not final.is_file():
                continue
            try:
                with rasterio.open(final) as src:
                    same = src.tags().get(SETTINGS_TAG) == settings
                    fits = overviews or not src.overviews(1)
            except (rasterio.errors.RasterioError, OSError):
                continue
            if same and fits:
                os.replace(final, partial)
                taken.append(what)
        if taken:
            fsync_directory(self.folder)
        return taken

    def publish(self) -> dict[str, str]:
        """Rename every partial file, fsynced, to its final name (in a row), then fsync the
        folder: after a power loss a final name holds its whole file."""
        for what in self.outputs:
            fsync_file(self.partial(what))
        for what in self.outputs:
            os.replace(self.partial(what), self.final(what))
        fsync_directory(self.folder)
        return {what: self.final(what).name for what in self.outputs}

    def remove(self, names: Iterable[str] = ("partial", "final")) -> None:
        """Remove this scene's partial and/or final files, and those a run with other settings
        may have left (an explanation, polygons), which would look like this run's."""
        for what in (*RASTERS, "polygons"):
            if "partial" in names:
                self.partial(what).unlink(missing_ok=True)
            if "final" in names:
                self.final(what).unlink(missing_ok=True)


# rows read at a time in the post_share overview pass, at most this many pixels each
SHARE_STRIP_PIXELS = 1 << 20
SHARE_OVERVIEW_TAG = "overview"
SHARE_OVERVIEW_RULE = (
    "average ReLU(band 2) / (average ReLU(band 1) + average ReLU(band 2)) over the pixels "
    "each overview pixel covers, the averages as GDAL builds them"
)


def strip_rows(width: int, multiple: int) -> int:
    """Rows per strip of a ``width``-pixel raster: a multiple of ``multiple`` (its tile rows)
    holding at most about :data:`SHARE_STRIP_PIXELS` pixels (never fewer than one tile row)."""
    return max(1, SHARE_STRIP_PIXELS // (max(width, 1) * multiple)) * multiple


def share_of(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """``post / (pre + post)`` of non-negative evidence (float32); NaN where both are 0: the
    ``post_share`` band, per pixel and in the overviews."""
    total = pre + post
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, post / np.where(total > 0, total, 1), np.nan).astype(np.float32)


def write_share_overviews(path: Path, factors: list[int]) -> None:
    """Rewrite the ``post_share`` band of every overview of the explanation raster ``path``,
    built with ``factors`` (not those rasterio reports: ``width / overview width`` rounded,
    15 for a 200 px wide scene's 16, which gave another level's footprint or none at all).

    GDAL's average of the per-pixel shares weighs a pixel with almost no evidence as much as
    one with strong evidence. Each overview pixel gets instead the share of the pixels it
    covers taken together, as a polygon's own ``post_share`` is: ``ReLU(pre)`` and
    ``ReLU(post)`` (nodata as 0: no evidence) go to a temporary raster whose average overviews
    GDAL builds with the same factors, and the share is ``avg post / (avg pre + avg post)``.
    GDAL's weights (fractional where a side is not a multiple of the factor) are the same for
    both bands and cancel, so this is ``ΣReLU(post) / (ΣReLU(pre) + ΣReLU(post))`` over the
    footprint of the other bands' overview pixel (exactly the covered pixels where the sides
    are multiples of the factor; NaN where none has evidence). Strips of rows at a time; the temporary
    file is named like :func:`changecam.atomic.temporary_path`, so a killed run's is removed at
    the next start.
    """
    with rasterio.open(path) as src:
        profile = {
            **src.profile,
            "count": 2,
            # NaN nodata declared as in the raster (GDAL then takes the same path, with the
            # same footprints), but none written: nodata is no evidence, 0
            "interleave": "pixel",  # both bands of a pixel are read together
            # float32 x 2 with overviews: past a classic TIFF's 4 GiB from about 28000² (the
            # compressed raster's BIGTIFF=IF_SAFER is not in its profile)
            "BIGTIFF": "YES",
            # deleted at once: the fastest DEFLATE, no predictor (1.7 s for a 4096² random
            # raster against 1.9 s with it and 2.4 s at GDAL's default level 6, by hand)
            "zlevel": ZLEVEL,
            "predictor": 1,
        }
        height, width, tile = src.height, src.width, src.block_shapes[0][0]
    if not factors:
        return
    evidence = temporary_path(Path(path))
    try:
        with rasterio.open(evidence, "w", **profile) as dst:
            rows = strip_rows(width, tile)
            for row in range(0, height, rows):
                window = ((row, min(row + rows, height)), (0, width))
                with rasterio.open(path) as src:
                    maps = src.read((1, 2), window=window)
                dst.write(np.fmax(maps, 0, out=maps), window=window)  # fmax: NaN -> 0
        with rasterio.open(evidence, "r+") as dst:
            dst.build_overviews(factors, Resampling.average)
        for level in range(len(factors)):
            with rasterio.open(path, overview_level=level) as src:  # whole tiles written
                shape, tile_rows = src.shape, src.block_shapes[2][0]
            rows = strip_rows(shape[1], tile_rows)
            for row in range(0, shape[0], rows):
                window = ((row, min(row + rows, shape[0])), (0, shape[1]))
                with rasterio.open(evidence, overview_level=level) as src:
                    pre, post = src.read((1, 2), window=window)
                with rasterio.open(path, "r+", overview_level=level) as dst:
                    dst.write(share_of(pre, post), 3, window=window)
    finally:
        evidence.unlink(missing_ok=True)
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(3, **{SHARE_OVERVIEW_TAG: SHARE_OVERVIEW_RULE})


__all__ = [
    "CHANGE_NODATA",
    "EXPLANATION_BANDS",
    "PROBABILITY_SCALE",
    "SETTINGS_TAG",
    "SceneFiles",
    "WrittenBlock",
    "explanation_bands",
    "partial_path",
]

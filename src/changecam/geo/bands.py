"""Which bands feed the network, and how non-uint8 data becomes the network's uint8 input.

``input.bands`` lists 1-based band indexes (``[3, 2, 1]``: red, green, blue of a 4-band BGRN
scene); ``null`` takes every band, which must then be as many as the network's input
channels in both dates. ``input.scale``:

* ``percentile`` (default): per date and band, the 2-98 % range of a decimated read (every
  ``k``-th full-resolution pixel, never the overviews) is stretched to 0-255, over the pixels
  valid in both dates on the pre grid (:func:`pair_scalings`); uint8 data passes through
  unchanged;
* ``percentile_joint``: one 2-98 % range per band from both dates' samples together, the same
  for both: a same-sensor pair keeps its radiometric differences, and a change large and bright
  enough to move one date's own 98th percentile (new roofs over a few per cent of the scene)
  cannot darken that whole date; both dates must hold one data type;
* ``fixed``: ``input.scale_min`` .. ``input.scale_max`` (one number, or one per band) to 0-255,
  for every data type;
* ``none``: the values are used as they are (they must lie in 0-255).

The scaled values are rounded to uint8, exactly what an 8-bit conversion of the scene would
hold, and become the network's input by :func:`changecam.data.transforms.bands_to_tensor`, the
band-first twin of the convention every image follows.
"""

from __future__ import annotations

import shlex
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NodataShadowWarning
from rasterio.windows import Window

from changecam.geo.grid import SceneError, check_choice

Scale = Literal["percentile", "percentile_joint", "fixed", "none"]
STRETCHES = ("percentile", "percentile_joint")  # the scalings a sample of the pair decides
SCALES: tuple[str, ...] = get_args(Scale)
PERCENTILES = (2.0, 98.0)
Sample = tuple[np.ndarray, np.ndarray]  # C x h x w values and their h x w valid mask
SAMPLE_SIDE = 1024  # the decimated read of the percentile stretch: at most this many px a side

# valid_mask puts a nodata value before an alpha band on purpose, as GDAL does; rasterio would
# say so at every block
warnings.filterwarnings("ignore", category=NodataShadowWarning, module=r"changecam\.geo\.bands")


def select_bands(
    pre: Any, post: Any, bands: Sequence[int] | None, in_channels: int | None
) -> tuple[int, ...]:
    """The 1-based band indexes read from both dates.

    Raises:
        SceneError: an index out of range (naming the file and its band count), different band
            counts without ``input.bands``, complex values, or a count the network does not
            take.
    """
    pre_n, post_n = pre.count, post.count
    if bands is None:
        if pre_n != post_n:
            raise SceneError(
                f"{pre.name} has {pre_n} bands but {post.name} has {post_n}: choose the bands "
                f"to compare with input.bands=[...] (1-based, {band_hint(pre, post)})"
            )
        chosen = tuple(range(1, pre_n + 1))
    else:
        chosen = tuple(int(b) for b in bands)
        if not chosen:
            raise SceneError("input.bands=[] selects no band; give 1-based indexes or null")
        for dataset, count in ((pre, pre_n), (post, post_n)):
            bad = [b for b in chosen if not 1 <= b <= count]
            if bad:
                raise SceneError(
                    f"input.bands={list(chosen)}: band {bad[0]} is out of range for {dataset.name}, "
                    f"which has {count} band(s) (indexes are 1-based: 1..{count})"
                )
    for dataset in (pre, post):
        paletted = [b for b in chosen if dataset.colorinterp[b - 1] == ColorInterp.palette]
        if paletted:
            name = Path(dataset.name)
            expanded = name.with_name(f"{name.stem}_rgb.vrt")
            raise SceneError(
                f"band {paletted[0]} of {dataset.name} is paletted: its values index a colour "
                "table, they are not colours. Expand it to RGB first and predict that, e.g. "
                f"gdal_translate -of VRT -expand rgb {shlex.quote(str(name))} "
                f"{shlex.quote(str(expanded))} (a VRT scene is read as it is)"
            )
        complex_types = sorted(
            {t for b in chosen if (t := dataset.dtypes[b - 1]).startswith("complex")}
        )
        if complex_types:
            raise SceneError(
                f"{dataset.name} holds complex values ({', '.join(complex_types)}), which are not "
                "image bands: write a real-valued band (e.g. the amplitude) and predict that"
            )
    if in_channels is not None and len(chosen) != in_channels:
        raise SceneError(
            f"the network takes {in_channels} bands but {len(chosen)} are selected "
            f"({pre.name} has {pre_n}, {post.name} has {post_n}); set input.bands=[...] with "
            f"{in_channels} 1-based indexes ({band_hint(pre, post)})"
        )
    return chosen


def band_hint(pre: Any, post: Any) -> str:
    """An example ``input.bands`` for a refusal: the red, green and blue bands when both files
    label them alike (an RGB and an RGBA file: ``[1,2,3]``), and which bands are alpha (a
    mask, not an image band)."""
    rgb = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    found = []
    for colour in rgb:
        where = {
            d.colorinterp.index(colour) + 1 if colour in d.colorinterp else 0 for d in (pre, post)
        }
        found.append(where.pop() if len(where) == 1 else 0)
    fewest = min(pre.count, post.count)
    if all(found):
        hint = f"input.bands=[{','.join(map(str, found))}]: their red, green and blue"
    elif fewest >= 3:
        hint = "e.g. input.bands=[3,2,1]: red, green, blue of a blue-green-red-NIR file"
    else:
        hint = f"{pre.name if pre.count == fewest else post.name} has {fewest} band(s)"
        if pre.count == post.count == 1:
            hint += "; a grey scene repeats its band, e.g. input.bands=[1,1,1] for three"
    for dataset in (pre, post) if pre.name != post.name else (pre,):
        alpha = alpha_band(dataset)
        if alpha is not None:
            hint += f"; band {alpha} of {dataset.name} is its alpha (a nodata mask, read as such)"
    return hint


@dataclass(frozen=True)
class Scaling:
    """Per band ``lo``/``hi`` mapped to 0/255 (``None``: the values are used as they are)."""

    lo: tuple[float, ...] | None = None
    hi: tuple[float, ...] | None = None

    def apply(self, data: np.ndarray) -> np.ndarray:
        """``C x H x W`` raw values -> ``C x H x W`` uint8."""
        if self.lo is None or self.hi is None:
            if data.dtype == np.uint8:  # already the network's range: no arithmetic
                return data
            out = np.clip(data, 0, 255)
        else:
            lo = np.asarray(self.lo, dtype=np.float64)[:, None, None]
            hi = np.asarray(self.hi, dtype=np.float64)[:, None, None]
            span = np.where(hi > lo, hi - lo, 1.0)
            out = np.clip((data.astype(np.float64) - lo) / span * 255.0, 0.0, 255.0)
        return np.rint(out).astype(np.uint8)

    def record(self) -> dict[str, Any]:
        return {"lo": list(self.lo) if self.lo else None, "hi": list(self.hi) if self.hi else None}


def _per_band(value: float | Sequence[float] | None, n: int, key: str) -> tuple[float, ...]:
    if value is None:
        raise SceneError(f"input.scale=fixed needs {key} (one number or one per band)")
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise SceneError(f"{key} has {len(values)} values for {n} selected bands")
    return tuple(values)


def units_record(dataset: Any, bands: Sequence[int]) -> dict[str, list[float]] | None:
    """GDAL's scale and offset of the selected bands (``stored * scale + offset`` is the value
    the file means, e.g. Sentinel-2 L2A's reflectance), as a resume record keeps them;
    ``None`` where every band's are 1 and 0 (the stored values are meant as they are)."""
    scales = [float(dataset.scales[b - 1]) for b in bands]
    offsets = [float(dataset.offsets[b - 1]) for b in bands]
    if all(v == 1.0 for v in scales) and all(v == 0.0 for v in offsets):
        return None
    return {"scale": scales, "offset": offsets}


def band_units(dataset: Any, bands: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`units_record` as ``C x 1 x 1`` float32 arrays (scale, offset), or ``None``."""
    record = units_record(dataset, bands)
    if record is None:
        return None
    scale, offset = (np.asarray(record[k], np.float32)[:, None, None] for k in ("scale", "offset"))
    return scale, offset


def read_values(dataset: Any, bands: Sequence[int], window: Window) -> np.ndarray:
    """The selected bands in ``window``, in the units their scale and offset metadata give
    (float32), or as stored where they have none: two dates stored with other scales or
    offsets (a processing baseline's new offset) then compare alike."""
    data = dataset.read(list(bands), window=window)
    units = band_units(dataset, bands)
    if units is None:
        return data
    return data.astype(np.float32) * units[0] + units[1]


def is_uint8(dataset: Any, bands: Sequence[int]) -> bool:
    """Whether every selected band is 8-bit and meant as stored (the network's input range
    as it is)."""
    stored = all(dataset.dtypes[b - 1] == "uint8" for b in bands)
    return stored and band_units(dataset, bands) is None


def alpha_band(dataset: Any) -> int | None:
    """The 1-based index of ``dataset``'s alpha band (the file's own, or the one a
    reprojection adds), if it has one."""
    alpha = [i + 1 for i, c in enumerate(dataset.colorinterp) if c == ColorInterp.alpha]
    return alpha[0] if alpha else None


def all_valid(dataset: Any, bands: Sequence[int]) -> bool:
    """Whether every pixel of ``bands`` is valid: there is no alpha band, GDAL's mask flags say
    so (no nodata value or mask) and the bands are not floating point (where NaN or an infinity
    is nodata, declared or not)."""
    return alpha_band(dataset) is None and all(
        dataset.mask_flag_enums[b - 1] == [MaskFlags.all_valid]
        and not np.issubdtype(np.dtype(dataset.dtypes[b - 1]), np.floating)
        for b in bands
    )


def valid_mask(dataset: Any, bands: Sequence[int], window: Window | None = None) -> np.ndarray:
    """Where ``dataset`` holds data for ``bands`` (bool ``H x W``; NaN is left to
    :func:`finite_values`): where any selected band is valid by its mask, as in GDAL's dataset
    mask but blind to the bands not selected. A band's mask is GDAL's (its nodata value, a
    mask, or the alpha band), except that a band GDAL calls all valid takes the alpha band's
    values where there is one: GDAL masks by alpha only 8- and 16-bit unsigned bands, so the
    alpha a reprojection adds to a float or int16 scene would otherwise mask nothing. As in
    GDAL, a nodata value or mask comes before the alpha (a 4-band file GDAL labels RGBA may
    hold a near-infrared band, not an alpha)."""
    masks = dataset.read_masks(list(bands), window=window) > 0
    alpha = alpha_band(dataset)
    unmasked = [
        i for i, b in enumerate(bands) if dataset.mask_flag_enums[b - 1] == [MaskFlags.all_valid]
    ]
    if alpha is not None and unmasked:
        masks[unmasked] = dataset.read(alpha, window=window) > 0
    return masks.any(axis=0)


def finite_values(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Floating-point ``C x H x W`` data: ``valid`` (``H x W``) is narrowed in place to the
    pixels finite in every band, and the others are set to 0; other data is returned as it is."""
    if not np.issubdtype(data.dtype, np.floating):
        return data
    finite = np.isfinite(data).all(axis=0)
    if finite.all():
        return data
    valid &= finite
    return np.where(finite, data, 0).astype(data.dtype)


def needs_sample(dataset: Any, bands: Sequence[int], scale: Scale) -> bool:
    """Whether :func:`decimated_sample` has anything to tell about ``dataset``: a percentile
    stretch of non-8-bit bands, whether non-8-bit bands taken as they are (``none``) lie in
    0-255, or whether a scene with nodata (a nodata value, alpha or mask) has any valid pixel.
    An 8-bit scene without nodata needs no sample: its tiles are decoded once, by the blocks."""
    valid = all_valid(dataset, bands)
    return not valid or (scale in (*STRETCHES, "none") and not is_uint8(dataset, bands))


def strips(dataset: Any, rows: int) -> Iterator[Window]:
    """The dataset as full-width windows of ``rows`` rows (the last one shorter)."""
    for row in range(0, dataset.height, rows):
        yield Window(0, row, dataset.width, min(rows, dataset.height - row))


def sample_factor(dataset: Any) -> int:
    """``k`` of :func:`decimated_sample`: every ``k``-th pixel of every ``k``-th row."""
    return max(1, -(-max(dataset.width, dataset.height) // SAMPLE_SIDE))


def decimated_sample(
    dataset: Any,
    bands: Sequence[int],
    inspect: Callable[[np.ndarray, np.ndarray, Window], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every ``k``-th pixel of every ``k``-th row (``C x h x w`` values, ``h x w`` valid mask), at
    most :data:`SAMPLE_SIDE` pixels a side, read at full resolution in strips of whole tiles and
    subsampled in NumPy. Never from the file's overviews: they are averaged (the bright and dark
    tails of the 2-98 % stretch shrink) and made however the file's maker chose, so a scene and
    its COG copy, the same pixels, would get different stretches and the difference would read
    as change. ``inspect(data, valid, window)``, if given, sees every strip whole before it is
    subsampled (every pixel of the date, in the same single read)."""
    factor = sample_factor(dataset)
    tile_rows = dataset.block_shapes[0][0]
    rows = tile_rows * -(-factor // tile_rows)  # whole tiles (or strips), at least one k-row
    data_parts, valid_parts = [], []
    for window in strips(dataset, dataset.height if factor == 1 else rows):
        first = -int(window.row_off) % factor  # the strip's first row on the k-grid
        data = read_values(dataset, bands, window)
        valid = valid_mask(dataset, bands, window)
        if inspect is not None:
            data = finite_values(data, valid)
            inspect(data, valid, window)
        # copies: a view would keep the whole strip alive, and with it the whole date
        data = np.ascontiguousarray(data[:, first::factor, ::factor])
        valid = np.ascontiguousarray(valid[first::factor, ::factor])
        data_parts.append(finite_values(data, valid))
        valid_parts.append(valid)
    data, valid = np.concatenate(data_parts, axis=1), np.concatenate(valid_parts, axis=0)
    return data, valid


def valid_pixels(dataset: Any, bands: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The scene's valid pixels, read in strips of whole tiles and thinned to at most
    ``2 * SAMPLE_SIDE**2`` (every ``k``-th, ``k`` doubling whenever more pile up), as a
    ``C x 1 x n`` sample with its ``1 x n`` mask: for a date whose valid pixels are too few or
    too thin for :func:`decimated_sample`'s grid to meet (a one-pixel column), before it is
    called all nodata. Memory: the kept pixels and one strip."""
    cap = 2 * SAMPLE_SIDE**2
    step, seen, parts = 1, 0, []
    for window in strips(dataset, dataset.block_shapes[0][0]):  # whole tiles
        valid = valid_mask(dataset, bands, window)
        if not valid.any():
            continue
        data = finite_values(read_values(dataset, bands, window), valid)
        values = data[:, valid]
        # every step-th valid pixel of the scene, counted across the strips
        parts.append(values[:, (-seen) % step :: step].copy())
        seen += values.shape[1]
        while sum(p.shape[1] for p in parts) > cap:
            step *= 2
            parts = [np.concatenate(parts, axis=1)[:, ::2].copy()]
    if not parts:
        return np.zeros((len(bands), 1, 0)), np.zeros((1, 0), bool)
    kept = np.concatenate(parts, axis=1)
    return kept[:, None, :], np.ones((1, kept.shape[1]), bool)


def estimate_scaling(
    dataset: Any,
    bands: Sequence[int],
    scale: Scale,
    scale_min: float | Sequence[float] | None = None,
    scale_max: float | Sequence[float] | None = None,
    sample: tuple[np.ndarray, np.ndarray] | None = None,
) -> Scaling:
    """The scaling of one date (see the module docstring).

    Raises:
        SceneError: unknown ``scale``, missing or mis-sized ``fixed`` bounds, or a percentile
            stretch of a scene without valid pixels.
    """
    check_choice("input.scale", scale, SCALES)
    n = len(bands)
    if scale == "none":
        return Scaling()
    if scale == "fixed":
        lo = _per_band(scale_min, n, "input.scale_min")
        hi = _per_band(scale_max, n, "input.scale_max")
        bad = [i + 1 for i in range(n) if hi[i] <= lo[i]]
        if bad:
            raise SceneError(
                f"input.scale_max must exceed input.scale_min (selected band {bad[0]})"
            )
        return Scaling(lo, hi)
    if is_uint8(dataset, bands):
        return Scaling()  # 8-bit data is already the network's input range
    if scale == "percentile_joint":
        raise ValueError("a joint stretch takes both dates: pair_scalings, not estimate_scaling")
    data, valid = sample if sample is not None else decimated_sample(dataset, bands)
    if not valid.any():
        raise SceneError(f"{dataset.name} has no valid (non-nodata) pixel")
    return stretch(data[:, valid])


def stretch(values: np.ndarray) -> Scaling:
    """The 2-98 % range of each band of ``values`` (``C x N``, at least one column)."""
    lo, hi = [], []
    for band in values:
        low, high = np.percentile(band.astype(np.float64), PERCENTILES)
        lo.append(float(low))
        hi.append(float(high) if high > low else float(low) + 1.0)
    return Scaling(tuple(lo), tuple(hi))


def pair_scalings(
    pre: Any,
    post: Any,
    bands: Sequence[int],
    scale: Scale,
    scale_min: float | Sequence[float] | None = None,
    scale_max: float | Sequence[float] | None = None,
    own: tuple[Sample | None, Sample | None] = (None, None),
    on_grid: tuple[Sample | None, Sample | None] = (None, None),
) -> tuple[Scaling, Scaling]:
    """Both dates' scalings; ``pre`` and ``post`` as stored.

    A percentile stretch takes each date's 2-98 % over the pixels valid in *both* dates, at the
    same places of the pre grid: pixels only one date has (beyond the other's footprint, under
    its nodata clouds) would stretch the two dates differently, and the same values would then
    read as change. Where the samples do not meet (a thin overlap), each date's own pixels.

    Args:
        own: each date's sample of its own file (:func:`decimated_sample`, or every valid
            pixel of a thin date), if read (else read here when needed).
        on_grid: each date's :func:`decimated_sample` at the places of the pre grid's (the post
            through its warp when reprojected, :func:`~changecam.geo.grid.post_on_sample_grid`);
            ``None`` for an 8-bit date without nodata (every place valid).
    """
    datasets = (pre, post)
    if scale not in STRETCHES or all(is_uint8(d, bands) for d in datasets):
        return tuple(  # type: ignore[return-value]
            estimate_scaling(d, bands, scale, scale_min, scale_max, s)
            for d, s in zip(datasets, own, strict=True)
        )
    if scale == "percentile_joint":
        types = [{d.dtypes[b - 1] for b in bands} for d in datasets]
        # stored values of two types compare alike only where both dates say what they mean
        meant = all(band_units(d, bands) is not None for d in datasets)
        if not meant and types[0] != types[1]:
            raise SceneError(
                f"input.scale=percentile_joint stretches both dates alike, so they must hold "
                f"one data type, but {pre.name} holds {'/'.join(sorted(types[0]))} and "
                f"{post.name} {'/'.join(sorted(types[1]))}: use input.scale=percentile"
            )
    factor = sample_factor(pre)
    shape = (-(-pre.height // factor), -(-pre.width // factor))
    valid = [
        (np.ones(shape, bool) if is_uint8(d, bands) and all_valid(d, bands) else None)
        if s is None
        else s[1]
        for d, s in zip(datasets, on_grid, strict=True)
    ]
    samples: list[Sample | None] = list(own)
    if all(v is not None and v.shape == shape for v in valid):
        both = valid[0] & valid[1]  # type: ignore[operator]
        if both.any():
            samples = [None if s is None else (s[0], both) for s in on_grid]
    if scale == "percentile":
        return tuple(  # type: ignore[return-value]
            estimate_scaling(d, bands, scale, scale_min, scale_max, s)
            for d, s in zip(datasets, samples, strict=True)
        )
    values = []
    for dataset, sample in zip(datasets, samples, strict=True):
        data, where = sample if sample is not None else decimated_sample(dataset, bands)
        values.append(data[:, where])
    if not sum(v.shape[1] for v in values):
        raise SceneError(f"{pre.name} and {post.name} have no valid (non-nodata) pixel")
    joint = stretch(np.concatenate(values, axis=1))
    return joint, joint


__all__ = [
    "PERCENTILES",
    "SCALES",
    "STRETCHES",
    "Scale",
    "Sample",
    "Scaling",
    "all_valid",
    "alpha_band",
    "decimated_sample",
    "estimate_scaling",
    "finite_values",
    "is_uint8",
    "needs_sample",
    "pair_scalings",
    "sample_factor",
    "select_bands",
    "stretch",
    "valid_mask",
    "valid_pixels",
]

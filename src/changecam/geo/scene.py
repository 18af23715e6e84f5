"""Predict (and explain) one georeferenced scene pair, block by block, in bounded memory.

:func:`predict_scene` opens the pair on the pre grid (:mod:`changecam.geo.grid`), chooses and
scales the bands (:mod:`changecam.geo.bands`), cuts the scene into blocks with the halo of
their sliding windows (:mod:`changecam.geo.windows`; a background thread decodes the next
blocks), blends each block's windows with the one sliding-window blend
(:func:`changecam.models.sliding_window.blend_windows`) — with the explanation on, each batch
of windows goes through the one explanation runner
(:func:`changecam.explain.explain_tensors`: HiResCAM of the chosen layer for the window's
predicted change, nodata excluded) and the maps are blended like the logits — and hands every
block to a background writer thread (:mod:`changecam.geo.writer`) that writes it to the
partial rasters (:mod:`changecam.geo.write`) and hands it to a tracer thread that traces its
changed regions (:mod:`changecam.geo.polygons`) while the network computes the next one. When
all blocks are done it joins the regions into polygons, builds the overviews (each unless
``predict.polygons`` / ``predict.overviews`` is off), renames the files into place and writes
``scene.json`` last.

``blocks.jsonl`` in the scene's folder records the run's settings and each finished block.
``resume=True`` keeps the blocks it lists when the settings match and the partial rasters are
readable; otherwise the scene starts over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import numbers
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch import Tensor, nn
from tqdm import tqdm

from changecam.atomic import (
    append_json_line,
    fsync_directory,
    strict_json,
    write_json,
    write_text,
)
from changecam.data.transforms import bands_to_tensor
from changecam.explain import ExplainSettings, FaithfulnessSettings, explain_tensors
from changecam.explain.hirescam import choose_layer, per_date_layers, resolve_taps
from changecam.geo.bands import (
    SCALES,
    STRETCHES,
    Sample,
    Scale,
    Scaling,
    all_valid,
    decimated_sample,
    is_uint8,
    needs_sample,
    pair_scalings,
    sample_factor,
    select_bands,
    units_record,
    valid_pixels,
)
from changecam.geo.grid import (
    ALIGNS,
    Align,
    SceneError,
    ScenePair,
    check_choice,
    is_local,
    large_block_warning,
    open_pair,
    post_on_sample_grid,
    vrt_sources,
)
from changecam.geo.polygons import RegionTracer, area_problem, scene_polygons, write_geojson
from changecam.geo.window_cache import WindowCache
from changecam.geo.windows import (
    Block,
    Region,
    block_grid,
    check_network_range,
    prefetched,
    read_region,
)
from changecam.geo.write import (
    SETTINGS_TAG,
    TILE,
    SceneFiles,
    explanation_bands,
    share_of,
    tile_side,
)
from changecam.geo.writer import BlockWriter
from changecam.models.inference import check_finite_logits
from changecam.models.sliding_window import SlidingWindow, blend_windows, check_window, pad_to
from changecam.run_log import as_logged, file_record, read_json_lines, settings_changes

log = logging.getLogger("changecam")
LOG_FILE = "blocks.jsonl"
REPORT_FILE = "scene.json"
SCENE_SUFFIXES = (".tif", ".tiff", ".vrt")
GDAL_CACHE_MB = 128
# the per-date maps explanation.tif may hold (both from the one forward and backward)
SceneMethod = Literal["hirescam", "contrastive"]
SCENE_METHODS: tuple[SceneMethod, ...] = get_args(SceneMethod)
# rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64, in bytes (GDAL's own option
# reads small numbers as MB): 128 there is a 128-byte cache, which re-decodes every tile a
# read or an overview touches more than once (rasterio #2336)
GDAL_CACHE_BYTES = GDAL_CACHE_MB * 1024 * 1024


def is_scene_file(path: str | Path) -> bool:
    """Whether predict.py treats ``path`` as a georeferenced scene (GeoTIFF, COG or GDAL VRT)."""
    return Path(path).suffix.lower() in SCENE_SUFFIXES


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes)


@dataclass(frozen=True)
class SceneSettings:
    """How a scene is read, predicted and written (``input.*`` and ``predict.*`` keys).

    Args:
        threshold: probability above which a pixel is change.
        bands: 1-based band indexes read from both dates; ``None``: every band.
        scale: ``percentile`` (2-98 % per date; uint8 unchanged), ``percentile_joint`` (one
            2-98 % for both dates), ``fixed`` or ``none``.
        scale_min: ``fixed``: the value mapped to 0 (one, or one per band).
        scale_max: ``fixed``: the value mapped to 255.
        align: ``reproject`` the post scene onto the pre grid, or ``strict``: refuse.
        block_size: side of the output blocks (a multiple of 16; best of 256, the tiles).
        batch_size: windows per forward pass; ``None``: ``sliding_window.batch_size``.
        min_area_m2: smaller changed regions get no polygon.
        polygons: trace the changed regions into ``change.geojson``; ``False``: rasters only.
        overviews: build the rasters' overviews (what QGIS draws when zoomed out).
        explain: write ``explanation.tif`` and the polygons' post share.
        explain_layer: per-date layer of the explanation; ``None``: the deepest.
        explain_method: ``hirescam``, or ``contrastive`` (date-contrastive HiResCAM: the
            other date's activation as the baseline; see :mod:`changecam.explain.hirescam`).
        prefetch: blocks the reader thread decodes ahead.
        progress: show the progress bar.
        gdal_threads: threads GDAL decodes the input tiles and compresses the output tiles
            (overviews included) with (``GDAL_NUM_THREADS``; 1: the reader and writer threads
            alone); ``None``: every CPU.
    """

    threshold: float = 0.5
    bands: tuple[int, ...] | None = None
    scale: Scale = "percentile"
    scale_min: float | tuple[float, ...] | None = None
    scale_max: float | tuple[float, ...] | None = None
    align: Align = "reproject"
    block_size: int = 1024
    batch_size: int | None = None
    min_area_m2: float = 0.0
    polygons: bool = True
    overviews: bool = True
    explain: bool = True
    explain_layer: str | None = None
    explain_method: SceneMethod = "hirescam"
    prefetch: int = 2
    progress: bool = True
    gdal_threads: int | None = None

    def __post_init__(self) -> None:
        # numbers written as text (an environment variable's ${oc.env:...}) are read as such
        for key, kind in (("block_size", int), ("batch_size", int), ("gdal_threads", int)):
            value = getattr(self, key)
            if isinstance(value, str) and value.strip().isdigit():
                object.__setattr__(self, key, kind(value))
        if isinstance(self.min_area_m2, str):
            try:
                object.__setattr__(self, "min_area_m2", float(self.min_area_m2))
            except ValueError:
                pass  # refused below, as any other non-number
        if not is_integer(self.block_size):
            raise SceneError(
                f"predict.block_size={self.block_size!r} must be an integer (a multiple of 16)"
            )
        if self.batch_size is not None and not is_integer(self.batch_size):
            raise SceneError(f"predict.batch_size={self.batch_size!r} must be an integer (or null)")
        for key in ("block_size", "batch_size"):  # a NumPy integer as a plain one
            if getattr(self, key) is not None:
                object.__setattr__(self, key, int(getattr(self, key)))
        if not is_number(self.min_area_m2):
            raise SceneError(f"predict.min_area_m2={self.min_area_m2!r} must be a number")
        check_choice("input.scale", self.scale, SCALES)
        check_choice("input.align", self.align, ALIGNS)
        if self.bands is not None:
            if not (is_sequence(self.bands) and all(map(is_integer, self.bands))):
                raise SceneError(
                    f"input.bands={self.bands!r} must be a list of 1-based band indexes "
                    "(integers), e.g. input.bands=[3,2,1]"
                )
            object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
        for key in ("scale_min", "scale_max"):
            value = getattr(self, key)
            if value is None:
                continue
            if is_number(value):
                object.__setattr__(self, key, float(value))
            elif is_sequence(value) and all(map(is_number, value)):
                object.__setattr__(self, key, tuple(float(v) for v in value))
            else:
                raise SceneError(
                    f"input.{key}={value!r} must be a number or a list of numbers (one per band)"
                )
        given = [f"input.{k}" for k in ("scale_min", "scale_max") if getattr(self, k) is not None]
        if given and self.scale != "fixed":  # forgetting scale=fixed gave a per-date stretch
            raise SceneError(
                f"{' and '.join(given)} are read only with input.scale=fixed, and "
                f"input.scale={self.scale} here: add input.scale=fixed, or leave them out"
            )
        if self.scale == "fixed":  # what needs no file; the count of bands is judged with them
            for key in ("scale_min", "scale_max"):
                if getattr(self, key) is None:
                    raise SceneError(
                        f"input.scale=fixed needs input.{key} (one number or one per band)"
                    )
            bounds = (self.scale_min, self.scale_max)
            if not all(
                math.isfinite(v) for b in bounds for v in (b if isinstance(b, tuple) else (b,))
            ):
                raise SceneError(
                    f"input.scale_min={self.scale_min!r} and input.scale_max={self.scale_max!r} "
                    "must be finite numbers"
                )
            n = max(len(b) if isinstance(b, tuple) else 1 for b in bounds)
            # a number serves every band; lists of other lengths are refused with the bands
            lows, highs = (b if isinstance(b, tuple) else (b,) * n for b in bounds)
            if len(lows) == len(highs) == n:
                bad = [i + 1 for i in range(n) if highs[i] <= lows[i]]
                if bad:
                    raise SceneError(
                        f"input.scale_max must exceed input.scale_min (selected band {bad[0]})"
                    )
        if self.block_size < 16 or self.block_size % 16:
            raise SceneError(
                f"predict.block_size={self.block_size} must be a multiple of 16 (best of {TILE})"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise SceneError(f"predict.batch_size={self.batch_size} must be >= 1 (or null)")
        if not math.isfinite(self.min_area_m2) or self.min_area_m2 < 0:
            raise SceneError(f"predict.min_area_m2={self.min_area_m2} must be a finite number >= 0")
        for key in ("polygons", "overviews", "progress"):
            if type(getattr(self, key)) is not bool:
                raise SceneError(f"predict.{key}={getattr(self, key)!r} must be true or false")
        if self.explain and self.explain_method not in SCENE_METHODS:
            raise SceneError(
                f"explain.method={self.explain_method!r}: a scene is explained with one of "
                f"{list(SCENE_METHODS)}"
            )
        threads = self.gdal_threads
        if threads is not None and (type(threads) is not int or threads < 1):
            raise SceneError(f"predict.gdal_threads={threads!r} must be an integer >= 1 (or null)")

    @property
    def gdal_num_threads(self) -> str:
        """The value of GDAL's ``GDAL_NUM_THREADS`` option."""
        return "ALL_CPUS" if self.gdal_threads is None else str(self.gdal_threads)

    def resumable(self) -> dict[str, Any]:
        """What a resumed run must repeat (the progress bar, read-ahead and what is made of
        the finished blocks may differ: a resume traces the blocks it keeps from the rasters).
        The layer asked for is left out: the runner records the layer it resolves to, so
        ``predict.explain_layer=<the deepest>`` resumes a run started with ``null``. The
        method is recorded only when it is not ``hirescam``, the one method of the runs made
        before there was a choice (they stay resumable), and only when explained."""
        record = asdict(self)
        if not self.explain or self.explain_method == "hirescam":
            record.pop("explain_method")
        for key in (
            "prefetch",
            "progress",
            "min_area_m2",
            "gdal_threads",
            "polygons",
            "overviews",
            "explain_layer",
        ):
            record.pop(key)
        return strict_json(record)


@dataclass
class BlockLog:
    """``blocks.jsonl``: a ``started`` line with the settings, then one line per finished block."""

    path: Path
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    # the records as read until this log writes: the run's several readers read (and warn
    # about a killed append's partial line) once
    _read: list[dict[str, Any]] | None = field(default=None, init=False, repr=False, compare=False)

    def read(self) -> list[dict[str, Any]]:
        if self._read is None:
            self._read = read_json_lines(self.path)
        return self._read

    def start(
        self,
        settings: dict[str, Any],
        resume: bool,
        readable: bool,
        new_settings: dict[str, Any] | None = None,
        clear: Callable[[bool], None] | None = None,
    ) -> bool:
        """Start the log, or continue it (``resume``, same ``settings``, readable partial
        rasters); returns whether the run continues an earlier one. A new log's header holds
        ``new_settings`` (default ``settings``): every key this version records. ``clear``
        (given whether the run continues) removes what the earlier run left that this one must
        not keep, once the run is not refused and before the log is written: a kill in between
        must not leave an earlier run's files under this run's header."""
        records = self.read()
        self._read = None  # written below, or refused
        same = bool(records) and records[0].get("settings") == settings
        if resume and records and not same:
            changed = settings_changes(records[0].get("settings") or {}, settings)
            # probability_mask follows from the files (whether they have nodata)
            inputs = ("pre.", "post.", "probability_mask:")
            if changed and all(change.startswith(inputs) for change in changed):
                raise SceneError(
                    f"predict.resume=true but the input files are not those {self.path} was "
                    f"started from ({'; '.join(changed)}): its finished blocks describe the "
                    "files as they were; rerun without predict.resume"
                )
            raise SceneError(
                f"predict.resume=true but {self.path} was started with other settings "
                f"({'; '.join(changed) or 'unreadable header'}); resume with those settings "
                "or rerun without predict.resume"
            )
        continued = resume and same and readable
        if clear is not None:
            clear(continued)
        if continued:
            self.done = {r["block"]: r for r in records[1:] if "block" in r}
            # written again from the records read: a killed append's partial line is not read
            # (and warned about) at every later start
            write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            return True
        if resume:
            log.warning(
                "predict.resume=true but %s has nothing to resume: starting over", self.path.parent
            )
        self.done = {}
        header = {"status": "started", "settings": new_settings or settings}
        write_text(self.path, json.dumps(header, sort_keys=True) + "\n")
        return False

    def add(self, record: dict[str, Any]) -> None:
        self._read = None
        append_json_line(self.path, record)
        self.done[record["block"]] = record


def input_record(path: Path) -> dict[str, Any]:
    """:func:`file_record` of an input scene, and of each plain file a VRT reads (virtual
    ones, ``/vsicurl/…``, by name)."""
    record = file_record(path)
    sources = vrt_sources(path)
    if sources:
        record["sources"] = [
            file_record(Path(source)) if is_local(source) else {"path": source}
            for source in sources
        ]
    return record


class SceneNetwork:
    """The network applied to the windows of a block: logits, and (explained) the blended
    maps of both dates at one layer (HiResCAM or date-contrastive HiResCAM)."""

    def __init__(
        self,
        net: nn.Module,
        spec: SlidingWindow,
        threshold: float,
        layer: str | None,
        method: SceneMethod = "hirescam",
    ) -> None:
        self.net, self.spec, self.layer, self.method = net, spec, layer, method
        self.settings = (
            ExplainSettings(
                taps=(layer,),
                methods=(method,),
                method=method,
                threshold=threshold,
                faithfulness=FaithfulnessSettings(enabled=False),
            )
            if layer is not None
            else None
        )

    def windows(self, pre: Tensor, post: Tensor, valid: Tensor) -> Tensor:
        """``N x K x w x w``: logits (K = 1) or logits, pre map, post map (K = 3)."""
        if self.settings is None:
            with torch.no_grad():
                return self.net(pre, post).float()
        result = explain_tensors(
            self.net, pre, post, self.settings, valid=valid[:, 0] > 0.5, upsample=True
        ).explanation
        maps = result.upsampled[self.method]
        stacked = torch.stack(
            [result.logits[:, 0], maps[f"pre/{self.layer}"], maps[f"post/{self.layer}"]], dim=1
        )
        return stacked.to(pre.device)

    def block(
        self,
        region: Region,
        device: torch.device,
        reuse: MutableMapping[tuple[int, int], Tensor] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The block's probability (``h x w``) and explanation bands (``3 x h x w`` or ``None``);
        ``reuse`` holds the window outputs shared with neighbouring blocks."""
        block, size, mode = region.block, self.spec.window, self.spec.pad_mode
        x_pre = pad_to(bands_to_tensor(region.pre, device)[None], size, size, mode)
        x_post = pad_to(bands_to_tensor(region.post, device)[None], size, size, mode)
        valid = torch.from_numpy(region.valid)[None, None].float().to(device)
        valid = pad_to(valid, size, size, "constant")
        out = blend_windows(
            self.windows,
            (x_pre, x_post, valid),
            block.rows,
            block.cols,
            self.spec,
            reuse=reuse,
            origin=(block.region_row, block.region_col),
        )
        r, c = block.row - block.region_row, block.col - block.region_col
        out = out[0, :, r : r + block.height, c : c + block.width]
        inside = region.valid[r : r + block.height, c : c + block.width]
        check_finite_logits(
            out[0],
            f"block {block.index} (rows {block.row}-{block.row + block.height - 1}, columns "
            f"{block.col}-{block.col + block.width - 1}) refused",
            torch.from_numpy(np.ascontiguousarray(inside)).to(out.device),
            error=SceneError,
        )
        probability = torch.sigmoid(out[0]).cpu().numpy()  # as the PNG path computes it
        out = out.cpu().numpy()
        if out.shape[0] == 1:
            return probability, None
        share = share_of(np.clip(out[1], 0, None), np.clip(out[2], 0, None))
        return probability, np.stack([out[1], out[2], share]).astype(np.float32)


def finished_scene(
    folder: Path,
    files: SceneFiles,
    block_log: BlockLog,
    record: dict[str, Any],
    settings: SceneSettings,
) -> dict[str, Any] | None:
    """The summary of a scene a run with the same settings finished (every output there),
    those a resume may change included: the polygons, their ``min_area_m2`` and the
    overviews (a finished scene made with others is finished again, see
    :func:`take_back_rasters`)."""
    report = folder / REPORT_FILE
    records = block_log.read()
    if not (report.is_file() and records and records[0].get("settings") == record):
        return None
    if not all(files.final(what).is_file() for what in files.outputs):
        return None
    summary = json.loads(report.read_text())
    made = (summary.get("polygons") is not None, summary.get("overviews"))
    if made != (settings.polygons, settings.overviews) or (
        settings.polygons and summary.get("min_area_m2") != settings.min_area_m2
    ):
        log.info("%s was finished with other outputs: finishing it again", folder)
        return None
    return summary


def settings_hash(record: dict[str, Any]) -> str:
    """The rasters' :data:`~changecam.geo.write.SETTINGS_TAG`: a hash of the resume record."""
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def remove_scene(folder: Path) -> None:
    """Remove a scene's outputs from ``folder``: its ``scene.json`` first (nothing left looks
    finished), its rasters and polygons, final and partial, its log, then the folder if that
    leaves it empty."""
    (folder / REPORT_FILE).unlink(missing_ok=True)
    SceneFiles(folder, explain=True).remove()
    (folder / LOG_FILE).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something else is in it
        pass


def take_back_rasters(
    files: SceneFiles,
    block_log: BlockLog,
    record: dict[str, Any],
    blocks: list[Block],
    settings: SceneSettings,
) -> None:
    """When a run with this record did every block and published its rasters (all of them, or
    some: a kill between the final renames) but its scene is not kept (other polygons or
    ``min_area_m2``, or no ``scene.json``), rename them back to their partial names: the
    resume then finishes the scene from them (polygons, overviews) without the network."""
    records = block_log.read()
    if not records or records[0].get("settings") != record:
        return
    done = {r["block"] for r in records[1:] if "block" in r}
    if not done >= {b.index for b in blocks}:
        return
    report = files.folder / REPORT_FILE
    polygons = files.final("polygons")  # the finish writes it again
    for made in (report, polygons):  # gone before the first rename: a kill between them
        if made.exists():  # finds neither a scene.json nor a change.geojson alone
            made.unlink()
            fsync_directory(files.folder)
    taken = files.take_back(settings_hash(record), settings.overviews)
    if taken:
        log.info("%s: every block was done; finishing it again from %s", files.folder, taken)


def hide_unfinished(folder: Path) -> None:
    """When a refused run keeps an earlier run's outputs in ``folder`` but that run published
    them only in part (killed between the final renames, or before its ``scene.json``): its
    published rasters go back to their partial names (:meth:`SceneFiles.take_back`, the
    log's settings; a resume with those settings finishes the scene from them) and its
    ``change.geojson``, which such a resume writes again, is removed, so nothing left looks
    finished."""
    if (folder / REPORT_FILE).exists():
        return
    records = BlockLog(folder / LOG_FILE).read()
    if not records or not isinstance(records[0].get("settings"), dict):
        return
    files = SceneFiles(folder, explain=True)
    taken = files.take_back(settings_hash(records[0]["settings"]), overviews=True)
    # rasters left under their final names are another run's (a kill just as a new run began
    # removing them): they stay, and so does the geojson beside them
    polygons = files.final("polygons")
    alone = polygons.exists() and not any(files.final(w).is_file() for w in files.rasters)
    if alone:
        polygons.unlink()
        fsync_directory(folder)
    if taken or alone:
        log.info("%s was published only in part: %s taken back to partial names", folder, taken)


def new_windows(blocks: Sequence[Block]) -> dict[int, int]:
    """Per block index, how many of its windows no earlier block of ``blocks`` computes: what
    it adds to the windows computed (a window shared across a block edge is computed once)."""
    seen: set[tuple[int, int]] = set()
    counts = {}
    for block in blocks:
        starts = set(block.window_starts)
        counts[block.index] = len(starts - seen)
        seen |= starts
    return counts


def window_last_use(blocks: list[Block]) -> dict[tuple[int, int], int]:
    """For each window start (scene pixels), the index of the last block that uses it."""
    last: dict[tuple[int, int], int] = {}
    for block in blocks:  # in index order: the last block seen wins
        for start in block.window_starts:
            last[start] = block.index
    return last


def release_freed_memory() -> None:
    """Hand the heap memory freed since the last call back to the system (glibc's
    ``malloc_trim``; elsewhere nothing). Each block frees a few hundred MiB of window
    activations; without this the process keeps more of them, fragmented, between blocks."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def checked_sample(
    dataset: Any, bands: Sequence[int], scale: str, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The date's :func:`decimated_sample` (or every valid pixel, for a date too thin for its
    grid), refusing a date that is all nodata and, under ``input.scale=none``, non-8-bit values
    outside 0-255 anywhere in the date (the sample's read sees every pixel: a sample alone can
    step over one), all before any output is touched. Each block is checked again as it is read.

    Raises:
        SceneError: the date is unreadable, all nodata, or out of range.
    """

    def in_range(data: np.ndarray, valid: np.ndarray, window: Window) -> None:
        rows = f"at rows {window.row_off}-{window.row_off + window.height - 1}"
        check_network_range(data, valid, path, rows)

    inspect = in_range if scale == "none" and not is_uint8(dataset, bands) else None
    try:
        sample = decimated_sample(dataset, bands, inspect)
        if not sample[1].any():  # too few or too thin for its grid? every pixel
            sample = valid_pixels(dataset, bands)
        if not sample[1].any():
            raise SceneError(f"{dataset.name} is all nodata: no pixel to predict")
    except SceneError:
        raise
    except Exception as err:
        raise SceneError(f"{dataset.name} cannot be read (corrupt or truncated?): {err}") from err
    values = sample[0][:, sample[1]]
    if inspect is not None and values.dtype.kind == "f" and float(values.max()) <= 1.0:
        log.warning(
            "input.scale=none but the values sampled from %s lie within 0-1 (reflectance?): the network "
            "takes 0-255, so it sees a nearly black image; set input.scale=percentile, or "
            "input.scale=fixed input.scale_min=0 input.scale_max=1",
            path,
        )
    return sample


def pair_scaling(
    pair: ScenePair, bands: Sequence[int], settings: SceneSettings, pre_path: Path, post_path: Path
) -> tuple[Scaling, Scaling]:
    """Both dates' :class:`Scaling` (:func:`~changecam.geo.bands.pair_scalings`), each date
    checked first (:func:`checked_sample`). A reprojected post's percentile sample is read
    through a warp onto the sample's places only; when that finds no valid pixel (a thin
    overlap) the post's own file is sampled and checked instead.

    Raises:
        SceneError: a date unreadable, all nodata, or out of range.
    """
    scale = settings.scale
    pre, post = pair.pre, pair.post_source
    stretched = scale in STRETCHES and not (is_uint8(pre, bands) and is_uint8(post, bands))
    own: list[Sample | None] = [None, None]
    if needs_sample(pre, bands, scale):
        own[0] = checked_sample(pre, bands, scale, pre_path)
    warped_sample = None
    if pair.reprojected and stretched:
        try:
            with post_on_sample_grid(pair, sample_factor(pre)) as coarse:
                warped_sample = decimated_sample(coarse, bands)
        except Exception as err:
            raise SceneError(f"{post_path} cannot be read (corrupt or truncated?): {err}") from err
        if not warped_sample[1].any():
            warped_sample = None
    if warped_sample is None and needs_sample(post, bands, scale):
        own[1] = checked_sample(post, bands, scale, post_path)
    on_grid = (own[0], warped_sample if pair.reprojected else own[1])
    return pair_scalings(
        pre,
        post,
        bands,
        scale,
        settings.scale_min,
        settings.scale_max,
        (own[0], own[1]),
        on_grid,
    )


def predict_scene(
    net: nn.Module,
    pre_path: str | Path,
    post_path: str | Path,
    folder: str | Path,
    spec: SlidingWindow,
    settings: SceneSettings,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`_predict_scene` with GDAL's block cache capped at :data:`GDAL_CACHE_MB` (its
    default, 5 % of the machine's memory, would grow with the scene while writing and
    building overviews) and ``settings.gdal_threads`` threads for GDAL's (de)compression (the
    reader and writer threads take turns with GDAL, geo.gdal_lock: these
    threads shorten each turn). A refused scene whose inputs are not the files an earlier
    run's outputs in ``folder`` were made from (changed since, or other files) leaves none of
    those outputs, which would describe other inputs; a refusal with the same inputs (a
    setting) keeps them."""
    # GDAL_TIFF_INTERNAL_MASK: the probability's mask inside its .tif (GDAL before 3.9, or a
    # user's environment, would write a .msk sidecar that the rename to the final name leaves)
    with rasterio.Env(
        GDAL_CACHEMAX=GDAL_CACHE_BYTES,
        GDAL_NUM_THREADS=settings.gdal_num_threads,
        GDAL_TIFF_INTERNAL_MASK=True,
    ):
        try:
            return _predict_scene(
                net, pre_path, post_path, folder, spec, settings, device, **kwargs
            )
        except SceneError:
            folder = Path(folder)
            if not made_from(folder, Path(pre_path), Path(post_path)):
                (folder / REPORT_FILE).unlink(missing_ok=True)
                SceneFiles(folder, explain=True).remove(("final",))
            else:
                hide_unfinished(folder)
            raise


def with_ignored_bounds(record: dict[str, Any], logged: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the ``scale_min``/``scale_max`` a run under another ``input.scale``
    than ``fixed`` logged, when this run gives none: runs made before such bounds were refused
    ignored them (their blocks are this run's), and their logs resume."""
    was, now = logged.get("scene"), record.get("scene")
    if not (isinstance(was, dict) and isinstance(now, dict)):
        return record
    bounds = ("scale_min", "scale_max")
    if was.get("scale") != now.get("scale") or now.get("scale") == "fixed":
        return record
    if any(now.get(k) is not None for k in bounds):
        return record
    return {**record, "scene": {**now, **{k: was.get(k) for k in bounds if k in was}}}


def made_from(folder: Path, pre_path: Path, post_path: Path) -> bool:
    """Whether the run logged in ``folder`` (``blocks.jsonl``'s header; no log: nothing to
    tell, ``True``) read these files as they are now (:func:`file_record`)."""
    records = BlockLog(folder / LOG_FILE).read()
    if not records:
        return True
    recorded = records[0].get("settings") or {}
    for key, path in (("pre", pre_path), ("post", post_path)):
        try:
            now = input_record(path)
        except (OSError, SceneError):  # gone or unreadable: opening the pair names it
            return False
        if recorded.get(key) != as_logged(now, recorded.get(key)):
            return False
    return True


def _predict_scene(
    net: nn.Module,
    pre_path: str | Path,
    post_path: str | Path,
    folder: str | Path,
    spec: SlidingWindow,
    settings: SceneSettings,
    device: torch.device | str = "cpu",
    *,
    resume: bool = False,
    run_record: dict[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Predict one scene pair into ``folder`` (see the module docstring); returns the summary
    also written to ``folder/scene.json``.

    Args:
        net: the network (eval mode, on ``device``).
        pre_path: the first date (its grid is the outputs' grid).
        post_path: the second date.
        folder: the scene's output folder.
        spec: the sliding window (window, overlap, blend, padding).
        settings: bands, scaling, alignment, blocks, explanation, polygons.
        device: where the network runs.
        resume: continue an earlier run of the same settings in ``folder``.
        run_record: what else a resumed run must repeat (checkpoint, ...).
        name: the scene's name in the summary (default: the pre file's stem).

    Raises:
        SceneError: the pair is refused (nothing that looks finished is left).
    """
    started = time.perf_counter()
    pre_path, post_path, folder = Path(pre_path), Path(post_path), Path(folder)
    device = torch.device(device)
    check_window(net, spec.window)
    if settings.batch_size is not None:
        spec = SlidingWindow(**{**asdict(spec), "batch_size": settings.batch_size})
    layer = None
    if settings.explain:
        layers = per_date_layers(resolve_taps(net, None, shared=True))
        layer = choose_layer(layers, settings.explain_layer, "predict.explain_layer")
    try:  # recorded before they are read: a file replaced meanwhile is not taken for the one read
        inputs = {"pre": input_record(pre_path), "post": input_record(post_path)}
    except (OSError, SceneError):  # opening the pair names what is wrong
        inputs = None
    with open_pair(pre_path, post_path, settings.align) as pair:
        if inputs is None:
            inputs = {"pre": input_record(pre_path), "post": input_record(post_path)}
        bands = select_bands(
            pair.pre, pair.post_source, settings.bands, getattr(net, "in_channels", None)
        )
        grid = pair.grid
        area_reason = area_problem(grid) if settings.min_area_m2 > 0 and settings.polygons else None
        if area_reason is not None:
            raise SceneError(
                f"predict.min_area_m2={settings.min_area_m2} needs ground areas in m², but "
                f"{pre_path} {area_reason}; reproject the scenes to their UTM zone or an "
                "equal-area CRS, or set predict.min_area_m2=0"
            )
        blocks = block_grid(grid.height, grid.width, settings.block_size, spec)
        # a pair whose every selected band is valid by its flags (no nodata, alpha or mask; a
        # reprojected post has an alpha band) and is not floating point (NaN is nodata)
        # gives no nodata pixel: no mask to write
        masked = not (all_valid(pair.pre, bands) and all_valid(pair.post, bands))
        files = SceneFiles(
            folder,
            layer is not None,
            tile_side(settings.block_size),
            masked,
            settings.polygons,
            settings.explain_method,
        )
        units = {"pre": units_record(pair.pre, bands), "post": units_record(pair.post, bands)}
        record = {
            **(run_record or {}),
            **inputs,
            "sliding_window": asdict(spec),
            "scene": settings.resumable(),
            "explain_layer": layer,
            # a resumed run writes the mask exactly when the first one did
            "probability_mask": masked,
            # the values are read in these units (bands.read_values): recorded only where a
            # band has any, so that runs of files without them, and their logs, stay as they were
            **({"band_units": units} if any(units.values()) else {}),
        }
        block_log = BlockLog(folder / LOG_FILE)
        fresh = record = strict_json(record)
        logged = block_log.read() if resume else []
        if logged:  # a log older than a recorded key resumes as it did; a new log gets them all
            earlier = logged[0].get("settings") or {}
            record = with_ignored_bounds(as_logged(record, earlier), earlier)
        finished = finished_scene(folder, files, block_log, record, settings) if resume else None
        if finished is not None:
            log.info("%s is finished already (predict.resume=true): kept", folder)
            return finished
        # a finished scene needs no sample (the run that finished it read the same files)
        for dataset, path in ((pair.pre, pre_path), (pair.post_source, post_path)):
            warning = large_block_warning(dataset, bands, path)
            if warning is not None:
                log.warning(warning)
        scaling = pair_scaling(pair, bands, settings, pre_path, post_path)
        if resume:
            take_back_rasters(files, block_log, record, blocks, settings)
        folder.mkdir(parents=True, exist_ok=True)
        readable = resume and files.partials_readable(settings_hash(record))
        if readable and not settings.overviews and files.partials_have_overviews():
            # killed after building them; GDAL cannot take overviews out of a file
            log.warning(
                "%s: the partial rasters have overviews, which predict.overviews=false does not "
                "make: predicting the scene again",
                folder,
            )
            readable = False

        def clear(continued: bool) -> None:  # from here on the scene is unfinished
            (folder / REPORT_FILE).unlink(missing_ok=True)
            files.remove(("final",) if continued else ("partial", "final"))
            fsync_directory(folder)

        continued = block_log.start(record, resume, readable, fresh, clear)
        record = record if continued else fresh
        if not continued:
            files.create(
                grid,
                {
                    "threshold": str(settings.threshold),
                    "explain_layer": str(layer),
                    "explain_method": settings.explain_method if layer else "None",
                    SETTINGS_TAG: settings_hash(record),
                },
            )
        todo = [b for b in blocks if b.index not in block_log.done]
        if continued:
            log.info(
                "resuming %s: %d of %d blocks already done",
                folder,
                len(blocks) - len(todo),
                len(blocks),
            )
            files.read_back(b for b in blocks if b.index in block_log.done)
        runner = SceneNetwork(net, spec, settings.threshold, layer, settings.explain_method)
        # distinct windows: those of the blocks still to do are computed by this run
        total_windows = sum(new_windows(blocks).values())
        computed = new_windows(todo)
        bar = tqdm(
            total=total_windows,
            initial=total_windows - sum(computed.values()),
            desc=f"scene {name or pre_path.stem}",
            unit="window",
            disable=not settings.progress,
        )
        done_pixels = sum(b.pixels for b in blocks if b.index in block_log.done)
        compute_started = time.perf_counter()

        def read(block: Block) -> Region:
            try:
                return read_region(
                    pair.pre,
                    pair.post,
                    bands,
                    (scaling[0], scaling[1]),
                    block,
                    (pre_path, post_path),
                )
            except SceneError:
                raise
            except Exception as err:
                raise SceneError(
                    f"reading block {block.index} (rows {block.region_row}.., cols "
                    f"{block.region_col}..) of {pre_path} / {post_path} failed (corrupt or "
                    f"truncated file?): {err}"
                ) from err

        last_use = window_last_use(blocks)
        tracer = RegionTracer(grid, folder) if settings.polygons else None
        written_before = [b for b in blocks if b.index in block_log.done]
        writer = BlockWriter(files, tracer, settings.threshold, block_log.add)
        with bar, WindowCache(folder) as reuse, writer:
            for region in prefetched(todo, read, settings.prefetch):
                block = region.block
                inner = region.valid[
                    block.row - block.region_row : block.row - block.region_row + block.height,
                    block.col - block.region_col : block.col - block.region_col + block.width,
                ]
                probability, explanation = runner.block(region, device, reuse)
                for start in [k for k in reuse if last_use[k] <= block.index]:
                    del reuse[start]  # no later block needs this window
                # the next block row's windows wait on disk: memory does not grow with the width
                reuse.spill([k for k in reuse if last_use[k] > block.index + 1])
                if layer is not None:  # the explanation's transients: hundreds of MiB a block
                    release_freed_memory()
                writer.submit(block, probability, inner, explanation)  # written in the background
                done_pixels += block.pixels
                bar.update(computed[block.index])
                bar.set_postfix_str(f"{done_pixels / 1e6:.2f}/{grid.pixels / 1e6:.2f} MP")
            window_cache = reuse.record()
        compute_seconds = time.perf_counter() - compute_started
    finish_started = time.perf_counter()
    valid = sum(r["valid"] for r in block_log.done.values())
    if valid == 0:
        files.remove(("partial",))
        (folder / LOG_FILE).unlink(missing_ok=True)
        raise SceneError(
            f"no pixel of {pre_path} is valid in both dates (all nodata where the scenes overlap)"
        )
    features = None
    if tracer is not None:
        features = scene_polygons(
            tracer,
            written_before,
            files.partial("change"),
            files.partial("probability"),
            files.partial("explanation") if layer is not None else None,
            settings.min_area_m2,
        )
        write_geojson(files.partial("polygons"), features, grid)
        tracer.close()
    if settings.overviews:
        files.build_overviews(grid)
        files.check_overviews_whole()
    written = files.publish()
    finish_seconds = time.perf_counter() - finish_started
    changed = sum(r["changed"] for r in block_log.done.values())
    pre_mass = sum(r.get("pre_mass", 0.0) for r in block_log.done.values())
    post_mass = sum(r.get("post_mass", 0.0) for r in block_log.done.values())
    summary = strict_json(
        {
            "name": name or pre_path.stem,
            # absolute: the record is read from anywhere (scripts/render_scene_overlay.py)
            "pre": str(Path(pre_path).absolute()),
            "post": str(Path(post_path).absolute()),
            "crs": grid.crs.to_string() if grid.crs else None,
            "transform": list(grid.transform)[:6],
            "size": [grid.height, grid.width],
            "bands": list(bands),
            "scaling": {"pre": scaling[0].record(), "post": scaling[1].record()},
            "post_reprojected": pair.reprojected,
            "blocks": len(blocks),
            "windows": total_windows,
            "resumed_blocks": len(blocks) - len(todo),
            "valid_pixels": valid,
            "changed_pixels": changed,
            "changed_fraction": changed / valid,
            "polygons": len(features) if features is not None else None,
            "overviews": settings.overviews,
            "explain_layer": layer,
            "explain_method": settings.explain_method if layer else None,
            "explanation_bands": list(explanation_bands(settings.explain_method))
            if layer
            else None,
            "post_share": post_mass / (pre_mass + post_mass) if pre_mass + post_mass > 0 else None,
            "threshold": settings.threshold,
            "min_area_m2": settings.min_area_m2,
            # where the time went: opening and scaling, the blocks (network, reader and
            # writer threads together), then joining polygons, overviews and renaming
            "seconds": time.perf_counter() - started,
            "setup_seconds": compute_started - started,
            "compute_seconds": compute_seconds,
            "finish_seconds": finish_seconds,
            "window_cache": window_cache,
            "files": written,
        }
    )
    write_json(folder / REPORT_FILE, summary)
    return summary


__all__ = [
    "LOG_FILE",
    "REPORT_FILE",
    "SCENE_SUFFIXES",
    "SceneNetwork",
    "SceneSettings",
    "is_scene_file",
    "predict_scene",
    "remove_scene",
]

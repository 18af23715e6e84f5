"""Predict change on a georeferenced scene pair of any size, block by block, in bounded memory.

The scene is cut into ``block``² blocks. Each block is read with a halo of the windows'
overlap on every side (both dates, on the pre scene's grid, :class:`~changecam.geo.scene.ScenePair`), run
through the one sliding-window inference of the project
(:func:`~changecam.models.sliding_window.sliding_window_logits`), and its centre is written
into the output rasters, so that memory depends on the block, never on the scene. A
background thread reads the next block while the network runs.

Outputs, in ``out_dir``, with the pre scene's CRS and transform:

* ``change.tif``: uint8, 1 = change, 0 = none, 255 = nodata (a pixel that is nodata in either
  date), tiled, deflate-compressed, with overviews;
* ``probability.tif``: uint16 ``1 + p * 65534`` (so ``p = (value - 1) / 65534``), 0 where
  nodata (its nodata value), with overviews;
* ``explanation.tif`` (with ``explain_layer``): float32 bands ``pre``, ``post`` (the
  HiResCAM maps of that layer, or date-contrastive ones with ``method="contrastive"``, upsampled
  to pixels) and ``post_share`` (``P_post / (P_pre + P_post)`` of their positive parts per
  pixel, NaN where both are 0 or nodata); each block (with its halo) is explained with its
  own predicted change as the target, the maps of its centre written;
* ``change.geojson``: one polygon per changed region in the scene's CRS, with ``area_m2``,
  ``mean_probability`` and, with an explanation, its own ``post_share``; regions under
  ``min_area_m2`` are dropped.

Rasters are written to ``*.partial.tif`` and renamed at the end; ``scene_progress.jsonl``
records each finished block, so ``resume=True`` continues a killed run where it stopped.
Nothing with a final name exists before the run has finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import rasterio.features
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window, from_bounds
from torch import nn
from tqdm import tqdm

from changecam.atomic import append_json_line, write_text
from changecam.data.transforms import image_to_tensor
from changecam.explain import Target, explain_batch
from changecam.explain.runner import pad_to_multiple
from changecam.geo.scene import ScenePair, SceneSettings
from changecam.models.protocol import size_multiple
from changecam.models.sliding_window import SlidingWindow, sliding_window_logits

PROBABILITY_SCALE = 65535
NODATA = 255
PROGRESS_FILE = "scene_progress.jsonl"
OUTPUTS = ("change.tif", "probability.tif")
EXPLANATION = "explanation.tif"


@dataclass(frozen=True)
class SceneRun:
    """Settings of a scene prediction.

    Args:
        threshold: probability above which a pixel is change.
        block: side of the blocks written at a time (px).
        min_area_m2: polygons smaller than this are dropped from ``change.geojson``.
        resume: continue a run killed in ``out_dir`` (same inputs and settings).
        explain_layer: a per-date layer (e.g. ``enc3``) for ``explanation.tif``; None: none.
        method: the explanation method of its maps (``hirescam`` or ``contrastive``).
    """

    threshold: float = 0.5
    block: int = 2048
    min_area_m2: float = 0.0
    resume: bool = False
    explain_layer: str | None = None
    method: Literal["hirescam", "contrastive"] = "hirescam"


def blocks(width: int, height: int, block: int) -> list[Window]:
    """The output blocks, row-major."""
    return [
        Window(c, r, min(block, width - c), min(block, height - r))
        for r in range(0, height, block)
        for c in range(0, width, block)
    ]


def _profile(pair: ScenePair, dtype: str, nodata: float, count: int = 1) -> dict[str, Any]:
    tile = 256 if min(pair.width, pair.height) >= 256 else 16
    return {
        "driver": "GTiff",
        "width": pair.width,
        "height": pair.height,
        "count": count,
        "dtype": dtype,
        "crs": pair.crs,
        "transform": pair.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": tile,
        "blockysize": tile,
        "compress": "deflate",
    }


def _read_ahead(pair: ScenePair, windows: list[Window], halo: int) -> Iterator[tuple]:
    """Yield (window, pre, post, valid) for each window, the next one read in a thread."""
    jobs: queue.Queue = queue.Queue(maxsize=1)

    def reader() -> None:
        try:
            for w in windows:
                grown = Window(
                    w.col_off - halo, w.row_off - halo, w.width + 2 * halo, w.height + 2 * halo
                )
                jobs.put((w, *pair.read(grown)))
        except BaseException as err:  # handed to the consumer
            jobs.put(err)
        jobs.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while (item := jobs.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def _done_blocks(path: Path, settings: dict[str, Any]) -> set[int]:
    if not path.is_file():
        return set()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("settings") != settings:
        raise ValueError(
            f"predict.resume=true: {path} was started with other inputs or settings; "
            "run without resume (or in a new run directory)"
        )
    return {line["block"] for line in lines[1:]}


def predict_scene(
    net: nn.Module,
    pre: str | Path,
    post: str | Path,
    out_dir: str | Path,
    window: SlidingWindow,
    scene: SceneSettings | None = None,
    run: SceneRun | None = None,
    device: torch.device | str = "cpu",
    on_block: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Predict the scene pair into ``out_dir``; returns the run's summary (also ``scene.json``).

    Args:
        net: the change network, ``net(pre, post) -> logits``.
        pre: the pre-change GeoTIFF; its grid is the outputs' grid.
        post: the post-change GeoTIFF (reprojected onto pre's grid if needed).
        out_dir: where the outputs go.
        window: the sliding window (size, overlap, batch, blend).
        scene: band selection, scaling and alignment.
        run: threshold, block size, polygon filter, resume.
        device: where the network runs.
        on_block: called with each finished block's index (tests use it to interrupt a run).
    """
    scene = scene or SceneSettings()
    run = run or SceneRun()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.to(device).eval()
    # every window of a block lies inside the block and its halo, so a pixel at the block's
    # edge is predicted from a full window of real image; the halo only adds the overlap
    halo = max(16, round(window.window * window.overlap))
    settings = {
        "pre": str(Path(pre).resolve()),
        "post": str(Path(post).resolve()),
        "scene": asdict(scene),
        "window": asdict(window),
        "threshold": run.threshold,
        "block": run.block,
        "explain_layer": run.explain_layer,
        "method": run.method,
    }
    progress_path = out / PROGRESS_FILE
    names = (*OUTPUTS, EXPLANATION) if run.explain_layer else OUTPUTS
    partial = {name: out / name.replace(".tif", ".partial.tif") for name in names}
    with ScenePair(pre, post, scene) as pair:
        windows = blocks(pair.width, pair.height, run.block)
        done = _done_blocks(progress_path, settings) if run.resume else set()
        if not all(p.is_file() for p in partial.values()):
            done = set()
        if not done:
            for path in (*partial.values(), progress_path, *(out / n for n in names)):
                path.unlink(missing_ok=True)
            (out / "change.geojson").unlink(missing_ok=True)
            append_json_line(progress_path, {"settings": settings})
            mode = "w"
        else:
            mode = "r+"
        kwargs = {}
        if mode == "w":
            kwargs = {
                "change.tif": _profile(pair, "uint8", NODATA),
                "probability.tif": _profile(pair, "uint16", 0),
                EXPLANATION: _profile(pair, "float32", float("nan"), count=3),
            }
        todo = [i for i in range(len(windows)) if i not in done]
        megapixels = pair.width * pair.height / 1e6
        with (
            rasterio.open(partial["change.tif"], mode, **kwargs.get("change.tif", {})) as change,
            rasterio.open(
                partial["probability.tif"], mode, **kwargs.get("probability.tif", {})
            ) as probability,
            (
                rasterio.open(partial[EXPLANATION], mode, **kwargs.get(EXPLANATION, {}))
                if run.explain_layer
                else contextlib.nullcontext()
            ) as explanation,
            tqdm(
                total=len(windows),
                initial=len(done),
                unit="block",
                desc=f"scene {megapixels:.1f} Mpx",
            ) as bar,
        ):
            reads = _read_ahead(pair, [windows[i] for i in todo], halo)
            for index, (w, pre_rgb, post_rgb, valid) in zip(todo, reads, strict=True):
                prob = _probability(net, pre_rgb, post_rgb, window, device)
                centre = (slice(halo, halo + w.height), slice(halo, halo + w.width))
                p, ok = prob[centre], valid[centre]
                mask = np.where(ok, (p > run.threshold).astype(np.uint8), NODATA)
                change.write(mask.astype(np.uint8), 1, window=w)
                scaled = np.round(p * (PROBABILITY_SCALE - 1)).astype(np.uint16) + 1
                probability.write(np.where(ok, scaled, 0).astype(np.uint16), 1, window=w)
                if explanation is not None:
                    maps = _explain(net, pre_rgb, post_rgb, valid, run, device)
                    maps = maps[:, centre[0], centre[1]]
                    maps[:, ~ok] = np.nan
                    explanation.write(maps.astype(np.float32), window=w)
                append_json_line(progress_path, {"block": index})
                bar.update(1)
                bar.set_postfix(Mpx=f"{w.width * w.height / 1e6:.2f}/block")
                if on_block is not None:
                    on_block(index)
        for path in partial.values():
            with rasterio.open(path, "r+") as ds:
                ds.build_overviews(
                    [f for f in (2, 4, 8, 16) if min(ds.shape) // f >= 64] or [2],
                    Resampling.nearest,
                )
        pixel_area = abs(pair.transform.a * pair.transform.e - pair.transform.b * pair.transform.d)
        if explanation is not None:
            with rasterio.open(partial[EXPLANATION], "r+") as ds:
                ds.descriptions = (
                    f"pre {run.method} {run.explain_layer}",
                    f"post {run.method} {run.explain_layer}",
                    "post share",
                )
        features = polygons(
            partial["change.tif"],
            partial["probability.tif"],
            run.min_area_m2,
            partial.get(EXPLANATION),
        )
        summary = {
            "width": pair.width,
            "height": pair.height,
            "crs": str(pair.crs),
            "pixel_area_m2": pixel_area,
            "changed_pixels": int(sum(f["properties"]["pixels"] for f in features)),
            "polygons": len(features),
            "blocks": len(windows),
            "settings": settings,
        }
    write_text(
        out / "change.geojson",
        json.dumps({"type": "FeatureCollection", "features": features}),
    )
    for name, path in partial.items():
        os.replace(path, out / name)
    write_text(out / "scene.json", json.dumps(summary, indent=2, sort_keys=True))
    progress_path.unlink(missing_ok=True)
    return summary


def _probability(
    net: nn.Module, pre: np.ndarray, post: np.ndarray, window: SlidingWindow, device
) -> np.ndarray:
    with torch.inference_mode():
        a = image_to_tensor(pre)[None].to(device)
        b = image_to_tensor(post)[None].to(device)
        logits = sliding_window_logits(net, a, b, window)
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


def _explain(
    net: nn.Module,
    pre: np.ndarray,
    post: np.ndarray,
    valid: np.ndarray,
    run: SceneRun,
    device: torch.device | str,
) -> np.ndarray:
    """3×H×W: the pre and post maps of ``run.explain_layer`` and the per-pixel post share."""
    height, width = valid.shape
    multiple = size_multiple(net)
    a = pad_to_multiple(image_to_tensor(pre)[None].to(device), multiple)
    b = pad_to_multiple(image_to_tensor(post)[None].to(device), multiple)
    inside = torch.zeros(1, *a.shape[-2:], dtype=torch.bool, device=device)
    inside[0, :height, :width] = torch.from_numpy(valid).to(device)
    exp = explain_batch(
        net,
        a,
        b,
        taps=[run.explain_layer],
        target=Target("predicted", run.threshold),
        methods=("hirescam", "contrastive") if run.method == "contrastive" else ("hirescam",),
        valid=inside,
    )
    maps = [
        exp.upsampled[run.method][f"{date}/{run.explain_layer}"][0, :height, :width]
        for date in ("pre", "post")
    ]
    pre_map, post_map = (m.detach().float().cpu().numpy() for m in maps)
    p_pre, p_post = np.maximum(pre_map, 0), np.maximum(post_map, 0)
    total = p_pre + p_post
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, p_post / total, np.nan)
    return np.stack([pre_map, post_map, share])


def polygons(
    change_path: Path,
    probability_path: Path,
    min_area_m2: float,
    explanation_path: Path | None = None,
) -> list[dict]:
    """One GeoJSON feature per 8-connected changed region of ``change_path``.

    Properties: ``area_m2`` (pixel count × pixel area), ``pixels`` and ``mean_probability``.
    The mask is read whole (uint8: 64 MB at 8192²); the probability only in each region's
    bounding box.
    """
    with (
        rasterio.open(change_path) as ds,
        rasterio.open(probability_path) as prob,
        rasterio.open(explanation_path) if explanation_path else contextlib.nullcontext() as maps,
    ):
        mask = ds.read(1)
        transform = ds.transform
        pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
        changed = mask == 1
        features = []
        for geometry, _ in rasterio.features.shapes(
            changed.astype(np.uint8), mask=changed, connectivity=8, transform=transform
        ):
            xs, ys = zip(*(xy for ring in geometry["coordinates"] for xy in ring), strict=True)
            box = from_bounds(min(xs), min(ys), max(xs), max(ys), transform)
            box = (
                box.round_offsets()
                .round_lengths()
                .intersection(Window(0, 0, mask.shape[1], mask.shape[0]))
            )
            rows, cols = box.toslices()
            region = (
                rasterio.features.geometry_mask(
                    [geometry],
                    out_shape=(box.height, box.width),
                    transform=rasterio.windows.transform(box, transform),
                    invert=True,
                )
                & changed[rows, cols]
            )
            pixels = int(region.sum())
            area = pixels * pixel_area
            if area < min_area_m2:
                continue
            values = prob.read(1, window=box)[region].astype(np.float64)
            mean = float(((values - 1) / (PROBABILITY_SCALE - 1)).mean())
            properties = {"area_m2": area, "pixels": pixels, "mean_probability": round(mean, 6)}
            if maps is not None:  # the polygon's own post share: its positive masses
                pre_map, post_map = (
                    np.maximum(maps.read(i, window=box)[region], 0) for i in (1, 2)
                )
                total = float(np.nansum(pre_map) + np.nansum(post_map))
                properties["post_share"] = (
                    round(float(np.nansum(post_map)) / total, 6) if total > 0 else None
                )
            features.append(
                {
                    "type": "Feature",
                    "geometry": geometry,
                    "properties": properties,
                }
            )
    return features

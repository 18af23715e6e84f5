"""Whole georeferenced scenes: peak memory and throughput of predict.py's GeoTIFF path.

Measured in one run:

* **scene**: a synthetic georeferenced pair of ``--size``² (8192² by default; ``--large`` adds
  16384²), EPSG:32650 at 0.5 m, tiled (256 px) and DEFLATE-compressed, written tile by tile
  from the repository's synthetic generator (1024² generator scenes side by side; one tile of
  the pair in memory at a time). ``python predict.py`` predicts it in a child process with
  its defaults (``explanation.tif`` on, polygons, overviews): its peak RSS is the kernel's
  high-water mark (``wait4``'s ``ru_maxrss``), its seconds and megapixels per second come
  from its ``scene.json``;
* **side by side** on a ``--compare``² pair (2048² by default), in this process, one network
  as predict.py runs it (:func:`changecam.models.inference.inference_network`), best of
  ``--repeats`` (5) interleaved runs (every other round in reverse order), once with one torch
  thread and once with torch's default: today's PNG path
  (:func:`changecam.cli.predict.predict_pair` + ``save``: the whole image in memory, sliding
  windows, mask and probability PNGs, one thread of work) against the GeoTIFF path
  (:func:`changecam.geo.predict_scene`, explanation off, then on; a reader, a writer and a
  tracer thread beside the network), each with its default windows per forward pass, the
  GeoTIFF path making only what the PNG path makes (``predict.polygons=false
  predict.overviews=false``: a mask and a probability raster, like for like), and the GeoTIFF
  path again with ``predict.gdal_threads=1`` (GDAL decodes and compresses tiles in the
  reader and writer threads alone, where the default lets it use every CPU), all of them with
  the garbage collector as predict.py runs it (:func:`changecam.environment.frozen_gc`). Throughput is
  megapixels per second of wall-clock time (the GeoTIFF runs also split theirs into setup,
  block loop and finish, from ``scene.json``); the CPU seconds of the whole process (all its
  threads) are reported beside it, with the calling thread's CPU seconds inside the network's
  forward passes (forward hooks). The explanation's extra cost is wall seconds per megapixel.
  ``windowed_at_least_as_fast`` judges the GeoTIFF path against the PNG path: its
  throughput entries from the rounds' ratios, not from the best runs alone (``faster``,
  ``slower`` or ``even within noise`` by the sign test, :func:`common.paired_verdict`: the
  median ratio's interval, ``[min, max]`` of 5 rounds, covers it with probability 0.94);
  ``cpu_seconds`` from the best runs' CPU seconds, PNG / windowed >= 1 (per-round CPU seconds
  are not kept).

The network is the quickstart U-Net (``experiment=quickstart``: ``model=siamese_unet`` with
``base_channels`` 8), **freshly initialised** (seed 0) and saved as a state dict: the speed
and memory of a forward pass do not depend on the weights, though its outputs do (a fresh
network calls nearly everything change: one large polygon, and probabilities that compress
poorly). ``--weights`` runs a trained one instead (a ``.ckpt`` ``make train`` writes).
``--stand-in`` runs the side by side alone (no explanation) with a stand-in whose forward
passes cost next to nothing (:func:`stand_in_network`), as the network's cost is on a GPU:
what is left is what each path does besides the network, on this machine's CPU. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, emit, machine, median, paired_verdict
from memory import peak_rss

GIB = 2**30
TILE_SCENE = 1024  # side of one generator scene
PHASES = ("setup", "compute", "finish")  # scene.json's *_seconds


def quickstart_width() -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(REPO / "conf/experiment/quickstart.yaml").model.base_channels)


def write_synthetic_pair(folder: Path, size: int) -> tuple[Path, Path]:
    """A ``size``² georeferenced pair tiled from 1024² generator scenes
    (:func:`changecam.geo.synthetic.write_synthetic_scene`)."""
    from changecam.geo.synthetic import write_synthetic_scene

    return write_synthetic_scene(folder, size, tile=TILE_SCENE)


def png_pair(pre_tif: Path, post_tif: Path, folder: Path) -> tuple[Path, Path]:
    """The pair as PNGs in ``folder`` (written unless there already), for the PNG path."""
    import numpy as np
    import rasterio

    from changecam.data.io import write_png

    pngs = []
    for path in (pre_tif, post_tif):
        pngs.append(folder / f"{path.stem}.png")
        if not pngs[-1].is_file():
            with rasterio.open(path) as src:
                write_png(pngs[-1], np.ascontiguousarray(src.read().transpose(1, 2, 0)))
    return pngs[0], pngs[1]


def network_description(weights: Path | None, stand_in: bool = False) -> str:
    """The JSON's ``network``: the quickstart U-Net, fresh or the checkpoint ``weights``, or
    the stand-in."""
    if stand_in:
        return (
            f"stand-in: 5x5 mean absolute difference of the dates > {STAND_IN_THRESHOLD:g} "
            "(no network cost, as on a GPU)"
        )
    return f"quickstart SiameseUNet base_channels={quickstart_width()}, " + (
        "freshly initialised" if weights is None else f"trained: {weights}"
    )


# the stand-in network (--stand-in): change where the dates' mean absolute difference over a 5x5
# neighbourhood exceeds this (0-255 scale); on the synthetic 2048² pair, 2.2 % of the pixels in
# 910 regions, about as many as make train's checkpoint finds there (900)
STAND_IN_THRESHOLD = 80.0
STAND_IN_SIDE = 5


def stand_in_network():
    """A stand-in for the network whose forward passes cost next to nothing, as on a GPU: the
    logit of change is the dates' mean absolute difference over a 5x5 neighbourhood, less
    :data:`STAND_IN_THRESHOLD`. With it the side by side times what each path does besides
    the network (reading, blending, writing, tracing, overviews) on this machine's CPU."""
    import torch
    from torch import nn
    from torch.nn import functional

    class DifferenceStandIn(nn.Module):
        def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
            difference = (post - pre).abs().mean(1, keepdim=True) * 255.0
            local = functional.avg_pool2d(
                difference, STAND_IN_SIDE, 1, STAND_IN_SIDE // 2, count_include_pad=False
            )
            return (local - STAND_IN_THRESHOLD) / 8.0

    return DifferenceStandIn().eval()


def codec_name(profile: dict[str, Any]) -> str:
    """A raster profile's codec as the benchmarks name it: ``deflate``, ``deflate_predictor``,
    ``lerc``, ..."""
    return profile["compress"] + ("_predictor" if profile.get("predictor", 1) != 1 else "")


def raster_compression() -> dict[str, str]:
    """The JSON's ``compression``: each scene raster's :func:`codec_name` as predict.py writes
    it, so that a record tells which one it was measured with."""
    from affine import Affine

    from changecam.geo.grid import Grid
    from changecam.geo.write import RASTERS, SceneFiles

    files, grid = SceneFiles(Path("."), explain=True), Grid(None, Affine.identity(), 1, 1)
    return {what: codec_name(files.profile(what, grid)) for what in RASTERS}


def fresh_network(path: Path):
    """The quickstart U-Net, freshly initialised, saved as a state dict at ``path``."""
    import torch

    from changecam.models import SiameseUNet

    torch.manual_seed(0)
    net = SiameseUNet(base_channels=quickstart_width()).eval()
    torch.save(net.state_dict(), path)
    return net


def scene_run(
    weights: Path,
    network: list[str],
    pre: Path,
    post: Path,
    out: Path,
    log: Path,
    threads: int | None,
) -> dict[str, Any]:
    """``predict.py`` on a scene pair in a child process (``threads`` torch threads, ``None``:
    torch's default; ``network``: the ``model=`` overrides a plain state dict needs, none for
    a Lightning checkpoint, which records its network): peak RSS, wall seconds, scene.json."""
    cmd = [
        sys.executable,
        "predict.py",
        f"ckpt_path={weights}",
        *network,
        f"input.pre={pre}",
        f"input.post={post}",
        f"hydra.run.dir={out}",
        "predict.progress=false",
    ]
    before = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the child inherits it
    try:
        start = time.perf_counter()
        rss = peak_rss(cmd, log)
        wall = time.perf_counter() - start
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    summary = json.loads((out / "pre" / "scene.json").read_text())
    pixels = summary["size"][0] * summary["size"][1]
    return {
        "side": summary["size"][0],
        "megapixels": round(pixels / 1e6, 2),
        "peak_rss_mib": round(rss / 2**20, 1),
        "within_1_5_gib": rss <= 1.5 * GIB,
        "process_seconds": round(wall, 1),
        "scene_seconds": round(summary["seconds"], 1),
        "megapixels_per_s": round(pixels / 1e6 / summary["seconds"], 4),
        "blocks": summary["blocks"],
        "windows": summary["windows"],
        "polygons": summary["polygons"],
        "window_cache": summary["window_cache"],
        "torch_threads": threads,
    }


def side_by_side(
    net,
    folder: Path,
    size: int,
    repeats: int = 3,
    threads: int | None = 1,
    explained: bool = True,
) -> dict[str, Any]:
    """PNG path vs GeoTIFF path (explanation off, then on unless ``explained`` is false, then
    off with one GDAL thread) on one ``size``² pair, in process,
    with ``threads`` torch threads (``None``: torch's default), best of ``repeats`` interleaved
    runs after one untimed run of each: wall-clock megapixels per second (the paths' throughput)
    and CPU seconds of the whole process (every thread: what the machine spends)."""
    import torch

    from changecam.cli.predict import predict_pair
    from changecam.data.layout import Triplet
    from changecam.environment import frozen_gc
    from changecam.geo import SceneSettings, predict_scene
    from changecam.models.inference import inference_network
    from changecam.models.sliding_window import SlidingWindow

    tif_folder = folder / "tif"
    if (tif_folder / "pre.tif").is_file():
        pre_tif, post_tif = tif_folder / "pre.tif", tif_folder / "post.tif"
    else:
        pre_tif, post_tif = write_synthetic_pair(tif_folder, size)
    pngs = png_pair(pre_tif, post_tif, folder / "png")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = inference_network(net, device)  # as predict.py runs it, for both paths
    png_spec = SlidingWindow()  # conf/sliding_window/default.yaml: 256, 0.25, batch 4
    from omegaconf import OmegaConf

    scene_batch = OmegaConf.load(REPO / "conf/predict.yaml").predict.batch_size
    pair = Triplet("pair", pngs[0], pngs[1], None)
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)

    def png_path() -> None:
        predict_pair(net, pair, png_spec, 0.5, None, device).save(folder / "png_run")

    def scene_path(
        explain: bool, gdal_threads: int | None = None, rasters_only: bool = False
    ) -> dict[str, Any]:
        settings = SceneSettings(
            explain=explain,
            progress=False,
            batch_size=scene_batch,
            gdal_threads=gdal_threads,
            polygons=not rasters_only,
            overviews=not rasters_only,
        )
        return predict_scene(
            net, pre_tif, post_tif, folder / f"scene_{explain}", png_spec, settings, device
        )

    # CPU seconds of the calling thread inside the network's forward passes (the reader and
    # writer threads of the GeoTIFF path run beside them and are not counted there)
    network_cpu = [0.0]
    entered: list[float] = []
    hooks = [net.register_forward_pre_hook(lambda *_: entered.append(time.thread_time()))]

    def leave(*_: Any) -> None:
        network_cpu[0] += time.thread_time() - entered.pop()

    hooks.append(net.register_forward_hook(leave))
    runs: dict[str, Callable[[], Any]] = {"png": png_path, "geotiff": lambda: scene_path(False)}
    if explained:
        runs["geotiff_explained"] = lambda: scene_path(True)
    runs |= {
        # only what the PNG path makes (a mask and a probability raster): like for like
        "geotiff_rasters_only": lambda: scene_path(False, rasters_only=True),
        # predict.gdal_threads=1: GDAL decodes and compresses tiles in the reader
        # and writer threads alone (the default, null, lets it use every CPU)
        "geotiff_one_gdal_thread": lambda: scene_path(False, 1),
    }
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    in_network: dict[str, list[float]] = {k: [] for k in runs}
    # the GeoTIFF runs' own split of their time (scene.json): setup, blocks, finish
    phases: dict[str, dict[str, list[float]]] = {
        k: {p: [] for p in PHASES} for k in runs if k != "png"
    }
    polygons: dict[str, int] = {}  # change.geojson's features, the same every round
    try:
        with frozen_gc():  # as predict.py runs (changecam.environment.frozen_gc)
            for run in runs.values():  # warm-up, untimed: first calls, caches, allocators
                run()
            for round_ in range(repeats):  # interleaved, best of the repeats
                # every other round in reverse order, so a drift of the machine's speed within a
                # round does not favour one path
                for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
                    run = runs[name]
                    network_cpu[0] = 0.0
                    start_cpu, start = time.process_time(), time.perf_counter()
                    result = run()
                    cpu[name].append(time.process_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start)
                    in_network[name].append(network_cpu[0])
                    for phase in phases.get(name, {}):
                        phases[name][phase].append(result[f"{phase}_seconds"])
                    if name != "png" and result["polygons"] is not None:
                        polygons[name] = result["polygons"]
    finally:
        for hook in hooks:
            hook.remove()
        torch.set_num_threads(default_threads)
    best_wall = {k: min(v) for k, v in wall.items()}
    per_round = [p / g for p, g in zip(wall["png"], wall["geotiff"], strict=True)]
    like_per_round = [p / g for p, g in zip(wall["png"], wall["geotiff_rasters_only"], strict=True)]
    # the whole PNG path against the GeoTIFF path's block loop alone (reading, network,
    # writing and tracing), without its setup and finish (joining polygons, overviews)
    blocks_per_round = [
        p / b for p, b in zip(wall["png"], phases["geotiff"]["compute"], strict=True)
    ]
    best_cpu = {k: min(v) for k, v in cpu.items()}
    mp = size * size / 1e6
    return {
        "side": size,
        "megapixels": round(mp, 2),
        "torch_threads": threads or default_threads,
        "repeats": repeats,
        "megapixels_per_s": {k: round(mp / v, 4) for k, v in best_wall.items()},
        "wall_seconds": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "geotiff_vs_png_speed": round(best_wall["png"] / best_wall["geotiff"], 3),
        # the same ratio within each round (the runs of one round are seconds apart, so they
        # share the machine's state): its median and range show how much of it is noise
        "geotiff_vs_png_speed_per_round": [round(r, 3) for r in per_round],
        "geotiff_vs_png_speed_median_round": round(median(per_round), 3),
        # the GeoTIFF path without polygons and overviews, which the PNG path does not make
        "geotiff_rasters_only_vs_png_speed": round(
            best_wall["png"] / best_wall["geotiff_rasters_only"], 3
        ),
        "geotiff_rasters_only_vs_png_speed_per_round": [round(r, 3) for r in like_per_round],
        "geotiff_rasters_only_vs_png_speed_median_round": round(median(like_per_round), 3),
        "geotiff_phase_seconds_median": {
            k: {p: round(median(v), 3) for p, v in split.items()} for k, split in phases.items()
        },
        "geotiff_blocks_vs_png_speed_median_round": round(median(blocks_per_round), 3),
        # the default (GDAL on every CPU) against one GDAL thread, per round
        "gdal_every_cpu_vs_one_thread_speed_median_round": round(
            median(
                o / e for o, e in zip(wall["geotiff_one_gdal_thread"], wall["geotiff"], strict=True)
            ),
            3,
        ),
        "cpu_seconds_best": {k: round(v, 2) for k, v in best_cpu.items()},
        "geotiff_vs_png_cpu": round(best_cpu["png"] / best_cpu["geotiff"], 3),
        # the calling thread's CPU seconds in the network's forward passes (median of the runs)
        "network_cpu_seconds": {k: round(median(v), 2) for k, v in in_network.items()},
        "explanation_extra_s_per_megapixel": round(
            (best_wall["geotiff_explained"] - best_wall["geotiff"]) / mp, 3
        )
        if explained
        else None,
        "windows_per_forward": {"png": png_spec.batch_size, "geotiff": scene_batch},
        "geotiff_polygons": polygons,
        "device": str(device),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", help="scene side(s) (default 8192)")
    parser.add_argument("--large", action="store_true", help="also a 16384² scene")
    parser.add_argument("--compare", type=int, default=2048, help="side of the side-by-side pair")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the scene run (0: torch's default)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="side-by-side rounds (best taken; 5 or more for a verdict)",
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    parser.add_argument(
        "--weights",
        type=Path,
        help="a trained quickstart .ckpt (default: freshly initialised)",
    )
    parser.add_argument(
        "--side-by-side-only", action="store_true", help="only the side-by-side comparison"
    )
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="the side by side alone, with a network that costs next to nothing (as on a GPU)",
    )
    args = parser.parse_args(argv)
    if args.stand_in and args.weights is not None:
        parser.error("--stand-in replaces the network: leave out --weights")
    if args.stand_in and (args.size or args.large):
        parser.error("--stand-in runs the side by side alone: leave out --size and --large")
    size = args.size or [8192]
    sizes = list(size) + ([16384] if args.large and 16384 not in size else [])
    if args.side_by_side_only or args.stand_in:  # predict.py cannot run the stand-in
        sizes = []
    if args.tiny:  # two sizes, so the growth of the peak is computed too
        sizes = [] if args.stand_in or args.side_by_side_only else [256, 512]
        args.compare, args.repeats = 256, 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="changecam-scene-") as tmp_name:
        tmp = Path(tmp_name)
        if args.stand_in:
            weights, net, network = None, stand_in_network(), []
        elif args.weights is None:
            weights = tmp / "quickstart_fresh.pth"
            net = fresh_network(weights)
            network = ["model=siamese_unet", f"model.base_channels={quickstart_width()}"]
        else:
            from changecam.training.checkpoint import load_network

            weights = args.weights.resolve()
            net = load_network(weights)  # the network config the checkpoint records
            network = []
        compare = {}
        for threads in (1, None):  # one torch thread, then torch's default
            key = "one_thread" if threads == 1 else "default_threads"
            compare[key] = side_by_side(
                net, tmp / "compare", args.compare, args.repeats, threads, not args.stand_in
            )
            print(
                f"side by side {args.compare}², {key}: {compare[key]['megapixels_per_s']} MP/s",
                flush=True,
            )
        scenes = []
        for size in sizes:
            pre, post = write_synthetic_pair(tmp / f"scene{size}", size)
            scenes.append(
                scene_run(
                    weights,
                    network,
                    pre,
                    post,
                    tmp / f"run{size}",
                    tmp / f"run{size}.log",
                    args.threads or None,
                )
            )
            print(f"scene {size}²: {scenes[-1]}", flush=True)
            for path in (pre, post):
                path.unlink()
    figures: dict[str, Any] = {
        "scenes": scenes,
        "side_by_side": compare,
        "peak_rss_growth": round(scenes[-1]["peak_rss_mib"] / scenes[0]["peak_rss_mib"], 3)
        if len(scenes) > 1
        else None,
        # the GeoTIFF path against the PNG path, judged from the rounds' ratios by the sign
        # test (common.paired_verdict): a best-of-the-rounds ratio alone swings by more than
        # the difference between the paths on a noisy machine
        "windowed_at_least_as_fast": {
            key: {
                "throughput": paired_verdict(row["geotiff_vs_png_speed_per_round"]),
                "rasters_only_throughput": paired_verdict(
                    row["geotiff_rasters_only_vs_png_speed_per_round"]
                ),
                "cpu_seconds": row["geotiff_vs_png_cpu"] >= 1.0,
            }
            for key, row in compare.items()
        },
        "network": network_description(args.weights, args.stand_in),
        "compression": raster_compression(),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

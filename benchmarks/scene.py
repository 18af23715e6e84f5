"""Whole georeferenced scenes: peak memory and throughput of predict.py's GeoTIFF path.

Measured in one run:

* **scene**: a synthetic georeferenced pair of ``--size``² (8192² by default; ``--large`` adds
  16384²), EPSG:32650 at 0.5 m, tiled (256 px) and DEFLATE-compressed, written tile by tile
  from the repository's synthetic generator (1024² generator scenes side by side; one tile of
  the pair in memory at a time). ``python predict.py`` predicts it in a child process with
  its defaults (``explanation.tif`` on, polygons, overviews): its peak RSS is the kernel's
  high-water mark (``wait4``'s ``ru_maxrss``), its seconds and megapixels per second come
  from its ``scene.json``;
* **side by side** on a ``--compare``² pair (2048² by default), in this process, one network,
  CPU seconds of one torch thread, best of ``--repeats`` (3) interleaved runs:
  today's PNG path (:func:`changecam.cli.predict.predict_pair` + ``save``: the whole image in
  memory, sliding windows, mask and probability PNGs) against the GeoTIFF path
  (:func:`changecam.geo.predict_scene`, explanation off, then on), each with its default
  windows per forward pass. The explanation's extra cost is seconds per megapixel. Each
  path's best run is split into CPU seconds inside the network's forward passes (forward
  hooks; the explanation's backward counts as the rest) and everything else per megapixel.

The network is the quickstart U-Net (``experiment=quickstart``: ``model=siamese_unet`` with
``base_channels`` 8), **freshly initialised** (seed 0) and saved as a state dict: the speed
and memory of a forward pass do not depend on the weights, though the number of polygons
does. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, emit, machine
from memory import peak_rss

GIB = 2**30
TILE_SCENE = 1024  # side of one generator scene


def quickstart_width() -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(REPO / "conf/experiment/quickstart.yaml").model.base_channels)


def write_synthetic_pair(folder: Path, size: int) -> tuple[Path, Path]:
    """A ``size``² georeferenced pair tiled from 1024² generator scenes
    (:func:`changecam.geo.synthetic.write_synthetic_scene`)."""
    from changecam.geo.synthetic import write_synthetic_scene

    return write_synthetic_scene(folder, size, tile=TILE_SCENE)


def fresh_network(path: Path):
    """The quickstart U-Net, freshly initialised, saved as a state dict at ``path``."""
    import torch

    from changecam.models import SiameseUNet

    torch.manual_seed(0)
    net = SiameseUNet(base_channels=quickstart_width()).eval()
    torch.save(net.state_dict(), path)
    return net


def scene_run(
    weights: Path, pre: Path, post: Path, out: Path, log: Path, threads: int | None
) -> dict[str, Any]:
    """``predict.py`` on a scene pair in a child process (``threads`` torch threads, ``None``:
    torch's default): peak RSS, wall seconds, scene.json."""
    cmd = [
        sys.executable,
        "predict.py",
        f"ckpt_path={weights}",
        "model=siamese_unet",
        f"model.base_channels={quickstart_width()}",
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


def side_by_side(net, folder: Path, size: int, repeats: int = 3) -> dict[str, Any]:
    """PNG path vs GeoTIFF path (explanation off, then on) on one ``size``² pair, in process:
    CPU seconds with one torch thread, best of ``repeats`` interleaved runs (the machine may be
    shared: wall time is reported too)."""
    import numpy as np
    import torch

    from changecam.cli.predict import predict_pair
    from changecam.data.io import write_png
    from changecam.data.layout import Triplet
    from changecam.geo import SceneSettings, predict_scene
    from changecam.models.sliding_window import SlidingWindow

    pre_tif, post_tif = write_synthetic_pair(folder / "tif", size)
    import rasterio

    pngs = []
    for path in (pre_tif, post_tif):
        with rasterio.open(path) as src:
            pngs.append(folder / "png" / f"{path.stem}.png")
            write_png(pngs[-1], np.ascontiguousarray(src.read().transpose(1, 2, 0)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).eval()
    png_spec = SlidingWindow()  # conf/sliding_window/default.yaml: 256, 0.25, batch 4
    from omegaconf import OmegaConf

    scene_batch = OmegaConf.load(REPO / "conf/predict.yaml").predict.batch_size
    pair = Triplet("pair", pngs[0], pngs[1], None)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # CPU time of one thread: what the other jobs on the machine leave alone
    predict_pair(net, Triplet("warm", pngs[0], pngs[1], None), png_spec, 0.5, None, device)

    def png_path() -> None:
        predict_pair(net, pair, png_spec, 0.5, None, device).save(folder / "png_run")

    def scene_path(explain: bool) -> None:
        settings = SceneSettings(explain=explain, progress=False, batch_size=scene_batch)
        predict_scene(
            net, pre_tif, post_tif, folder / f"scene_{explain}", png_spec, settings, device
        )

    network_cpu = [0.0]  # CPU seconds inside the network's forward passes, both paths
    entered: list[float] = []
    net.register_forward_pre_hook(lambda *_: entered.append(time.process_time()))

    def leave(*_: Any) -> None:
        network_cpu[0] += time.process_time() - entered.pop()

    net.register_forward_hook(leave)
    runs = {
        "png": png_path,
        "geotiff": lambda: scene_path(False),
        "geotiff_explained": lambda: scene_path(True),
    }
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    in_network: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, best of the repeats
        for name, run in runs.items():
            network_cpu[0] = 0.0
            start_cpu, start = time.process_time(), time.perf_counter()
            run()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
            in_network[name].append(network_cpu[0])
    torch.set_num_threads(threads)
    timings = {k: min(v) for k, v in cpu.items()}
    best = {k: cpu[k].index(v) for k, v in timings.items()}  # the best run of each path
    mp = size * size / 1e6
    return {
        "side": size,
        "megapixels": round(mp, 2),
        "cpu_seconds_best": {k: round(v, 2) for k, v in timings.items()},
        "wall_seconds": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "repeats": repeats,
        "torch_threads": 1,
        "megapixels_per_s": {k: round(mp / v, 4) for k, v in timings.items()},
        # the best run split into the network's forward passes and everything else (reading,
        # scaling, blending, writing, overviews, polygons)
        "network_cpu_seconds": {k: round(in_network[k][best[k]], 2) for k in runs},
        "other_cpu_seconds_per_megapixel": {
            k: round((timings[k] - in_network[k][best[k]]) / mp, 3) for k in runs
        },
        "geotiff_vs_png_speed": round(timings["png"] / timings["geotiff"], 3),
        "explanation_extra_s_per_megapixel": round(
            (timings["geotiff_explained"] - timings["geotiff"]) / mp, 3
        ),
        "windows_per_forward": {"png": png_spec.batch_size, "geotiff": scene_batch},
        "device": str(device),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, nargs="+", default=[8192], help="scene side(s) (default 8192)"
    )
    parser.add_argument("--large", action="store_true", help="also a 16384² scene")
    parser.add_argument("--compare", type=int, default=2048, help="side of the side-by-side pair")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the scene run (0: torch's default)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side runs (best taken)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    parser.add_argument(
        "--side-by-side-only", action="store_true", help="only the side-by-side comparison"
    )
    args = parser.parse_args(argv)
    sizes = list(args.size) + ([16384] if args.large and 16384 not in args.size else [])
    if args.side_by_side_only:
        sizes = []
    if args.tiny:
        sizes, args.compare, args.repeats = [256], 256, 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="changecam-scene-") as tmp_name:
        tmp = Path(tmp_name)
        net = fresh_network(tmp / "quickstart_fresh.pth")
        compare = side_by_side(net, tmp / "compare", args.compare, args.repeats)
        print(f"side by side {args.compare}²: {compare['megapixels_per_s']} MP/s", flush=True)
        scenes = []
        for size in sizes:
            pre, post = write_synthetic_pair(tmp / f"scene{size}", size)
            scenes.append(
                scene_run(
                    tmp / "quickstart_fresh.pth",
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
        "windowed_at_least_as_fast": compare["geotiff_vs_png_speed"] >= 1.0,
        "network": f"quickstart SiameseUNet base_channels={quickstart_width()}, freshly initialised",
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

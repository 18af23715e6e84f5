"""Whole georeferenced scenes: peak memory, throughput against the PNG path, explanation cost.

1. Writes a synthetic georeferenced pair (EPSG:32650, 0.5 m, tiled GeoTIFF) of 8192² pixels
   (16384² too with ``--large``), tile by tile from the synthetic generator (256² scenes), so
   writing it never holds the scene either.
2. Predicts it with the quickstart network (``experiment=quickstart``'s width and depth,
   freshly initialised: speed and memory do not depend on the weights) in a child process,
   whose peak RSS (``ru_maxrss``) is reported: the target is ≤ 1.5 GiB at 8192², not growing
   with the scene.
3. On a 2048² pair, side by side in this run: today's whole-image PNG path
   (:func:`changecam.cli.predict.predict_pair`, no explanation) against the windowed GeoTIFF
   path, in megapixels per second (target: the windowed path at least as fast), and the
   GeoTIFF path with ``explanation.tif`` on: its extra seconds per megapixel.

    python benchmarks/scene.py [--large] [--tiny]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from common import REPO, emit, machine

from changecam.geo import synthetic_scene


def quickstart_network():
    """The quickstart architecture, freshly initialised."""
    from omegaconf import OmegaConf

    from changecam.models import build_network

    cfg = OmegaConf.load(REPO / "conf" / "model" / "siamese_unet.yaml")
    experiment = OmegaConf.load(REPO / "conf" / "experiment" / "quickstart.yaml")
    model = OmegaConf.merge(cfg, experiment.get("model", {}))
    return build_network(OmegaConf.to_container(model, resolve=True)).eval()


def write_scene_pair(folder: Path, size: int) -> tuple[Path, Path]:
    """A ``size``² georeferenced pair written tile by tile (:mod:`changecam.geo.synthetic_scene`)."""
    pre, post, label = synthetic_scene.write_scene_pair(folder, size)
    label.unlink()
    return pre, post


def child(pre: str, post: str, out: str, explain_layer: str | None) -> None:
    """Predict one scene (run in a child process so its peak RSS is its own)."""
    import torch

    from changecam.geo.predict_scene import SceneRun, predict_scene
    from changecam.models.sliding_window import SlidingWindow

    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    predict_scene(
        quickstart_network(),
        pre,
        post,
        out,
        SlidingWindow(window=256, overlap=0.25, batch_size=4),
        run=SceneRun(explain_layer=explain_layer),
    )
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": seconds, "peak_rss_gib": rss}))


def run_child(pre: Path, post: Path, out: Path, explain_layer: str | None = None) -> dict:
    command = [sys.executable, __file__, "--child", str(pre), str(post), str(out)]
    if explain_layer:
        command += ["--explain-layer", explain_layer]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scene child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def png_path_seconds(pre: Path, post: Path, folder: Path) -> float:
    """Today's PNG path on the same pair: decode the PNGs whole, sliding window, write the mask
    and probability PNGs; no panel."""
    from changecam.cli.predict import predict_pair
    from changecam.data.io import write_png
    from changecam.data.layout import Triplet
    from changecam.models.sliding_window import SlidingWindow

    names = []
    for path in (pre, post):
        with rasterio.open(path) as ds:
            png = folder / f"{path.stem}.png"
            write_png(png, ds.read().transpose(1, 2, 0))
            names.append(png)
    net = quickstart_network()
    spec = SlidingWindow(window=256, overlap=0.25, batch_size=4)
    start = time.perf_counter()
    result = predict_pair(net, Triplet("pair", names[0], names[1], None), spec, 0.5, None, "cpu")
    result.save(folder / "png_run")  # masks/ and probabilities/, as predict.py writes them
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also 16384²")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--child", nargs=3, metavar=("PRE", "POST", "OUT"))
    parser.add_argument("--explain-layer", default=None)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, args.explain_layer)
        return {}
    sizes = [512, 1024] if args.tiny else [8192, *([16384] if args.large else [])]
    compare = 256 if args.tiny else 2048
    figures: dict[str, Any] = {"machine": machine(), "sizes": sizes, "compare_size": compare}
    with tempfile.TemporaryDirectory(prefix="changecam-scene-") as tmp_dir:
        tmp = Path(tmp_dir)
        for size in sizes:
            start = time.perf_counter()
            pre, post = write_scene_pair(tmp, size)
            figures[f"scene_write_s_{size}"] = round(time.perf_counter() - start, 1)
            result = run_child(pre, post, tmp / f"out_{size}")
            mpx = size * size / 1e6
            figures[f"scene_peak_rss_gib_{size}"] = round(result["peak_rss_gib"], 3)
            figures[f"scene_mpx_per_s_{size}"] = round(mpx / result["seconds"], 3)
            for name in (pre, post):
                name.unlink()
        pre, post = write_scene_pair(tmp, compare)
        mpx = compare * compare / 1e6
        png_s = png_path_seconds(pre, post, tmp)
        windowed = run_child(pre, post, tmp / "out_compare")
        explained = run_child(pre, post, tmp / "out_explained", explain_layer="enc3")
        figures["png_path_mpx_per_s"] = round(mpx / png_s, 3)
        figures["scene_path_mpx_per_s"] = round(mpx / windowed["seconds"], 3)
        figures["scene_vs_png_speed_ratio"] = round(png_s / windowed["seconds"], 3)
        figures["explanation_extra_s_per_mpx"] = round(
            (explained["seconds"] - windowed["seconds"]) / mpx, 3
        )
        figures["scene_peak_rss_gib_explained"] = round(explained["peak_rss_gib"], 3)
    emit(figures)
    return figures


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

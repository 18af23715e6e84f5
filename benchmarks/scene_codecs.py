"""Which compression the scene rasters' blocks get: CPU time and size, codec by codec.

predict.py writes each block of ``probability.tif`` and ``explanation.tif`` in its own update
of the file (:meth:`changecam.geo.write.SceneFiles.write_block`), where GDAL takes no
compression level (DEFLATE is at libtiff's default, 6). This predicts the synthetic
``--size``² pair (2048² by default; :func:`changecam.geo.synthetic.write_synthetic_scene`)
with the quickstart U-Net (``--weights``: a trained ``.ckpt``; default freshly initialised),
explanation on, then writes its probability and explanation rasters again block by block
(predict.py's blocks, one update session each, one GDAL thread; the pair has no nodata, so
no mask) with each codec, in interleaved rounds, and reports each codec's best round: CPU
milliseconds per megapixel, the size in bits per pixel, and both against the codec predict.py
uses. Every codec here is lossless: each file is read back and must equal what was written to
it. LERC is among them to show what it would save, though predict.py does not use it (some
QGIS builds and GDAL packages cannot read it). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emit, machine
from scene import codec_name, fresh_network, network_description

CODECS: dict[str, dict[str, Any]] = {
    "deflate": {"compress": "deflate"},
    "deflate_predictor": {"compress": "deflate", "predictor": "native"},  # 2 ints, 3 floats
    "lzw": {"compress": "lzw"},
    "zstd_predictor": {"compress": "zstd", "predictor": "native"},
    "lerc": {"compress": "lerc", "max_z_error": 0},
}


def creation_options(codec: str, dtype: str) -> dict[str, Any]:
    options = dict(CODECS[codec])
    if options.get("predictor") == "native":
        options["predictor"] = 3 if dtype.startswith("float") else 2
    return options


def predict_codec(what: str, profile: dict[str, Any]) -> str:
    """The name in :data:`CODECS` of the compression predict.py gives raster ``what``
    (its ``profile``)."""
    codec = codec_name(profile)
    if codec not in CODECS:
        raise ValueError(f"{what}.tif's compression, {codec}, is not one of {list(CODECS)}")
    return codec


def rewrite(
    data: Any, profile: dict[str, Any], windows: list[Any], path: Path, codec: str
) -> float:
    """Write ``data`` to a new ``path`` with ``codec``, one update session per window as
    predict.py writes its blocks; returns the CPU seconds of the writes."""
    import numpy as np
    import rasterio

    path.unlink(missing_ok=True)
    codec_keys = ("compress", "predictor", "zlevel", "max_z_error")
    options = {k: v for k, v in profile.items() if k not in codec_keys}
    options |= creation_options(codec, profile["dtype"])
    with rasterio.open(path, "w", **options):
        pass
    started = time.process_time()
    for window in windows:
        rows, cols = window.toslices()
        with rasterio.open(path, "r+") as dst:
            dst.write(data[:, rows, cols], window=window)
    seconds = time.process_time() - started
    with rasterio.open(path) as src:
        if not np.array_equal(src.read(), data, equal_nan=True):
            raise AssertionError(f"{codec} did not give back what was written to {path}")
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the scene pair")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (best taken)")
    parser.add_argument("--weights", type=Path, help="a trained quickstart .ckpt")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.repeats = 256, 1

    import rasterio
    import torch

    from changecam.geo import SceneSettings, predict_scene
    from changecam.geo.grid import Grid
    from changecam.geo.synthetic import write_synthetic_scene
    from changecam.geo.windows import block_grid
    from changecam.geo.write import SceneFiles
    from changecam.models.inference import inference_network
    from changecam.models.sliding_window import SlidingWindow

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="changecam-codecs-") as tmp_name:
        tmp = Path(tmp_name)
        if args.weights is None:
            net = fresh_network(tmp / "fresh.pth")
        else:
            from changecam.training.checkpoint import load_network

            net = load_network(args.weights.resolve())
        pre, post = write_synthetic_scene(tmp / "pair", args.size, tile=min(1024, args.size))
        spec = SlidingWindow()
        settings = SceneSettings(explain=True, progress=False, polygons=False, overviews=False)
        net = inference_network(net, torch.device("cpu"))  # as predict.py runs it
        predict_scene(net, pre, post, tmp / "scene", spec, settings)
        files = SceneFiles(tmp / "scene", explain=True)
        blocks = block_grid(args.size, args.size, settings.block_size, spec)
        windows = [block.window for block in blocks]
        rasters = {}
        for what in ("probability", "explanation"):
            with rasterio.open(files.final(what)) as src:
                grid = Grid(src.crs, src.transform, src.width, src.height)
                profile = files.profile(what, grid)
                rasters[what] = (src.read(), profile, predict_codec(what, profile))
        seconds: dict[str, dict[str, list[float]]] = {
            what: {codec: [] for codec in CODECS} for what in rasters
        }
        sizes: dict[str, dict[str, int]] = {what: {} for what in rasters}
        with rasterio.Env(GDAL_NUM_THREADS="1"):
            for round_ in range(args.repeats):
                order = list(CODECS) if round_ % 2 == 0 else list(reversed(CODECS))
                for what, (data, profile, _) in rasters.items():
                    for codec in order:
                        path = tmp / f"{what}_{codec}.tif"
                        seconds[what][codec].append(rewrite(data, profile, windows, path, codec))
                        sizes[what][codec] = os.path.getsize(path)
        megapixels = args.size * args.size / 1e6
        figures: dict[str, Any] = {}
        for what, (data, _, used) in rasters.items():
            best = {codec: min(values) for codec, values in seconds[what].items()}
            figures[what] = {
                "predict_uses": used,
                "dtype": str(data.dtype),
                "bands": int(data.shape[0]),
                "cpu_ms_per_megapixel": {
                    c: round(1000 * s / megapixels, 1) for c, s in best.items()
                },
                "bits_per_pixel": {
                    c: round(8 * n / (megapixels * 1e6), 2) for c, n in sizes[what].items()
                },
                "cpu_vs_predict_uses": {c: round(s / best[used], 3) for c, s in best.items()},
                "size_vs_predict_uses": {
                    c: round(n / sizes[what][used], 3) for c, n in sizes[what].items()
                },
            }
            print(f"{what}: {figures[what]['cpu_ms_per_megapixel']} ms/Mpx", flush=True)
    result = {
        "benchmark": "scene_codecs",
        "machine": machine(),
        "network": network_description(args.weights),
        "size": args.size,
        "blocks": len(blocks),
        "repeats": args.repeats,
        "gdal_threads": 1,
        "rasters": figures,
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit(result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

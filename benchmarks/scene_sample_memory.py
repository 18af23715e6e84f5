"""Does the scaling sample of a 16-bit scene stay within a strip, whatever the scene's size?

A scene whose bands are not uint8 (or that has nodata) is sampled before the first block: a
decimated read of every strip of whole tiles (``geo.scene.checked_sample``, the 2-98 % stretch
of ``input.scale=percentile``). Per side, in a child process (each starts from the same
imports and does nothing else), both dates of a 3-band uint16 pair of that side, tiled 256²
and written beforehand, are sampled under the GDAL block cache ``predict_scene`` sets; printed: the RSS growth over the sampling
(GDAL's cache of decoded tiles included, up to ``GDAL_CACHE_MB``) beside the size of one
decoded date, and the growth at the largest side over that at the smallest
(``growth_ratio``: near 1 when the sample holds one strip, not the date).

Run: ``python benchmarks/scene_sample_memory.py --size 4096 8192 12288`` (a few minutes,
mostly writing the pairs); ``make bench`` runs it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import emit, growth_figures, rss_mib, run_child

TILE = 256


def write_pair(folder: Path, side: int) -> list[Path]:
    """A 3-band uint16 pair of ``side``², tiled, written a band of tile rows at a time."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    profile = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": 3,
        "dtype": "uint16",
        "crs": "EPSG:32650",
        "transform": from_origin(399872, 3510144, 0.5, 0.5),
        "tiled": True,
        "blockxsize": TILE,
        "blockysize": TILE,
    }
    paths = []
    for name, seed in (("pre", 1), ("post", 2)):
        path = folder / f"{name}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            for row in range(0, side, TILE):
                rows = min(TILE, side - row)
                values = np.random.default_rng(seed + row).integers(0, 4000, (3, rows, side))
                dst.write(values.astype(np.uint16), window=((row, row + rows), (0, side)))
        paths.append(path)
    return paths


def child(side: int, pre: Path, post: Path) -> dict[str, Any]:
    """Sample both dates of the pair in this process, which did nothing else before."""
    import rasterio

    from changecam.geo.scene import GDAL_CACHE_BYTES, checked_sample

    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        before = rss_mib()
        for path in (pre, post):
            with rasterio.open(path) as dataset:
                checked_sample(dataset, (1, 2, 3), "percentile", path)
        after = rss_mib()
    return {
        "side": side,
        "date_mib": round(side * side * 3 * 2 / 2**20, 1),
        "rss_before_mib": round(before[0], 1),
        "peak_growth_mib": round(after[1] - max(before), 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[4096, 8192, 12288])
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="256² and 512², for the tests")
    args = parser.parse_args(argv)
    if args.child is not None:
        side, pre, post = args.child
        print(json.dumps(child(int(side), Path(pre), Path(post))), flush=True)
        return {}
    sides = [256, 512] if args.tiny else sorted(args.size)
    runs = []
    for side in sides:
        with tempfile.TemporaryDirectory(prefix="changecam-sample-memory-") as tmp:
            pre, post = write_pair(Path(tmp), side)
            runs.append(run_child(__file__, [str(side), str(pre), str(post)]))
    figures = growth_figures("scene_sample_memory", runs, "peak_growth_mib")
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

"""Does tracing a scene's polygons hold every changed region in memory?

Per side, in a child process (each starts from the same imports and does nothing else), a
synthetic change raster of small blobs (smoothed noise above its 85th percentile: about 5 000
regions per Mpx, evenly spread, few of them large) is handed block by block (256 px) to
:class:`changecam.geo.polygons.RegionTracer`, as the writer thread does, and the features are
written to a GeoJSON file as ``predict_scene`` writes them. Printed: the peak RSS growth after
tracing every block and after writing the file, the number of regions, and the growth at the
largest side over that at the smallest (``growth_ratio``).

Run: ``python benchmarks/polygon_memory.py --size 1024 2048 4096 8192`` (about a minute);
``make bench`` runs it at its defaults.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import emit, growth_figures, rss_mib, run_child

BLOCK = 256


def child(side: int) -> dict[str, Any]:
    """Trace and write the polygons of one ``side``² change raster in this process."""
    import cv2
    import numpy as np
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from changecam.geo.grid import Grid
    from changecam.geo.polygons import RegionTracer, write_geojson
    from changecam.geo.windows import block_grid
    from changecam.models.sliding_window import SlidingWindow

    grid = Grid(CRS.from_epsg(32650), from_origin(399872, 3510144, 0.5, 0.5), side, side)
    with tempfile.TemporaryDirectory(prefix="changecam-polygon-memory-") as tmp:
        before = rss_mib()
        tracer = RegionTracer(grid, Path(tmp))
        for block in block_grid(side, side, BLOCK, SlidingWindow(window=BLOCK)):
            rng = np.random.default_rng(block.index)
            noise = cv2.GaussianBlur(
                rng.random((block.height, block.width)).astype(np.float32), (0, 0), 2
            )
            change = (noise > np.quantile(noise, 0.85)).astype(np.uint8)
            probability = np.full(change.shape, 40000, np.uint16)
            tracer.add_block(block, change, probability, None)
        traced = rss_mib()
        count = write_geojson(Path(tmp) / "change.geojson", tracer.features(), grid)
        tracer.close()
        written = rss_mib()
    return {
        "side": side,
        "regions": count,
        "growth_after_tracing_mib": round(traced[1] - max(before), 1),
        "growth_after_writing_mib": round(written[1] - max(before), 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="256² and 512², for the tests")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)), flush=True)
        return {}
    sides = [256, 512] if args.tiny else sorted(args.size)
    runs = [run_child(__file__, [str(side)]) for side in sides]
    figures = growth_figures("polygon_memory", runs, "growth_after_writing_mib")
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

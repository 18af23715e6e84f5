"""A synthetic georeferenced scene pair, tiled from the generator's scenes (for the scene
benchmark and the overlay figure): EPSG:32650 at 0.5 m, 256 px tiles, DEFLATE, written one
generator scene at a time, so a 16384² pair never sits in memory."""

from __future__ import annotations

from pathlib import Path

import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from changecam.data.synthetic import SyntheticSpec, generate_scene

ORIGIN = (399_872.0, 3_510_144.0)  # UTM zone 50N, near Wuhan
PIXEL = 0.5


def write_synthetic_scene(
    folder: str | Path, size: int, tile: int = 1024, seed: int = 11
) -> tuple[Path, Path]:
    """Write ``folder/pre.tif`` and ``folder/post.tif`` (``size``², RGB uint8) made of
    ``tile``² generator scenes side by side; returns their paths."""
    folder = Path(folder)
    tile = min(tile, size)
    spec = SyntheticSpec(image_size=tile, seed=seed)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32650",
        "transform": from_origin(*ORIGIN, PIXEL, PIXEL),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "pre.tif", folder / "post.tif"
    with (
        rasterio.open(paths[0], "w", **profile) as pre,
        rasterio.open(paths[1], "w", **profile) as post,
    ):
        n = 0
        for row in range(0, size, tile):
            for col in range(0, size, tile):
                scene = generate_scene(spec, "test", n)
                n += 1
                h, w = min(tile, size - row), min(tile, size - col)
                window = Window(col, row, w, h)
                pre.write(scene.pre[:h, :w].transpose(2, 0, 1), window=window)
                post.write(scene.post[:h, :w].transpose(2, 0, 1), window=window)
    return paths


__all__ = ["write_synthetic_scene"]

"""A synthetic georeferenced scene pair (EPSG:32650, 0.5 m/pixel, tiled GeoTIFF), written tile
by tile from the synthetic generator's 256² scenes, so that no scene is ever held whole.

    python -m changecam.geo.synthetic_scene <folder> [--size 8192] [--style levir]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from changecam.data.synthetic import Style, SyntheticSpec, generate_scene

TILE = 256
CRS_EPSG = 32650
ORIGIN = (500_000.0, 3_400_000.0)
PIXEL_M = 0.5


def write_scene_pair(
    folder: str | Path, size: int, style: Style = "levir", distinct: int = 512
) -> tuple[Path, Path, Path]:
    """Write ``pre_<size>.tif``, ``post_<size>.tif`` and ``label_<size>.tif`` into ``folder``.

    Args:
        folder: where the files go (created).
        size: the scene's side in pixels (a multiple of 256).
        style: the generator's style.
        distinct: how many different 256² scenes are tiled (repeated beyond that).
    """
    if size % TILE:
        raise ValueError(f"size={size}: use a multiple of {TILE}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSpec(image_size=TILE, style=style)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "crs": CRS.from_epsg(CRS_EPSG),
        "transform": from_origin(*ORIGIN, PIXEL_M, PIXEL_M),
        "tiled": True,
        "blockxsize": TILE,
        "blockysize": TILE,
        "compress": "deflate",
        "dtype": "uint8",
    }
    paths = tuple(folder / f"{name}_{size}.tif" for name in ("pre", "post", "label"))
    with (
        rasterio.open(paths[0], "w", count=3, **profile) as pre,
        rasterio.open(paths[1], "w", count=3, **profile) as post,
        rasterio.open(paths[2], "w", count=1, **profile) as label,
    ):
        n = 0
        for row in range(0, size, TILE):
            for col in range(0, size, TILE):
                scene = generate_scene(spec, "test", n % distinct)
                n += 1
                window = Window(col, row, TILE, TILE)
                pre.write(scene.pre.transpose(2, 0, 1), window=window)
                post.write(scene.post.transpose(2, 0, 1), window=window)
                label.write(scene.label[None].astype(np.uint8), window=window)
    return paths  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--style", choices=("simple", "levir"), default="levir")
    args = parser.parse_args(argv)
    for path in write_scene_pair(args.folder, args.size, args.style):
        print(path)


if __name__ == "__main__":
    main()

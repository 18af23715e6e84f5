"""Small GeoTIFF scene pairs for the ``test_geo_*`` tests, written with rasterio (EPSG:32650,
0.5 m pixels, a real UTM transform), and a run of predict.py on them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin

from changecam.cli.predict import predict
from changecam.data.synthetic import SyntheticSpec, generate_scene
from helpers import compose_train

CRS = "EPSG:32650"
ORIGIN = (399_872.0, 3_510_144.0)  # near Wuhan, zone 50N
PIXEL = 0.5
TRANSFORM = from_origin(*ORIGIN, PIXEL, PIXEL)
FAST = [
    "device=cpu",
    "sliding_window.window=32",
    "predict.block_size=64",
    "predict.batch_size=8",
    "predict.progress=false",
]


def synthetic_pair(size: int = 128, n: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scene pair (H x W x 3 uint8 each) from the repository's generator."""
    scene = generate_scene(SyntheticSpec(image_size=size), "test", n)
    return scene.pre, scene.post


def write_scene(
    path: Path, image: np.ndarray, transform=TRANSFORM, crs: str | None = CRS, **profile
) -> Path:
    """``image`` (H x W x C, or C x H x W when ``bands_first``) as a tiled GeoTIFF."""
    data = np.asarray(image)
    bands_first = profile.pop("bands_first", False)
    if not bands_first:
        data = data.transpose(2, 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 32,
        "blockysize": 32,
        **profile,
    }
    with rasterio.open(path, "w", **options) as dst:
        dst.write(data)
    return path


def write_pair(folder: Path, size: int = 128, n: int = 0) -> tuple[Path, Path]:
    pre, post = synthetic_pair(size, n)
    return write_scene(folder / "pre.tif", pre), write_scene(folder / "post.tif", post)


def run_scene(tmp_path: Path, ckpt: Path, pre: Path, post: Path, *overrides: str) -> dict[str, Any]:
    """predict.py's task on one scene pair; returns its ``predictions.json``."""
    cfg = compose_train(
        tmp_path,
        [*FAST, f"ckpt_path={ckpt}", f"input.pre={pre}", f"input.post={post}", *overrides],
        "predict",
    )
    report = predict(cfg)
    assert json.loads((tmp_path / "run" / "predictions.json").read_text()) == json.loads(
        json.dumps(report)
    )
    return report


def read_band(path: Path, band: int | None = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band) if band is not None else src.read()

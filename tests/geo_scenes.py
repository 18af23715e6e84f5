"""Small GeoTIFF scene pairs for the ``test_geo_*`` tests, written with rasterio (EPSG:32650,
0.5 m pixels, a real UTM transform), a run of predict.py on them, and a hand-built change
network whose answer follows the images exactly (:class:`DifferenceNet`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from torch import Tensor, nn

from changecam.cli.predict import predict
from changecam.data.synthetic import SyntheticSpec, generate_scene
from changecam.models.protocol import ChangeNetwork
from changecam.models.taps import Tap
from changecam.training.checkpoint import CONFIG_KEY, PREFIX_KEY
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


# post-date roofs (row0, col0, row1, col1) painted over the pre image by :func:`changed_pair`:
# one crosses the 64 px block edges both ways, two are small, all are apart
ROOFS = (
    (10, 12, 30, 50),
    (50, 52, 80, 78),
    (96, 90, 120, 124),
    (6, 100, 12, 108),
    (70, 10, 74, 14),
)
ROOF_COLOUR = (225, 70, 50)


def changed_pair(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The generator's pre image of a ``size``² scene, and the same image with :data:`ROOFS`
    painted on as the post image: the change is known to the pixel."""
    pre = synthetic_pair(size)[0]
    post = pre.copy()
    for r0, c0, r1, c1 in ROOFS:
        post[r0:r1, c0:c1] = ROOF_COLOUR
    return pre, post


def roof_mask(size: int = 128) -> np.ndarray:
    """Where :func:`changed_pair` changed the image."""
    mask = np.zeros((size, size), bool)
    for r0, c0, r1, c1 in ROOFS:
        mask[r0:r1, c0:c1] = True
    return mask


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


def finished_looking(folder: Path) -> list[str]:
    """Files a user could take for outputs (partial files are hidden ``.<name>.part``)."""
    if not folder.exists():
        return []
    return sorted(
        p.name
        for p in folder.rglob("*")
        if p.suffix in (".tif", ".geojson") or p.name.endswith(".json")
    )


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


def garble_first_tile(path: Path, image: int = 1) -> None:
    """Overwrite the bytes of the first tile of one of a TIFF's images (1: the main image, 2:
    the next, e.g. an internal mask) with 0xff, keeping its length: a file damaged inside."""
    name = f"GTIFF_DIR:{image}:{path}" if image > 1 else str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a mask has no geotransform
        with rasterio.open(name) as src:
            offset = int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
            length = int(src.get_tag_item("BLOCK_SIZE_0_0", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * length)


def read_band(path: Path, band: int | None = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band) if band is not None else src.read()


class DifferenceNet(ChangeNetwork):
    """A hand-built change network for the scene tests: the logit of a pixel is
    ``gain * sum_bands |box(post) - box(pre)| - offset`` (``box``: the 3x3 mean, zero-padded),
    so a pixel is change (p > 0.5) exactly where the dates' local means differ by more than
    ``offset / gain`` summed over the bands (0.25 of the [0, 1] range by default), and
    nowhere when the dates are equal. The smoothed images are tapped per date
    (``pre/smooth``, ``post/smooth``) for HiResCAM.
    """

    def __init__(self, in_channels: int = 3, gain: float = 8.0, offset: float = 2.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.smooth = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels)
        self.head = nn.Conv2d(in_channels, 1, 1)
        with torch.no_grad():
            self.smooth.weight.fill_(1 / 9)
            self.smooth.bias.zero_()
            self.head.weight.fill_(gain)
            self.head.bias.fill_(-offset)
        self.taps = nn.ModuleDict({"pre": Tap("pre/smooth"), "post": Tap("post/smooth")})

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        before = self.taps["pre"](self.smooth(pre))
        after = self.taps["post"](self.smooth(post))
        return self.head((after - before).abs())


def difference_checkpoint(path: Path, **kwargs: Any) -> Path:
    """A checkpoint of :class:`DifferenceNet` as changecam writes them (its weights under
    ``net.`` and its config), which predict.py rebuilds in this process."""
    net = DifferenceNet(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            CONFIG_KEY: net.config(),
            PREFIX_KEY: "net.",
        },
        path,
    )
    return path

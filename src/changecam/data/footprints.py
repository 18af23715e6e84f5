"""Building footprints of the ``levir`` synthetic style: rotated rectangles, L-shapes and
compounds, sized like LEVIR-CD's changed buildings at 0.5 m/pixel.

The size and shape parameters were fitted to ``benchmarks/real_stats.json`` (written by
``scripts/real_stats.py`` from the six shared 1024² LEVIR-CD images): changed components have a
median area of about 950 px (10 % below 450, 90 % below 1,360), a median bounding-box aspect of
1.2 and a median bounding-box fill of 0.64, i.e. most are not axis-aligned rectangles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

Shape = Literal["rectangle", "l_shape", "compound"]
SHAPE_P: dict[Shape, float] = {"rectangle": 0.4, "l_shape": 0.35, "compound": 0.25}
# log-normal footprint area in px (median 750: the real components merge touching buildings,
# so single footprints are a little smaller than their median of ~950)
AREA_MEDIAN, AREA_SIGMA, AREA_RANGE = 750.0, 0.45, (220.0, 2600.0)


@dataclass(frozen=True)
class Footprint:
    """A rasterised footprint in its own bounding box.

    Attributes:
        mask: h×w bool, the building.
        ridge: h×w bool, the sunlit half of its roof (split along the long axis).
    """

    mask: np.ndarray
    ridge: np.ndarray


def _outline(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Polygon vertices (N×2, x/y, centred near 0) of an unrotated footprint."""
    area = float(np.clip(AREA_MEDIAN * np.exp(rng.normal(0, AREA_SIGMA)), *AREA_RANGE))
    aspect = 1.0 + abs(rng.normal(0.0, 0.45))
    if shape == "rectangle":
        w = np.sqrt(area * aspect)
        h = area / w
        return np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    if shape == "l_shape":  # a rectangle with one corner notch of 35-60 % per side
        cut_x, cut_y = rng.uniform(0.35, 0.6, size=2)
        w = np.sqrt(area * aspect / (1 - cut_x * cut_y))
        h = w / aspect
        nx, ny = w * (1 - cut_x), h * (1 - cut_y)
        pts = np.array([[0, 0], [w, 0], [w, ny], [nx, ny], [nx, h], [0, h]], dtype=float)
        return pts - pts.mean(axis=0)
    # compound: a main block and a narrower wing across one of its long sides (a T or a step)
    w = np.sqrt(area * 0.7 * aspect)
    h = area * 0.7 / w
    wing_w, wing_h = w * rng.uniform(0.3, 0.5), h * rng.uniform(0.5, 0.9)
    offset = rng.uniform(-0.5, 0.5) * (w - wing_w)
    x0 = offset - wing_w / 2
    return np.array(
        [
            [-w / 2, -h / 2],
            [w / 2, -h / 2],
            [w / 2, h / 2],
            [x0 + wing_w, h / 2],
            [x0 + wing_w, h / 2 + wing_h],
            [x0, h / 2 + wing_h],
            [x0, h / 2],
            [-w / 2, h / 2],
        ]
    )


def footprint(rng: np.random.Generator, angle: float, scale: float = 1.0) -> Footprint:
    """Draw one footprint of a random shape, rotated by ``angle`` radians.

    Args:
        rng: the scene's generator.
        angle: the block's orientation (radians); every building of a block shares it.
        scale: linear scale of the footprint (1.0 at LEVIR-CD's 0.5 m/pixel).
    """
    names = list(SHAPE_P)
    shape = names[int(rng.choice(len(names), p=list(SHAPE_P.values())))]
    pts = _outline(rng, shape) * scale
    long_axis = 0.0 if np.ptp(pts[:, 0]) >= np.ptp(pts[:, 1]) else np.pi / 2
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T
    lo = np.floor(pts.min(axis=0)).astype(int)
    pts = pts - lo
    w, h = (np.ceil(pts.max(axis=0)).astype(int) + 1).tolist()
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 8).astype(np.int32)], 1, shift=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = pts.mean(axis=0)
    across = angle + long_axis + np.pi / 2  # the ridge runs along the long axis
    side = (xx - centre[0]) * np.cos(across) + (yy - centre[1]) * np.sin(across)
    return Footprint(mask.astype(bool), (side < 0) & mask.astype(bool))


def place(
    rng: np.random.Generator, occupied: np.ndarray, shape: Footprint, margin: int, tries: int = 40
) -> tuple[int, int] | None:
    """A top-left corner where ``shape`` (grown by ``margin``) misses ``occupied``; None if none.

    The grown footprint is marked in ``occupied`` when a place is found.
    """
    size_y, size_x = occupied.shape
    h, w = shape.mask.shape
    if h + 2 * margin >= size_y or w + 2 * margin >= size_x:
        return None
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    grown = cv2.dilate(np.pad(shape.mask, margin).astype(np.uint8), kernel).astype(bool)
    for _ in range(tries):
        y = int(rng.integers(0, size_y - h - 2 * margin))
        x = int(rng.integers(0, size_x - w - 2 * margin))
        window = occupied[y : y + h + 2 * margin, x : x + w + 2 * margin]
        if not (window & grown).any():
            window |= grown
            return y + margin, x + margin
    return None

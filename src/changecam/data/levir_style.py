"""The ``levir`` style of the synthetic generator: scenes whose statistics follow LEVIR-CD.

Fitted to ``benchmarks/real_stats.json`` (``scripts/real_stats.py`` on the shared LEVIR-CD
images), where the ``simple`` style (generator version 2) differs most:

* footprints: rotated rectangles, L-shapes and compounds of LEVIR-CD's sizes
  (:mod:`changecam.data.footprints`), aligned per block with the streets, instead of small
  axis-aligned rectangles;
* colours: darker ground (LEVIR-CD A: mean 101/102/85, std 61/52/45), dark tree crowns, lawns,
  asphalt streets, a roof palette of shingle, metal, tile and flat white roofs with texture;
* shadows cast by sun azimuth and building height, the sun moving between the dates;
* change fraction: changed buildings are placed among the unchanged ones, not after them,
  so large images get their share (LEVIR-CD: 6.3 % per shared 1024² image);
* nuisance: stronger illumination and colour change between dates (LEVIR-CD: unchanged pixels
  differ by 45 grey levels on average), season, misregistration, noise;
* ``landcover`` (generator version 4, off by default): unlabelled land-cover change, since
  LEVIR-CD labels buildings only: the plots of new buildings bare in the pre date, graded soil,
  a street built between the dates, woodland, felled trees (:class:`LandCover`). Each part can
  be turned on alone (:data:`LANDCOVER_PARTS`; version 5), for ablations.

Ablations (``shapes="rectangles"``, ``colours="simple"``, ``landcover``) keep the rest of the
style.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from changecam.data.footprints import Footprint, footprint, place
from changecam.data.synthetic import GROUND as SIMPLE_GROUND
from changecam.data.synthetic import LANDCOVER_PARTS, _smooth_noise

ROOFS = np.array(
    [
        [118, 114, 110],  # grey-brown shingle
        [158, 154, 150],  # light shingle
        [212, 212, 208],  # flat white
        [88, 88, 94],  # dark shingle
        [150, 102, 82],  # tile
        [108, 124, 140],  # blue-grey metal
        [176, 160, 134],  # beige
    ],
    dtype=np.float32,
)
# the ablation colours=simple: five of the simple style's six roof colours (as measured)
SIMPLE_ROOFS = np.array(
    [[178, 80, 60], [150, 150, 155], [205, 205, 200], [90, 105, 130], [170, 120, 90]],
    dtype=np.float32,
)
GROUND = np.array([116, 110, 96], dtype=np.float32)
ASPHALT = np.array([78, 80, 84], dtype=np.float32)
CONCRETE = np.array([172, 170, 164], dtype=np.float32)
SOIL = np.array([186, 170, 142], dtype=np.float32)  # bare, graded ground of building sites
LAWN_SEASONS = np.array(
    [[88, 108, 62], [118, 120, 70], [140, 124, 86], [96, 98, 70], [70, 92, 58]], dtype=np.float32
)
TREE_SEASONS = np.array(
    [[38, 58, 34], [52, 66, 38], [80, 70, 48], [60, 62, 46], [30, 48, 30]], dtype=np.float32
)


def _stamp(canvas_mask: np.ndarray, shape: Footprint, yx: tuple[int, int]) -> np.ndarray:
    """The footprint's mask in canvas coordinates."""
    out = np.zeros_like(canvas_mask)
    y, x = yx
    h, w = shape.mask.shape
    out[y : y + h, x : x + w] = shape.mask
    return out


def _shadow(mask: np.ndarray, height: float, azimuth: float) -> np.ndarray:
    """The ground a building of ``mask`` and ``height`` px shades with the sun at ``azimuth``."""
    dy, dx = height * np.sin(azimuth), height * np.cos(azimuth)
    steps = max(2, int(np.ceil(height)) + 1)
    out = np.zeros_like(mask)
    for t in np.linspace(0.0, 1.0, steps):
        m = np.array([[1, 0, dx * t], [0, 1, dy * t]], dtype=np.float32)
        out |= cv2.warpAffine(mask.astype(np.uint8), m, mask.shape[::-1]).astype(bool)
    return out & ~mask


def _roof(rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    """A roof colour (3,)."""
    return palette[int(rng.integers(len(palette)))] * rng.uniform(0.88, 1.12)


def _local_shadow(shade: np.ndarray, mask: np.ndarray, height: float, azimuth: float) -> None:
    """OR the shadow of one building into ``shade``, computed in its padded bounding box."""
    ys, xs = np.nonzero(mask)
    pad = int(np.ceil(height)) + 2
    y0, x0 = max(0, ys.min() - pad), max(0, xs.min() - pad)
    y1, x1 = min(mask.shape[0], ys.max() + pad + 1), min(mask.shape[1], xs.max() + pad + 1)
    shade[y0:y1, x0:x1] |= _shadow(mask[y0:y1, x0:x1], height, azimuth)


def levir_scene(
    rng: np.random.Generator,
    size: int,
    nuisance: bool,
    change_types: Mapping[str, int],
    kind_p: Mapping[str, float],
    shapes: Literal["levir", "rectangles"] = "levir",
    colours: Literal["levir", "simple"] = "levir",
    landcover: Collection[str] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render one pair: (pre RGB uint8, post RGB uint8, label {0,1}, change_type).

    ``landcover``: the :data:`LANDCOVER_PARTS` to add. None renders generator version 3's
    images exactly, and all of them version 4's ``landcover=true``: the land cover's draws
    come from a stream of their own, split off only when a part is on, and every part is drawn
    whether it is on or not.
    """
    area = (size / 256) ** 2
    parts = frozenset(landcover)
    cover = np.random.default_rng(int(rng.integers(2**63))) if parts else None
    ground = GROUND if colours == "levir" else SIMPLE_GROUND
    palette = ROOFS if colours == "levir" else SIMPLE_ROOFS
    texture = _smooth_noise(rng, size, max(4, size // 6)) * 0.6 + _smooth_noise(
        rng, size, max(2, size // 64)
    )
    grain = _smooth_noise(rng, size, max(8, size // 3))
    scene = ground[None, None] * (0.5 + 0.55 * texture[..., None] + 0.3 * grain[..., None])
    roof_texture = 1.0 + (0.18 if colours == "levir" else 0.0) * (grain - 0.5)

    angle = float(rng.uniform(0, np.pi / 2)) if rng.random() < 0.7 else 0.0
    occupied = np.zeros((size, size), dtype=bool)
    road_mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 3 + int(np.sqrt(area))))):
        road_mask |= _road(rng, size, angle)
    surface = CONCRETE if rng.random() < 0.6 else ASPHALT
    scene[road_mask] = surface * rng.uniform(0.9, 1.1) * (0.9 + 0.2 * grain[road_mask][:, None])
    occupied |= road_mask
    new_road = np.zeros_like(road_mask)
    if cover is not None and cover.random() < 0.5:  # a street built between the dates
        drawn = _road(cover, size, angle) & ~road_mask
        if "road" in parts:
            new_road = drawn
            occupied |= new_road

    lawn = _smooth_noise(rng, size, max(2, size // 40)) > rng.uniform(0.45, 0.65)
    n_keep = int(rng.poisson(9 * area))
    n_change = 0 if rng.random() < 0.1 else int(rng.integers(1, max(2, int(7 * area)) + 1))
    kind_names = list(kind_p)
    kinds = ["keep"] * n_keep + list(rng.choice(kind_names, size=n_change, p=list(kind_p.values())))
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]  # changes among the others

    masks: dict[str, list[tuple[np.ndarray, np.ndarray, float, np.ndarray]]] = {
        "pre": [],
        "post": [],
    }
    label = np.zeros((size, size), dtype=bool)
    change_type = np.zeros((size, size), dtype=np.uint8)
    appeared: list[np.ndarray] = []
    for kind in kinds:
        tilt = angle + rng.normal(0, 0.05) if shapes == "levir" else 0.0
        shape = footprint(rng, tilt)
        if shapes == "rectangles":  # the same area as an axis-aligned rectangle
            h, w = shape.mask.shape
            side = np.sqrt(shape.mask.sum() / (h * w))
            rect = np.ones((max(4, int(h * side)), max(4, int(w * side))), dtype=bool)
            ridge = np.zeros_like(rect)
            ridge[: rect.shape[0] // 2] = True
            shape = Footprint(rect, ridge)
        yx = place(rng, occupied, shape, margin=3)
        if yx is None:
            continue
        mask = _stamp(occupied, shape, yx)
        ridge = _stamp(occupied, Footprint(shape.ridge, shape.ridge), yx)
        height = float(rng.uniform(2.0, 6.0))
        entry = (mask, ridge, height, _roof(rng, palette))
        if kind in ("keep", "vanished", "replaced"):
            masks["pre"].append(entry)
        if kind in ("keep", "appeared"):
            masks["post"].append(entry)
        if kind == "replaced":  # a new, smaller building of another roof inside the old one
            kernel = np.ones((5, 5), np.uint8)
            inner = cv2.erode(mask.astype(np.uint8), kernel, iterations=2).astype(bool)
            cut = rng.uniform(0.3, 0.6)
            ys, xs = np.nonzero(inner if inner.any() else mask)
            keep = xs <= xs.min() + (1 - cut) * (xs.max() - xs.min())
            new = np.zeros_like(mask)
            new[ys[keep], xs[keep]] = True
            masks["post"].append((new, new & ridge, height, _roof(rng, palette)))
        if kind != "keep":
            label |= mask
            change_type[mask] = change_types[kind]
        if kind == "appeared":
            appeared.append(mask)

    all_buildings = np.zeros((size, size), dtype=bool)
    for entries in masks.values():
        for mask, *_ in entries:
            all_buildings |= mask
    grown = cv2.dilate(all_buildings.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    lawn &= ~road_mask & ~grown
    trees = np.zeros((size, size), dtype=np.uint8)
    free = ~road_mask & ~grown
    for _ in range(int(rng.poisson(40 * area))):
        y, x = (int(v) for v in rng.integers(0, size, size=2))
        if free[y, x]:
            cv2.circle(trees, (x, y), int(rng.integers(3, 9)), 1, -1)
    tree_mask = trees.astype(bool) & free
    land = (
        _land_cover(cover, size, free, road_mask, appeared, new_road, parts)
        if cover is not None
        else None
    )

    azimuth = float(rng.uniform(0, 2 * np.pi))
    seasons = rng.choice(len(LAWN_SEASONS), size=2, replace=False)
    max_shift = max(1, size // 128)
    shift = (
        int(rng.integers(-max_shift, max_shift + 1)),
        int(rng.integers(-max_shift, max_shift + 1)),
    )
    if not nuisance:
        seasons, shift = (seasons[0], seasons[0]), (0, 0)
    images = []
    for index, date in enumerate(("pre", "post")):
        sun = azimuth + (rng.normal(0, 0.35) if nuisance and date == "post" else 0.0)
        canvas = scene.copy()
        season = seasons[index]
        canvas[lawn] = canvas[lawn] * 0.5 + LAWN_SEASONS[season] * 0.5
        date_trees = tree_mask
        if land is not None:
            date_trees = land.apply(canvas, date, tree_mask, surface, grain)
        shade = _shadow(date_trees, 4.0, sun)
        for mask, _, height, _ in masks[date]:
            _local_shadow(shade, mask, height, sun)
        canvas[shade] *= 0.42
        for mask, ridge, _, colour in masks[date]:
            canvas[mask] = colour * roof_texture[mask][:, None]
            canvas[ridge] *= 1.1
            edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            canvas[edge] *= 0.8
        tree_colour = TREE_SEASONS[season] * (0.8 + 0.4 * texture[date_trees][:, None])
        canvas[date_trees] = tree_colour
        images.append(_acquire(rng, canvas, shift if date == "post" else (0, 0), nuisance))
    label_u8 = np.roll(label.astype(np.uint8), shift, axis=(0, 1))
    change_type = np.roll(change_type, shift, axis=(0, 1))
    return images[0], images[1], label_u8, change_type


def _road(rng: np.random.Generator, size: int, angle: float) -> np.ndarray:
    """One straight street across the scene, along or across the blocks' ``angle``."""
    road = np.zeros((size, size), dtype=np.uint8)
    width = int(rng.integers(10, 19))
    direction = angle + (np.pi / 2 if rng.random() < 0.5 else 0.0)
    cx, cy = rng.uniform(0, size, size=2)
    d = np.array([np.cos(direction), np.sin(direction)]) * size * 2
    p0, p1 = np.array([cx, cy]) - d, np.array([cx, cy]) + d
    cv2.line(road, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, width)
    return road.astype(bool)


@dataclass(frozen=True)
class LandCover:
    """Unlabelled land-cover change of one scene (LEVIR-CD labels buildings only).

    Attributes:
        soil: bare soil per date (construction sites, graded plots, cleared ground); the plots
            of the buildings that appear are bare in the pre date.
        forest: woodland on the free ground, cleared wherever a date has soil.
        new_road: a street only the post date has (the pre date shows it graded or not at all).
        felled: trees only the pre date has.
        soil_colour: (3,) the soil's colour.
    """

    soil: dict[str, np.ndarray]
    forest: np.ndarray
    new_road: np.ndarray
    felled: np.ndarray
    soil_colour: np.ndarray

    def apply(
        self,
        canvas: np.ndarray,
        date: str,
        trees: np.ndarray,
        surface: np.ndarray,
        grain: np.ndarray,
    ) -> np.ndarray:
        """Paint this date's soil and new street into ``canvas``; its tree mask."""
        soil = self.soil[date]
        canvas[soil] = self.soil_colour * (0.8 + 0.4 * grain[soil][:, None])
        trees = (trees | self.forest) & ~soil
        if date == "post":
            road = self.new_road
            canvas[road] = surface * (0.9 + 0.2 * grain[road][:, None])
            trees &= ~self.felled & ~road
        return trees


def _land_cover(
    rng: np.random.Generator,
    size: int,
    free: np.ndarray,
    road: np.ndarray,
    appeared: list[np.ndarray],
    new_road: np.ndarray,
    parts: Collection[str] = LANDCOVER_PARTS,
) -> LandCover:
    """Draw one scene's land-cover change (see :class:`LandCover`): every part is drawn, and
    those not in ``parts`` are left out."""
    forest = np.zeros_like(free)
    if rng.random() < 0.5:
        forest = _smooth_noise(rng, size, max(2, size // 40)) > rng.uniform(0.55, 0.75)
    forest &= free & ~new_road & ("woodland" in parts)
    soil: dict[str, np.ndarray] = {}
    for date, p in (("pre", 0.6), ("post", 0.3)):
        blobs = np.zeros_like(free)
        if rng.random() < p:
            blobs = _smooth_noise(rng, size, max(2, size // 32)) > rng.uniform(0.65, 0.85)
        soil[date] = blobs & free & ("soil" in parts)
    plots = np.zeros(free.shape, np.uint8)
    for mask in appeared:
        if rng.random() < 0.6:
            plots |= mask.astype(np.uint8)
    plots = cv2.dilate(plots, np.ones((13, 13), np.uint8)).astype(bool)
    soil["pre"] |= plots & ~road & ("plots" in parts)
    if rng.random() < 0.5:
        soil["pre"] |= new_road  # the street's course graded before it is paved
    felled = (_smooth_noise(rng, size, max(2, size // 16)) > 0.7) & free & ("felled" in parts)
    colour = SOIL * rng.uniform(0.85, 1.1) * rng.uniform(0.95, 1.05, size=3)
    return LandCover(soil, forest, new_road, felled, colour.astype(np.float32))


def _acquire(
    rng: np.random.Generator, scene: np.ndarray, shift: tuple[int, int], nuisance: bool
) -> np.ndarray:
    """Illumination and colour shift, haze, misregistration and sensor noise of one date."""
    if not nuisance:
        return np.clip(scene, 0, 255).astype(np.uint8)
    image = scene * rng.uniform(0.65, 1.2) * rng.uniform(0.88, 1.12, size=3)
    image = image + rng.uniform(-15, 15, size=3)
    if rng.random() < 0.3:  # haze: a blend towards a bright grey
        image = image * (1 - (h := rng.uniform(0.1, 0.3))) + 170 * h
    image = np.roll(image, shift, axis=(0, 1))
    image += rng.normal(0.0, rng.uniform(2.0, 7.0), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)

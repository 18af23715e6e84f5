"""A deterministic procedural bi-temporal change dataset written in the LEVIR-CD layout.

Each scene has textured ground, vegetation patches, roads and buildings (roofs with cast
shadows) present in both dates. Labelled change: buildings that appear, vanish, or are replaced
by another building (a new roof on part of the old footprint). Unlabelled
nuisance between the dates: global illumination and colour shift, seasonal vegetation colour,
a misregistration of up to ``max(1, size // 128)`` pixels (2 at 256²), and sensor noise -- enough that thresholding
``|post - pre|`` fails while a learned model succeeds.

The output is the official LEVIR-CD layout (``{train,val,test}/{A,B,label}/{split}_{n}.png``),
so the synthetic default runs through the same loading code as the real dataset. Beside
``label/`` the generator writes the known answer of every changed pixel, ``change_type/`` (PNG,
0 = no change, 1 = appeared: its evidence is in the post image, 2 = vanished: in the pre image,
3 = replaced: in both), which the attribution study (:mod:`changecam.evaluation.attribution`)
scores explanations against; every reader of the layout ignores that folder. A
``synthetic_spec.json`` records the specification; generation is skipped when it matches.

Run ``python -m changecam.data.synthetic <root>`` to write a set by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np

from changecam.atomic import atomic_directory, write_text
from changecam.data.io import write_png

log = logging.getLogger(__name__)

SPEC_FILE = "synthetic_spec.json"
# 2: change types (appeared / vanished / replaced) written to change_type/; 45 % vanish
# 3: the ``levir`` style (data/levir_style.py); ``simple`` renders exactly as version 2
# 4: the levir style's ``landcover`` option; off (the default) renders exactly as version 3
# 5: ``landcover`` takes a list of its parts; off and on render exactly as version 4
GENERATOR_VERSION = 5
LARGEST_SIMPLE_SIDE = 512  # above, the simple style's scenes lose their labelled change
# below, more than 80 % of a style's scenes hold no labelled change: its buildings do not fit
# (of seed 0's 72 scenes: levir 72 at 32 px, 67 at 48, 61-62 at 52-55, 60 at 56; simple 71 at
# 20, 64 at 23, 63 at 24)
SMALLEST_LABELLED_SIDE = {"simple": 24, "levir": 56}


def labelled_change_problem(spec: SyntheticSpec) -> str | None:
    """Why a set of ``spec`` cannot train a change detector, or None: from about 640 px a
    side the simple style's unchanged buildings, placed first, fill the image (half the
    scenes hold no labelled change at 640 px, none from 768 px); below
    :data:`SMALLEST_LABELLED_SIDE` hardly a building fits. Asked where the set is trained or
    scored on (the data module); the benchmarks that time loading or memory on large scenes
    draw them anyway."""
    if spec.style == "simple" and spec.image_size > LARGEST_SIMPLE_SIDE:
        return (
            f"data.synthetic.image_size={spec.image_size}: the simple style draws no labelled "
            f"change above {LARGEST_SIMPLE_SIDE} px (its unchanged buildings fill the image); "
            f"use at most {LARGEST_SIMPLE_SIDE}, or data.synthetic.style=levir"
        )
    smallest = SMALLEST_LABELLED_SIDE[spec.style]
    if spec.image_size < smallest:
        return (
            f"data.synthetic.image_size={spec.image_size}: the {spec.style} style draws almost "
            f"no labelled change below {smallest} px (more than 80 % of its scenes hold none: "
            f"its buildings do not fit); use at least {smallest}"
        )
    return None


Style = Literal["simple", "levir"]
CHANGE_TYPE_DIR = "change_type"
ChangeKind = Literal["appeared", "vanished", "replaced"]
# change_type/ pixel values; 0 is no change
CHANGE_TYPES: dict[ChangeKind, int] = {"appeared": 1, "vanished": 2, "replaced": 3}
# how a changed building changes; at least 30 % of the changed objects vanish, so the
# attribution study's vanished-object statistics rest on enough objects
CHANGE_KIND_P: dict[ChangeKind, float] = {"appeared": 0.45, "vanished": 0.45, "replaced": 0.10}
# the parts of the levir style's ``landcover`` (levir_style.LandCover): woodland (unchanged
# but for the season), the plots of new buildings bare in the pre date (labelled buildings on
# soil), bare soil per date, a street built between the dates, felled trees; all but the
# plots are unlabelled change
LandcoverPart = Literal["woodland", "plots", "soil", "road", "felled"]
LANDCOVER_PARTS: tuple[str, ...] = get_args(LandcoverPart)

ROOF_COLOURS = np.array(
    [
        [178, 80, 60],
        [150, 150, 155],
        [205, 205, 200],
        [90, 105, 130],
        [170, 120, 90],
        [120, 60, 50],
    ],
    dtype=np.float32,
)
GROUND = np.array([150, 135, 110], dtype=np.float32)
ROAD = np.array([95, 95, 100], dtype=np.float32)
VEG_SEASONS = np.array(
    [[60, 105, 50], [110, 125, 55], [150, 125, 75], [85, 90, 60], [45, 80, 45]], dtype=np.float32
)


# the smallest image side each style draws (the simple style's buildings of 10 px with their
# margins of 2 and 6 px need 19)
SMALLEST_SIDE = {"simple": 19, "levir": 1}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Args:
        image_size: side of each square image in pixels.
        train: number of training pairs.
        val: number of validation pairs.
        test: number of test pairs.
        seed: base seed; scene ``n`` of a split is fully determined by (seed, split, n).
        nuisance: add the unlabelled nuisance change (turn off only to inspect labels).
        style: ``simple`` (small axis-aligned buildings, generator version 2's images) or
            ``levir`` (footprints, colours, shadows and nuisance fitted to LEVIR-CD statistics;
            :mod:`changecam.data.levir_style`).
        shapes: ``levir`` style only: ``levir`` footprints or, as an ablation, axis-aligned
            ``rectangles`` of the same areas.
        colours: ``levir`` style only: ``levir`` palette or, as an ablation, the ``simple`` one.
        landcover: ``levir`` style only: add land-cover change where ``nuisance`` is on:
            ``True`` for all of it (woodland, the plots of new buildings bare in the pre date,
            bare soil, new streets, felled trees; version 4), or a list of those parts
            (:data:`LANDCOVER_PARTS`, version 5). Off by default,
            which renders version 3's ``levir`` images exactly: all of it lowered the
            synthetic-only F1 on the shared LEVIR-CD images (README "Real imagery").
    """

    image_size: int = 256
    train: int = 48
    val: int = 12
    test: int = 12
    seed: int = 0
    nuisance: bool = True
    style: Style = "simple"
    shapes: Literal["levir", "rectangles"] = "levir"
    colours: Literal["levir", "simple"] = "levir"
    landcover: bool | tuple[str, ...] = False

    def __post_init__(self) -> None:
        if self.landcover is None:  # data.synthetic.landcover=null: off
            object.__setattr__(self, "landcover", False)
        if not isinstance(self.landcover, bool):  # parts (Hydra: a ListConfig, or one name)
            if not isinstance(self.landcover, str | Sequence):
                raise ValueError(
                    f"data.synthetic.landcover={self.landcover!r}: choose parts from "
                    f"{', '.join(LANDCOVER_PARTS)} (or true / false)"
                )
            given = [self.landcover] if isinstance(self.landcover, str) else self.landcover
            parts = tuple(str(p) for p in given)
            unknown = [p for p in parts if p not in LANDCOVER_PARTS]
            if unknown:
                raise ValueError(
                    f"data.synthetic.landcover={list(parts)}: unknown part(s) {unknown}; "
                    f"choose from {', '.join(LANDCOVER_PARTS)} (or true / false)"
                )
            object.__setattr__(self, "landcover", parts)
        for key, allowed in (
            ("style", ("simple", "levir")),
            ("shapes", ("levir", "rectangles")),
            ("colours", ("levir", "simple")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"data.synthetic.{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}"
                )
        if self.style == "simple":  # the options of the levir style: ignored, they misled
            ignored = [
                f"data.synthetic.{key}={value!r}"
                for key, value, default in (
                    ("shapes", self.shapes, "levir"),
                    ("colours", self.colours, "levir"),
                    ("landcover", self.landcover, False),
                )
                if value != default and value != ()
            ]
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)}: only the levir style draws these options, and "
                    "this set's style is simple; add data.synthetic.style=levir"
                )
        smallest = SMALLEST_SIDE[self.style]  # the simple style's buildings need room
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"data.synthetic.image_size={self.image_size!r} must be an integer")
        if self.image_size < smallest:
            raise ValueError(
                f"data.synthetic.image_size={self.image_size} is too small for "
                f"style={self.style}: at least {smallest} px"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.synthetic.seed={self.seed!r} must be a whole number >= 0")
        for split in ("train", "val", "test"):  # 0: a split none is written for
            count = getattr(self, split)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(
                    f"data.synthetic.{split}={count!r} must be a whole number of pairs >= 0"
                )

    @property
    def landcover_parts(self) -> tuple[str, ...]:
        """The land-cover parts on (``landcover=True``: all of them)."""
        if self.landcover is True:
            return LANDCOVER_PARTS
        return () if self.landcover is False else self.landcover


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _rectangles(
    rng: np.random.Generator, size: int, count: int, occupied: np.ndarray
) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` non-overlapping building footprints (y0, x0, y1, x1) off the roads."""
    rects = []
    lo, hi = max(6, size // 24), max(10, size // 8)
    for _ in range(count * 20):
        if len(rects) == count:
            break
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        y, x = int(rng.integers(2, size - h - 6)), int(rng.integers(2, size - w - 6))
        if occupied[y - 2 : y + h + 6, x - 2 : x + w + 6].any():
            continue
        occupied[y - 2 : y + h + 6, x - 2 : x + w + 6] = True
        rects.append((y, x, y + h, x + w))
    return rects


def _draw_building(
    canvas: np.ndarray, rect: tuple[int, int, int, int], roof: np.ndarray, shadow: int
) -> None:
    y0, x0, y1, x1 = rect
    canvas[y0 + shadow : y1 + shadow, x0 + shadow : x1 + shadow] *= (
        0.45  # cast shadow, sun top-left
    )
    canvas[y0:y1, x0:x1] = roof
    ridge = (y0 + y1) // 2
    canvas[y0:ridge, x0:x1] *= 1.12  # sunlit roof half
    canvas[y0:y1, x0 : x0 + 1] *= 0.8
    canvas[y0 : y0 + 1, x0:x1] *= 0.8


def _acquire(
    rng: np.random.Generator,
    scene: np.ndarray,
    veg: np.ndarray,
    veg_colour: np.ndarray,
    shift: tuple[int, int],
    nuisance: bool = True,
) -> np.ndarray:
    """One acquisition: vegetation colour, illumination/colour shift, misregistration, noise."""
    image = scene.copy()
    image[veg] = image[veg] * 0.35 + veg_colour * 0.65 * (image[veg] / GROUND.mean()).clip(0.6, 1.4)
    if not nuisance:
        return np.clip(image, 0, 255).astype(np.uint8)
    gain = rng.uniform(0.75, 1.25)
    image = image * gain * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-20, 20, size=3)
    image = np.roll(image, shift, axis=(0, 1))
    image += rng.normal(0.0, rng.uniform(2.0, 7.0), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticPair:
    """One rendered scene.

    Attributes:
        pre: H×W×3 uint8, first date.
        post: H×W×3 uint8, second date.
        label: H×W uint8 in {0, 1}.
        change_type: H×W uint8, :data:`CHANGE_TYPES` (0 outside the label).
    """

    pre: np.ndarray
    post: np.ndarray
    label: np.ndarray
    change_type: np.ndarray


def generate_pair(
    spec: SyntheticSpec, split: str, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render scene ``n`` of ``split``: (pre RGB, post RGB, label {0,1})."""
    scene = generate_scene(spec, split, n)
    return scene.pre, scene.post, scene.label


def _replacement(
    rng: np.random.Generator, rect: tuple[int, int, int, int]
) -> tuple[int, int, int, int]:
    """The new building on part of an old footprint: one side cut back by 30-60 %."""
    y0, x0, y1, x1 = rect
    cut = rng.uniform(0.3, 0.6)
    side = int(rng.integers(4))
    if side == 0:
        y1 -= int((y1 - y0) * cut)
    elif side == 1:
        y0 += int((y1 - y0) * cut)
    elif side == 2:
        x1 -= int((x1 - x0) * cut)
    else:
        x0 += int((x1 - x0) * cut)
    return y0, x0, y1, x1


def generate_scene(spec: SyntheticSpec, split: str, n: int) -> SyntheticPair:
    """Render scene ``n`` of ``split`` with the known change type of every changed pixel."""
    split_id = ("train", "val", "test").index(split)
    rng = np.random.default_rng([spec.seed, split_id, n])
    size = spec.image_size
    if spec.style == "levir":
        from changecam.data.levir_style import levir_scene  # it builds on this module

        pre, post, label, change_type = levir_scene(
            rng,
            size,
            spec.nuisance,
            CHANGE_TYPES,
            CHANGE_KIND_P,
            spec.shapes,
            spec.colours,
            spec.landcover_parts if spec.nuisance else (),
        )
        return SyntheticPair(pre, post, label, change_type)
    area = (size / 256) ** 2

    texture = _smooth_noise(rng, size, max(4, size // 8)) * 0.6 + _smooth_noise(
        rng, size, max(2, size // 64)
    )
    scene = GROUND[None, None] * (0.75 + 0.35 * texture[..., None])
    veg = _smooth_noise(rng, size, max(2, size // 48)) > rng.uniform(0.5, 0.7)

    occupied = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        width = int(rng.integers(max(4, size // 40), max(6, size // 20) + 1))
        pos = int(rng.integers(0, size - width))
        if rng.random() < 0.5:
            scene[pos : pos + width] = ROAD
            occupied[pos : pos + width] = True
            veg[pos : pos + width] = False
        else:
            scene[:, pos : pos + width] = ROAD
            occupied[:, pos : pos + width] = True
            veg[:, pos : pos + width] = False

    n_keep = int(rng.poisson(10 * area))
    n_change = 0 if rng.random() < 0.1 else int(rng.integers(1, max(2, int(8 * area)) + 1))
    rects = _rectangles(rng, size, n_keep + n_change, occupied)
    roof_ids = rng.integers(0, len(ROOF_COLOURS), size=len(rects))
    roofs = ROOF_COLOURS[roof_ids] * rng.uniform(0.85, 1.15, (len(rects), 1))
    shadow = max(1, size // 128)
    n_kept = min(n_keep, len(rects))
    kind_names = list(CHANGE_KIND_P)
    kinds = ["keep"] * n_kept + list(
        rng.choice(kind_names, size=len(rects) - n_kept, p=list(CHANGE_KIND_P.values()))
    )

    pre_scene, post_scene = scene.copy(), scene.copy()
    label = np.zeros((size, size), dtype=np.uint8)
    change_type = np.zeros((size, size), dtype=np.uint8)
    for rect, roof_id, roof, kind in zip(rects, roof_ids, roofs, kinds, strict=True):
        drawn = {"pre": rect, "post": rect}
        if kind == "appeared":
            del drawn["pre"]
        elif kind == "vanished":
            del drawn["post"]
        elif kind == "replaced":
            drawn["post"] = _replacement(rng, rect)
        roof_of = {"pre": roof, "post": roof}
        if kind == "replaced":  # another roof colour, never the old one
            other = (roof_id + rng.integers(1, len(ROOF_COLOURS))) % len(ROOF_COLOURS)
            roof_of["post"] = ROOF_COLOURS[other] * rng.uniform(0.85, 1.15)
        for date, canvas in (("pre", pre_scene), ("post", post_scene)):
            if date in drawn:
                box = drawn[date]
                _draw_building(canvas, box, roof_of[date], shadow)
                veg[box[0] : box[2] + shadow, box[1] : box[3] + shadow] = False
        if kind != "keep":
            y0, x0, y1, x1 = rect
            label[y0:y1, x0:x1] = 1
            change_type[y0:y1, x0:x1] = CHANGE_TYPES[kind]

    season_pre, season_post = rng.choice(len(VEG_SEASONS), size=2, replace=False)
    max_shift = max(1, size // 128)
    shift = (
        int(rng.integers(-max_shift, max_shift + 1)),
        int(rng.integers(-max_shift, max_shift + 1)),
    )
    if not spec.nuisance:
        season_post, shift = season_pre, (0, 0)
    pre = _acquire(rng, pre_scene, veg, VEG_SEASONS[season_pre], (0, 0), spec.nuisance)
    post = _acquire(rng, post_scene, veg, VEG_SEASONS[season_post], shift, spec.nuisance)
    label = np.roll(label, shift, axis=(0, 1))  # labels are drawn on the post image
    change_type = np.roll(change_type, shift, axis=(0, 1))
    return SyntheticPair(pre, post, label, change_type)


def generate(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the dataset to ``root`` unless it already holds the same specification.

    The set is written to a temporary sibling folder and moved into place at the end, so an
    interrupted run never leaves a half-written dataset behind.

    Processes generating the same set at once (a sweep's jobs, DDP ranks) each write their own
    temporary folder; the first to finish moves it into place and the others take it.

    Raises:
        FileExistsError: ``root`` exists, is not empty and was not written by this generator.
    """
    root = Path(root)
    record = spec_record(spec)
    try:
        return _generate(root, spec, record)
    except FileExistsError:
        if _holds(root, record):  # another process wrote the same set meanwhile
            return root
        raise


def spec_record(spec: SyntheticSpec) -> dict[str, Any]:
    """What a set's :data:`SPEC_FILE` holds for ``spec`` (as JSON reads it back: a tuple of
    land-cover parts becomes a list)."""
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, **asdict(spec)}))


def _canonical(record: dict[str, Any]) -> dict[str, Any]:
    """A set's record as the generator reads it: ``landcover``'s parts as a sorted list, in
    any order given (``true``: every part; ``false`` or ``[]``: none)."""
    landcover = record.get("landcover")
    if landcover is True:
        landcover = list(LANDCOVER_PARTS)
    elif landcover is False or landcover is None:
        landcover = []
    return {**record, "landcover": sorted(set(landcover))} if "landcover" in record else record


def _held_record(root: str | Path) -> dict[str, Any] | None:
    """The record of the synthetic set in ``root`` (its :data:`SPEC_FILE`), or ``None``."""
    try:
        held = json.loads((Path(root) / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def other_settings(root: str | Path, spec: SyntheticSpec) -> list[str]:
    """The settings in which the synthetic set in ``root`` differs from ``spec``
    (``"image_size: 64 (asked: 256)"``; a setting an older generator did not record: ``"style:
    not recorded"``), or ``[]`` when ``root`` holds none of ours or this one."""
    held = _held_record(root)
    if held is None:
        return []
    held, wanted = _canonical(held), _canonical(spec_record(spec))
    return [
        f"{key}: {held[key]!r} (asked: {wanted.get(key)!r})"
        if key in held
        else f"{key}: not recorded (asked: {wanted[key]!r})"
        for key in sorted(set(held) | set(wanted))
        if held.get(key) != wanted.get(key)
    ]


def _holds(root: Path, record: dict[str, Any]) -> bool:
    """Whether ``root`` holds the generator's set of this specification."""
    held = _held_record(root)
    return held is not None and _canonical(held) == _canonical(record)


REPLACED = ".replaced-"  # an older set moved aside to be removed: .<root name>.replaced-<...>


def _remove_replaced(root: Path) -> None:
    """Remove the older sets moved aside beside ``root`` (a run killed while removing one)."""
    for old in root.parent.glob(f".{root.name}{REPLACED}*"):
        shutil.rmtree(old, ignore_errors=True)


def _generate(root: Path, spec: SyntheticSpec, record: dict[str, Any]) -> Path:
    if root.is_symlink():  # a folder elsewhere (another disk): the set is written there
        root = root.resolve()
    _remove_replaced(root)
    spec_path = root / SPEC_FILE
    if spec_path.is_file():
        if _holds(root, record):
            return root
        log.warning(
            "replacing the synthetic set in %s, written with other settings (%s)",
            root,
            "; ".join(other_settings(root, spec)),
        )
        # an older synthetic set of ours: moved aside at once (a kill while it is removed
        # must not leave part of it under root, without its spec), then removed; another
        # process may have moved it already
        aside = root.with_name(f".{root.name}{REPLACED}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(root, aside)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists and holds files not written by the synthetic generator; "
            "choose another data.root for data=synthetic"
        )
    if root.exists():
        try:
            root.rmdir()  # empty (checked above)
        except OSError:  # another process's set landed meanwhile: atomic_directory says so
            pass
    with atomic_directory(root) as tmp:
        for split in ("train", "val", "test"):
            for n in range(getattr(spec, split)):
                scene = generate_scene(spec, split, n)
                name = f"{split}_{n + 1}.png"
                write_png(tmp / split / "A" / name, scene.pre)
                write_png(tmp / split / "B" / name, scene.post)
                write_png(tmp / split / "label" / name, scene.label * 255)
                write_png(tmp / split / CHANGE_TYPE_DIR / name, scene.change_type)
        write_text(tmp / SPEC_FILE, json.dumps(record, indent=2))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    for key, value in asdict(SyntheticSpec()).items():
        if key not in ("nuisance", "landcover"):
            kind = str if isinstance(value, str) else int
            parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=value)
    parser.add_argument(
        "--landcover",
        nargs="*",
        default=None,
        help="levir style: land-cover parts (none listed: all of them)",
    )
    parser.add_argument("--no-nuisance", dest="nuisance", action="store_false")
    args = vars(parser.parse_args(argv))
    root = args.pop("root")
    parts = args.pop("landcover")
    args["landcover"] = False if parts is None else (tuple(parts) if parts else True)
    print(generate(root, SyntheticSpec(**args)))


if __name__ == "__main__":
    main()

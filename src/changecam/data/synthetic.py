"""A deterministic procedural bi-temporal change dataset written in the LEVIR-CD layout.

Each scene has textured ground, vegetation patches, roads and buildings (roofs with cast
shadows) present in both dates. Labelled change: buildings that appear or vanish. Unlabelled
nuisance between the dates: global illumination and colour shift, seasonal vegetation colour,
a misregistration of up to two pixels, and sensor noise -- enough that thresholding
``|post - pre|`` fails while a learned model succeeds.

The output is the official LEVIR-CD layout (``{train,val,test}/{A,B,label}/{split}_{n}.png``),
so the synthetic default runs through the same loading code as the real dataset. A
``synthetic_spec.json`` records the specification; generation is skipped when it matches.

Run ``python -m changecam.data.synthetic <root>`` to write a set by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from changecam.atomic import atomic_directory, write_text
from changecam.data.io import write_png

SPEC_FILE = "synthetic_spec.json"
GENERATOR_VERSION = 1

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
    """

    image_size: int = 256
    train: int = 48
    val: int = 12
    test: int = 12
    seed: int = 0
    nuisance: bool = True


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


def generate_pair(
    spec: SyntheticSpec, split: str, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render scene ``n`` of ``split``: (pre RGB, post RGB, label {0,1})."""
    split_id = ("train", "val", "test").index(split)
    rng = np.random.default_rng([spec.seed, split_id, n])
    size = spec.image_size
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
    roofs = ROOF_COLOURS[rng.integers(0, len(ROOF_COLOURS), size=len(rects))] * rng.uniform(
        0.85, 1.15, (len(rects), 1)
    )
    shadow = max(1, size // 128)
    kinds = ["keep"] * min(n_keep, len(rects)) + [
        "appear" if rng.random() < 0.7 else "vanish"
        for _ in range(len(rects) - min(n_keep, len(rects)))
    ]

    pre_scene, post_scene = scene.copy(), scene.copy()
    label = np.zeros((size, size), dtype=np.uint8)
    for rect, roof, kind in zip(rects, roofs, kinds, strict=True):
        for date, canvas in (("pre", pre_scene), ("post", post_scene)):
            if kind == "keep" or (kind == "appear") == (date == "post"):
                _draw_building(canvas, rect, roof, shadow)
                veg[rect[0] : rect[2] + shadow, rect[1] : rect[3] + shadow] = False
        if kind != "keep":
            y0, x0, y1, x1 = rect
            label[y0:y1, x0:x1] = 1

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
    return pre, post, label


def generate(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the dataset to ``root`` unless it already holds the same specification.

    The set is written to a temporary sibling folder and moved into place at the end, so an
    interrupted run never leaves a half-written dataset behind.

    Raises:
        FileExistsError: ``root`` exists, is not empty and was not written by this generator.
    """
    root = Path(root)
    record = {"generator_version": GENERATOR_VERSION, **asdict(spec)}
    spec_path = root / SPEC_FILE
    if spec_path.is_file():
        if json.loads(spec_path.read_text()) == record:
            return root
        shutil.rmtree(root)  # an older synthetic set of ours: replace it
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists and holds files not written by the synthetic generator; "
            "choose another data.root for data=synthetic"
        )
    if root.exists():
        root.rmdir()  # empty (checked above)
    with atomic_directory(root) as tmp:
        for split in ("train", "val", "test"):
            for n in range(getattr(spec, split)):
                pre, post, label = generate_pair(spec, split, n)
                name = f"{split}_{n + 1}.png"
                write_png(tmp / split / "A" / name, pre)
                write_png(tmp / split / "B" / name, post)
                write_png(tmp / split / "label" / name, label * 255)
        write_text(tmp / SPEC_FILE, json.dumps(record, indent=2))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    for key, value in asdict(SyntheticSpec()).items():
        if key != "nuisance":
            parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--no-nuisance", dest="nuisance", action="store_false")
    args = vars(parser.parse_args(argv))
    root = args.pop("root")
    print(generate(root, SyntheticSpec(**args)))


if __name__ == "__main__":
    main()

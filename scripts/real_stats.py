"""Statistics a change detector learns from, on the shared real LEVIR-CD images and on the
synthetic generator, side by side: ``python scripts/real_stats.py [--out benchmarks/real_stats.json]``.

For every set (the eleven 256² patches, the six 1024² images, and synthetic pairs of both sizes
from :func:`changecam.data.synthetic.generate_pair` with the current generator, in its
``simple`` and its ``levir`` style):

* ``change_fraction``: changed pixels per image (mean, min, median, max, and each image's);
* ``footprints``: connected components (8-connected) of the change labels, i.e. the changed
  buildings: count per megapixel, area in pixels, bounding-box fill (area / box area: 1 for a
  rectangle, lower for L-shapes and compounds), solidity (outline polygon area / its convex
  hull's: 1 for convex shapes), box aspect
  (long / short side), and the fraction of components that are not rectangles (fill < 0.9);
  components under ``MIN_AREA`` pixels (label specks) are left out, those touching the image
  border are counted but their shapes are cut, so ``border_fraction`` says how many;
* ``colour``: per-channel mean and standard deviation of A and B (0-255, RGB order) and their
  16-bin normalised histograms;
* ``nuisance``: mean absolute difference ``|B - A|`` (0-255, over bands) on unchanged pixels,
  and the per-channel difference of the unchanged means (the global colour shift);
* ``bright_new``: pixels that are bright in B (band mean > 170) and differ from A by more than
  50 grey levels (new roofs, but also new streets, concrete and graded soil): their share of
  each image and how many of them are labelled change (per image, and pooled).

The output is numbers only (one JSON file); the last line printed is a short JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from changecam.atomic import write_json
from changecam.data.io import read_image, read_label
from changecam.data.layout import Triplet, pair_folder
from changecam.data.synthetic import GENERATOR_VERSION, SyntheticSpec, generate_pair

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MIN_AREA = 16  # pixels: smaller label components are specks, not buildings
BINS = 16
BRIGHT, BRIGHT_CHANGE = 170, 50  # "bright new" pixels: B band mean above, |B - A| above
Pair = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # name, pre RGB, post RGB, label {0,1}


def real_pairs(root: Path) -> Iterator[Pair]:
    """Every labelled pair of a flat-layout folder (all of ``A/``), in name order."""
    triplets: list[Triplet] = pair_folder(root)
    for t in triplets:
        assert t.label is not None
        yield t.name, read_image(t.pre), read_image(t.post), read_label(t.label)


def synthetic_pairs(spec: SyntheticSpec, count: int) -> Iterator[Pair]:
    """The first ``count`` training scenes of ``spec``, rendered in memory."""
    for n in range(count):
        pre, post, label = generate_pair(spec, "train", n)
        yield f"train_{n}", pre, post, label


def quantiles(values: Iterable[float]) -> dict[str, float | None]:
    """mean and the 10/50/90 % quantiles (``None`` for an empty list)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "p10": None, "p50": None, "p90": None}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {
        "n": int(v.size),
        "mean": round(float(v.mean()), 4),
        "p10": round(float(p10), 4),
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
    }


def components(label: np.ndarray) -> list[dict[str, float]]:
    """Shape numbers of each 8-connected change component of at least ``MIN_AREA`` pixels."""
    count, ids, stats, _ = cv2.connectedComponentsWithStats(label.astype(np.uint8), connectivity=8)
    height, width = label.shape
    found = []
    for i in range(1, count):
        x, y, w, h, area = (int(s) for s in stats[i])
        if area < MIN_AREA:
            continue
        mask = (ids[y : y + h, x : x + w] == i).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.convexHull(np.concatenate(contours))
        # polygon areas through the boundary pixels' centres, both alike (a pixel count would
        # exceed its own hull's polygon area)
        outline = sum(float(cv2.contourArea(c)) for c in contours)
        hull_area = float(cv2.contourArea(hull))
        found.append(
            {
                "area": float(area),
                "fill": area / float(w * h),
                "solidity": outline / hull_area if hull_area > 0 else 1.0,
                "aspect": max(w, h) / min(w, h),
                "border": float(x == 0 or y == 0 or x + w == width or y + h == height),
            }
        )
    return found


def set_statistics(pairs: Iterable[Pair]) -> dict:
    """The statistics of the module docstring for one set of pairs."""
    fractions: dict[str, float] = {}
    shapes: list[dict[str, float]] = []
    pixels = 0
    sums = {d: np.zeros(3) for d in "AB"}
    squares = {d: np.zeros(3) for d in "AB"}
    hists = {d: np.zeros((3, BINS)) for d in "AB"}
    diff_sum, unchanged = 0.0, 0
    bright_new: dict[str, tuple[int, int, int]] = {}  # name: (pixels, bright new, labelled)
    unchanged_mean = {d: np.zeros(3) for d in "AB"}
    for name, pre, post, label in pairs:
        label = (label > 0).astype(np.uint8)
        fractions[name] = float(label.mean())
        shapes += components(label)
        pixels += label.size
        keep = label == 0
        for date, image in (("A", pre), ("B", post)):
            flat = image.reshape(-1, 3).astype(np.float64)
            sums[date] += flat.sum(0)
            squares[date] += (flat**2).sum(0)
            for c in range(3):
                hists[date][c] += np.bincount(
                    image[..., c].ravel() // (256 // BINS), minlength=BINS
                )
            unchanged_mean[date] += image[keep].reshape(-1, 3).astype(np.float64).sum(0)
        diff = np.abs(post.astype(np.int16) - pre.astype(np.int16)).mean(-1)
        diff_sum += float(diff[keep].sum())
        unchanged += int(keep.sum())
        bright = (post.mean(-1) > BRIGHT) & (diff > BRIGHT_CHANGE)
        bright_new[name] = (label.size, int(bright.sum()), int(label[bright].sum()))
    colour = {}
    for date in "AB":
        mean = sums[date] / pixels
        std = np.sqrt(np.maximum(squares[date] / pixels - mean**2, 0))
        colour[date] = {
            "mean": [round(float(m), 2) for m in mean],
            "std": [round(float(s), 2) for s in std],
            "histogram": [[round(float(h), 4) for h in row / row.sum()] for row in hists[date]],
        }
    megapixels = pixels / 1e6
    values = list(fractions.values())
    return {
        "images": len(fractions),
        "pixels": pixels,
        "change_fraction": {
            "mean": round(float(np.mean(values)), 4),
            "min": round(float(np.min(values)), 4),
            "median": round(float(np.median(values)), 4),
            "max": round(float(np.max(values)), 4),
            "per_image": {k: round(v, 4) for k, v in fractions.items()},
        },
        "footprints": {
            "count": len(shapes),
            "per_megapixel": round(len(shapes) / megapixels, 2),
            "border_fraction": round(float(np.mean([s["border"] for s in shapes])), 4)
            if shapes
            else None,
            "not_rectangular_fraction": round(float(np.mean([s["fill"] < 0.9 for s in shapes])), 4)
            if shapes
            else None,
            **{
                key: quantiles(s[key] for s in shapes)
                for key in ("area", "fill", "solidity", "aspect")
            },
        },
        "colour": colour,
        "nuisance": {
            "mean_abs_diff_unchanged": round(diff_sum / max(unchanged, 1), 2),
            "unchanged_mean_shift_B_minus_A": [
                round(
                    float((unchanged_mean["B"][c] - unchanged_mean["A"][c]) / max(unchanged, 1)), 2
                )
                for c in range(3)
            ],
        },
        "bright_new": {
            "fraction": {k: round(b / n, 4) for k, (n, b, _) in bright_new.items()},
            "labelled_change": {
                k: round(c / b, 4) if b else None for k, (_, b, c) in bright_new.items()
            },
            "labelled_change_pooled": round(
                sum(c for *_, c in bright_new.values())
                / max(1, sum(b for _, b, _ in bright_new.values())),
                4,
            ),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "real_stats.json")
    parser.add_argument("--real-256", type=Path, default=SHARED / "levir-cd-256-samples")
    parser.add_argument("--real-1024", type=Path, default=SHARED / "levir-cd-1024-samples")
    parser.add_argument("--synthetic-256", type=int, default=48, help="synthetic 256² pairs")
    parser.add_argument("--synthetic-1024", type=int, default=6, help="synthetic 1024² pairs")
    args = parser.parse_args(argv)
    for flag, count in (
        ("--synthetic-256", args.synthetic_256),
        ("--synthetic-1024", args.synthetic_1024),
    ):
        if count < 1:  # an empty set has no statistics (it failed after the real sets' minutes)
            parser.error(f"{flag} must be at least 1, not {count}")
    sets = {
        "real_256": set_statistics(real_pairs(args.real_256)),
        "real_1024": set_statistics(real_pairs(args.real_1024)),
        "synthetic_256": set_statistics(
            synthetic_pairs(SyntheticSpec(image_size=256), args.synthetic_256)
        ),
        "synthetic_1024": set_statistics(
            synthetic_pairs(SyntheticSpec(image_size=1024), args.synthetic_1024)
        ),
        "synthetic_levir_256": set_statistics(
            synthetic_pairs(SyntheticSpec(image_size=256, style="levir"), args.synthetic_256)
        ),
        "synthetic_levir_landcover_256": set_statistics(
            synthetic_pairs(
                SyntheticSpec(image_size=256, style="levir", landcover=True), args.synthetic_256
            )
        ),
        "synthetic_levir_soil_256": set_statistics(
            synthetic_pairs(
                SyntheticSpec(image_size=256, style="levir", landcover=("soil",)),
                args.synthetic_256,
            )
        ),
        "synthetic_levir_1024": set_statistics(
            synthetic_pairs(SyntheticSpec(image_size=1024, style="levir"), args.synthetic_1024)
        ),
    }
    result = {
        "script": "scripts/real_stats.py",
        "sources": {
            "real_256": str(args.real_256.name),
            "real_1024": str(args.real_1024.name),
            "synthetic": f"changecam.data.synthetic generator version {GENERATOR_VERSION}, "
            "SyntheticSpec defaults (seed 0; synthetic_levir_*: style=levir, i.e. version 3's "
            "levir images; *_landcover_*: landcover=True; *_soil_*: landcover=[soil]), train scenes",
        },
        "min_component_area": MIN_AREA,
        "sets": sets,
    }
    write_json(args.out, result)
    summary = {
        name: {
            "change_fraction_mean": s["change_fraction"]["mean"],
            "footprints_per_mpx": s["footprints"]["per_megapixel"],
            "area_p50": s["footprints"]["area"]["p50"],
            "not_rectangular": s["footprints"]["not_rectangular_fraction"],
            "A_mean": s["colour"]["A"]["mean"],
            "A_std": s["colour"]["A"]["std"],
            "nuisance_abs_diff": s["nuisance"]["mean_abs_diff_unchanged"],
        }
        for name, s in sets.items()
    }
    print(json.dumps({"out": str(args.out), "summary": summary}), file=sys.stdout)


if __name__ == "__main__":
    main()

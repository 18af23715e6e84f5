"""How decisive the study's causal dates are, and where a method disagrees with them.

For one checkpoint and one split (the study's defaults: dilation 3 px, a 96² window), per
labelled object: the two date-swap drops of the causal check, their causal margin
(:func:`changecam.evaluation.attribution.causal_margin`), and

* the share of near-ties (margin under 5 %) and the margin's quartiles;
* the causal check against itself when its free choices change (dilation 2, 4, 5 px; window
  80 and 128 px): how many objects keep their causal date, overall and among near-ties;
* ``--method`` (date-swap occlusion by default, ``--window`` px squares) against the causal
  date: its disagreements, and how many of them are near-ties.

Run: ``python benchmarks/causal_margin.py --ckpt <quickstart best.ckpt>`` (a few minutes on 2
cores; the synthetic data must exist, e.g. from ``python study.py``). Not in ``make bench``:
it needs a trained checkpoint. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import REPO, emit, machine

NEAR_TIE = 0.05


def causal_dates(net, images, dilation: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Per object: the causal date (1 post, 0 pre, 0.5 tie) and its margin."""
    from changecam.evaluation import study
    from changecam.evaluation.attribution import causal_margin, causal_post, swap_regions
    from changecam.explain.targets import target_score

    dates, margins = [], []
    for image in images:
        objects = study.changed_objects(image.label, image.change_type, dilation)
        if not objects:
            continue
        batch = study._make_pass(net, image, objects, context)
        mask = batch.regions[:, None].float()
        with torch.no_grad():
            score = target_score(net(batch.pre, batch.post), mask)
            drops = {}
            for date in ("pre", "post"):
                a, b = swap_regions(batch.pre, batch.post, batch.regions, date)
                drops[date] = score - target_score(net(a, b), mask)
        dates += causal_post(drops["pre"], drops["post"]).tolist()
        margins += causal_margin(drops["pre"], drops["post"]).tolist()
    return np.array(dates), np.array(margins)


def method_dates(net, images, method: str, window: int) -> np.ndarray:
    """Per object: the date with the larger positive mass of ``method``'s input map."""
    from changecam.evaluation import study
    from changecam.evaluation.attribution import attributed_post
    from changecam.explain.occlusion import OcclusionSettings

    settings = study.StudySettings(
        methods=(method,), layers=("input",), occlusion=OcclusionSettings(window=window)
    )
    dates = []
    for image in images:
        objects = study.changed_objects(image.label, image.change_type, settings.dilation)
        if not objects:
            continue
        batch = study._make_pass(net, image, objects, settings.context)
        exp = study._explain(net, batch, settings, torch.Generator().manual_seed(0), "cpu")
        maps = {d: exp.map(f"{d}/input", method, upsampled=True) for d in ("pre", "post")}
        dates += attributed_post(maps["pre"], maps["post"], batch.regions).tolist()
    return np.array(dates)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the model's checkpoint")
    parser.add_argument("--data", type=Path, default=REPO / "data/synthetic")
    parser.add_argument("--split", default="val")
    parser.add_argument("--method", default="occlusion")
    parser.add_argument("--window", type=int, default=32, help="occlusion square side (px)")
    args = parser.parse_args(argv)
    from changecam.cli.study import read_split
    from changecam.training.checkpoint import load_network

    started = time.perf_counter()
    net = load_network(args.ckpt).eval()
    images = read_split(args.data, args.split)
    causal, margin = causal_dates(net, images, 3, 96)
    near = margin < NEAR_TIE
    stability = {}
    for dilation, context in ((2, 96), (4, 96), (5, 96), (3, 80), (3, 128)):
        other, _ = causal_dates(net, images, dilation, context)
        same = 1 - np.abs(causal - other)
        stability[f"dilation {dilation}, window {context}"] = {
            "same_causal_date": round(float(same.mean()), 3),
            "same_among_near_ties": round(float(same[near].mean()), 3) if near.any() else None,
        }
    attributed = method_dates(net, images, args.method, args.window)
    agrees = 1 - np.abs(attributed - causal)
    missed = agrees < 1
    figures = {
        "checkpoint": str(args.ckpt),
        "split": args.split,
        "objects": int(len(causal)),
        "near_tie_share": round(float(near.mean()), 3),
        "margin_quartiles": [round(float(q), 4) for q in np.quantile(margin, [0.25, 0.5, 0.75])],
        "causal_date_stability": stability,
        "method": {
            "name": args.method,
            "window": args.window,
            "causal_agreement": round(float(agrees.mean()), 3),
            "disagreements": int(missed.sum()),
            "disagreements_that_are_near_ties": int((missed & near).sum()),
            "disagreement_margins": sorted(round(float(m), 4) for m in margin[missed]),
            "decisive_objects": int((~near).sum()),
            "agreed_on_decisive": int((agrees[~near] == 1).sum()),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

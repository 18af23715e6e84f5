"""The naive baseline: threshold ``|post - pre|`` (mean over bands), best threshold chosen on val.

It shows what the synthetic nuisance changes are for: illumination, colour, vegetation,
misregistration and noise make raw image differences a poor change detector, so a model has to
learn what a building appearing or vanishing looks like.

Run ``python -m changecam.evaluation.baselines <dataset root>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

import numpy as np

from changecam.data.io import read_image, read_label
from changecam.data.layout import Layout, Split, find_triplets
from changecam.metrics import scores_from_counts

LEVELS = 256


def difference_histograms(root: str | Path, split: Split, layout: Layout = "auto") -> np.ndarray:
    """Counts of ``round(mean_c |post - pre|)`` for unchanged (row 0) and changed (row 1) pixels."""
    hist = np.zeros((2, LEVELS), dtype=np.int64)
    for t in find_triplets(root, split, layout):
        diff = np.abs(
            read_image(t.post).astype(np.int16) - read_image(t.pre).astype(np.int16)
        ).mean(-1)
        level = np.rint(diff).astype(np.int64)
        label = read_label(t.label)
        for c in (0, 1):
            hist[c] += np.bincount(level[label == c], minlength=LEVELS)
    return hist


def f1_per_threshold(hist: np.ndarray) -> np.ndarray:
    """Pooled change-class F1 for predicting change where the difference level is >= t, t = 0..255."""
    above = np.ascontiguousarray(hist[:, ::-1].cumsum(axis=1)[:, ::-1])  # pixels with level >= t
    tp, fp = above[1], above[0]
    fn, tn = hist[1].sum() - tp, hist[0].sum() - fp
    return scores_from_counts(tp, fp, fn, tn)["f1"].numpy()


def naive_baseline(root: str | Path, layout: Layout = "auto") -> dict[str, float]:
    """Best-on-val threshold of ``|post - pre|``: the threshold and its val and test F1."""
    val = f1_per_threshold(difference_histograms(root, "val", layout))
    threshold = int(val.argmax())
    test = f1_per_threshold(difference_histograms(root, "test", layout))
    return {
        "threshold": threshold,
        "val_f1": float(val[threshold]),
        "test_f1": float(test[threshold]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="dataset root (e.g. data/synthetic)")
    parser.add_argument("--layout", default="auto", choices=get_args(Layout))
    args = parser.parse_args(argv)
    print(json.dumps(naive_baseline(args.root, args.layout)))


if __name__ == "__main__":
    main()

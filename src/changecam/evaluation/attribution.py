"""Is a per-date explanation right? Metrics against known answers, per changed object.

The synthetic generator knows, for each changed building, where its evidence is: a building
that **appeared** is visible in the post image only, one that **vanished** in the pre image
only (``change_type/``, :data:`changecam.data.synthetic.CHANGE_TYPES`). An object is a connected
component of the label (8-connected), dilated by a few pixels so that a map of a coarse layer,
whose cells straddle the footprint's edge, is not penalised for its resolution.

For one object, its explanation (target ``S`` = the logits summed inside the dilated object)
and a method's per-date maps ``m_pre``, ``m_post`` (upsampled to the input, signed):

* **attributed date**: the date with the larger positive mass ``Σ ReLU(m_d)`` inside the
  object; a tie (both equal, e.g. both zero) is half right whatever the answer;
* **date accuracy**: the attributed date against the known answer (``post`` for appeared,
  ``pre`` for vanished; replaced objects have evidence in both and are left out);
* **causal date**: the date whose date-swap counterfactual (its pixels inside the object
  replaced by the other date's) changes ``S`` more, ``|ΔS|``; the signed drops are kept. It is
  what the model uses, right or wrong, so agreement with it tests the explanation and not the
  model;
* **causal margin**: how decisive that date is, ``| |ΔS_pre| − |ΔS_post| | / max(|ΔS_pre|,
  |ΔS_post|)``. Both swaps make the pair identical inside the object, so both usually remove
  the change and the margin can be a few percent; the **margin-weighted causal agreement**
  weighs each object's agreement by it (a near-tie decides little);
* **pointing** (energy pointing game): the share of both dates' positive mass that lies inside
  the object;
* **post share**: ``P_post / (P_pre + P_post)`` over the window the object is explained in
  (``study.context``², or the whole image with ``study.context=null``);
* **faithfulness gap**: ``(AUC_random − AUC_map) / |S(0)|`` of the date-swap deletion curves,
  estimated pooled over objects (each weighed by ``|S(0)|``: ``Σ(AUC_random − AUC_map) /
  Σ|S(0)|``).

Accuracies are pooled over objects; their 95 % confidence intervals come from a bootstrap over
images (objects of one image are not independent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from torch import Tensor

ObjectKind = Literal["appeared", "vanished", "replaced", "unknown"]
# the date holding an object's evidence, where there is one
KNOWN_DATE: dict[str, str] = {"appeared": "post", "vanished": "pre"}
_TYPE_NAMES: dict[int, ObjectKind] = {1: "appeared", 2: "vanished", 3: "replaced"}


@dataclass(frozen=True)
class ChangedObject:
    """One labelled changed object of an image.

    Attributes:
        mask: H×W bool, the component itself.
        region: H×W bool, the component dilated by ``dilation`` pixels.
        kind: ``appeared``, ``vanished``, ``replaced`` or ``unknown`` (no change types).
    """

    mask: np.ndarray
    region: np.ndarray
    kind: ObjectKind

    @property
    def known_date(self) -> str | None:
        """``post`` (appeared), ``pre`` (vanished) or ``None``."""
        return KNOWN_DATE.get(self.kind)


def changed_objects(
    label: np.ndarray, change_type: np.ndarray | None = None, dilation: int = 3
) -> list[ChangedObject]:
    """The connected components of ``label`` (8-connected), each with its dilated region and kind.

    Args:
        label: H×W {0, 1} (or 0/255) change mask.
        change_type: H×W change types (0 none, 1 appeared, 2 vanished, 3 replaced); an object
            takes its most frequent non-zero type. ``None``: every object is ``unknown``.
        dilation: pixels added around each object (a (2·d+1)² square), at least 0.

    Raises:
        ValueError: shapes differ or ``dilation`` is negative.
    """
    if dilation < 0:
        raise ValueError(f"dilation={dilation} must be >= 0")
    binary = (np.asarray(label) > 0).astype(np.uint8)
    if change_type is not None and change_type.shape != binary.shape:
        raise ValueError(f"change_type is {change_type.shape} but the label is {binary.shape}")
    count, components = cv2.connectedComponents(binary, connectivity=8)
    kernel = np.ones((2 * dilation + 1, 2 * dilation + 1), np.uint8)
    objects = []
    for c in range(1, count):
        mask = components == c
        kind: ObjectKind = "unknown"
        if change_type is not None:
            types = np.bincount(change_type[mask].astype(np.int64), minlength=4)[1:]
            kind = _TYPE_NAMES.get(int(types.argmax()) + 1, "unknown") if types.any() else "unknown"
        region = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) if dilation else mask
        objects.append(ChangedObject(mask=mask, region=region, kind=kind))
    return objects


def positive_mass_in(maps: Tensor, regions: Tensor) -> Tensor:
    """``Σ ReLU(map)`` inside each region: maps B×H×W, regions B×H×W bool -> B."""
    return (maps.clamp(min=0) * regions.to(maps.dtype)).flatten(1).sum(1)


def attributed_post(pre_maps: Tensor, post_maps: Tensor, regions: Tensor) -> Tensor:
    """Per object: 1 where the post date has the larger positive mass in its region, 0 where the
    pre date has, 0.5 for a tie (B, float)."""
    pre = positive_mass_in(pre_maps, regions)
    post = positive_mass_in(post_maps, regions)
    return torch.where(post > pre, 1.0, torch.where(post < pre, 0.0, 0.5))


def causal_post(drop_pre: Tensor, drop_post: Tensor) -> Tensor:
    """Per object: 1 where swapping the post date's pixels changes ``S`` more (``|ΔS|``), 0 where
    the pre date's does, 0.5 for a tie (B, float)."""
    pre, post = drop_pre.abs(), drop_post.abs()
    return torch.where(post > pre, 1.0, torch.where(post < pre, 0.0, 0.5))


def causal_margin(drop_pre: Tensor, drop_post: Tensor) -> Tensor:
    """Per object: how decisive its causal date is, ``| |ΔS_pre| − |ΔS_post| | / max(|ΔS_pre|,
    |ΔS_post|)`` in [0, 1] (0: both swaps move ``S`` equally, or neither moves it; 1: only one
    does) (B, float)."""
    pre, post = drop_pre.abs(), drop_post.abs()
    larger = torch.maximum(pre, post)
    return torch.where(larger > 0, (pre - post).abs() / larger.clamp(min=1e-30), 0.0)


def agreement(post_a: Tensor, post_b: Tensor) -> Tensor:
    """How far two date decisions (1 post, 0 pre, 0.5 undecided) agree, per object: 1 or 0
    where both decide, 0.5 where either is undecided (half right whatever the other says: a map
    that names no date is not right about a model that uses neither)."""
    undecided = (post_a == 0.5) | (post_b == 0.5)
    return torch.where(undecided, 0.5, 1.0 - (post_a - post_b).abs())


def pointing(pre_maps: Tensor, post_maps: Tensor, regions: Tensor) -> Tensor:
    """Share of both dates' positive mass inside each region (B; NaN where there is none)."""
    inside = positive_mass_in(pre_maps, regions) + positive_mass_in(post_maps, regions)
    total = pre_maps.clamp(min=0).flatten(1).sum(1) + post_maps.clamp(min=0).flatten(1).sum(1)
    return torch.where(
        total > 0, inside / total.clamp(min=torch.finfo(total.dtype).tiny), torch.nan
    )


def swap_regions(
    pre: Tensor, post: Tensor, regions: Tensor, date: Literal["pre", "post"]
) -> tuple[Tensor, Tensor]:
    """The date-swap counterfactual: ``date``'s pixels inside each region take the other date's.

    Args:
        pre: B×C×H×W; post: the same shape; regions: B×H×W bool.
    """
    inside = regions[:, None].to(torch.bool)
    if date == "pre":
        return torch.where(inside, post, pre), post
    return pre, torch.where(inside, pre, post)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (B×N -> B).

    Ties get their average rank; a constant row gives NaN (no ranking to compare).
    """
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    denom = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(denom > 0, (ra * rb).sum(1) / denom.clamp(min=1e-300), torch.nan).float()


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..N along dim 1, ties sharing their mean rank."""
    out = torch.empty_like(x)
    for i, row in enumerate(x):
        values, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).double()
        out[i] = (ends - (counts.double() - 1) / 2)[inverse]
    return out


@dataclass(frozen=True)
class Estimate:
    """A pooled mean with its 95 % bootstrap interval over images (``n``: the values pooled)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n}


def bootstrap(
    per_image: Sequence[Sequence[float]],
    resamples: int = 1000,
    seed: int = 0,
    weights: Sequence[Sequence[float]] | None = None,
) -> Estimate:
    """The mean of every value pooled, and its 95 % percentile interval when the images (lists
    of per-object values) are resampled with replacement. NaN values are left out.

    With ``weights`` (one per value, same layout) the mean is weighted, ``Σ w·v / Σ w``, and
    resampled the same way; images whose weights sum to 0 count as having no value.
    """
    if weights is None:
        weights = [[1.0] * len(vals) for vals in per_image]
    pairs = [
        [(v, w) for v, w in zip(vals, ws, strict=True) if not np.isnan(v)]
        for vals, ws in zip(per_image, weights, strict=True)
    ]
    groups = [np.asarray(p, float).reshape(-1, 2) for p in pairs]
    groups = [g for g in groups if len(g) and g[:, 1].sum() > 0]
    n = int(sum(len(g) for g in groups))
    if not n:
        return Estimate(None, None, None, 0)
    pooled = np.concatenate(groups)
    mean = float((pooled[:, 0] * pooled[:, 1]).sum() / pooled[:, 1].sum())
    sums = np.array([(g[:, 0] * g[:, 1]).sum() for g in groups])
    counts = np.array([g[:, 1].sum() for g in groups])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(mean, float(low), float(high), n)


__all__ = [
    "KNOWN_DATE",
    "ChangedObject",
    "Estimate",
    "ObjectKind",
    "agreement",
    "attributed_post",
    "bootstrap",
    "causal_margin",
    "causal_post",
    "changed_objects",
    "pointing",
    "positive_mass_in",
    "spearman",
    "swap_regions",
]

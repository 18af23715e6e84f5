"""Date-swap occlusion per date at the input, through captum.

For the target score ``S`` (the explanation's fixed mask, see :mod:`changecam.explain.targets`)
a ``window``² square of one date slides over the image in steps of ``stride``; at each position
the square is replaced by the *other date's* pixels there (captum's ``Occlusion`` with the other
date as its baseline, one date at a time, the other date untouched), and the drop
``S − S(square swapped)`` is credited to every pixel of the square. Each pixel's value is the
mean drop over the squares that cover it, in logit units. Positive: making that place look like
the other date lowers ``S``. Squares start at multiples of ``stride``; where ``H − window`` (or
``W − window``) is no multiple of it, the last square of a row (column) is cut by the image's
edge (captum's placement), smaller than ``window``² (not with the defaults on 256² pairs or the
study's 96² windows).

It is the date-swap counterfactual of the faithfulness curves and of the study's causal check
(:mod:`changecam.evaluation.attribution`), applied square by square without knowing where the
objects are. It needs no gradient, so it explains any network, but it costs one forward of the
batch per square and date: ``2 × ⌈(H − window) / stride + 1⌉ × ⌈(W − window) / stride + 1⌉``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from changecam.explain.targets import target_score


@dataclass(frozen=True)
class OcclusionSettings:
    """Date-swap occlusion (the ``explain.occlusion`` block; used when ``explain.methods`` lists
    ``occlusion``).

    Args:
        window: side of the swapped square in pixels.
        stride: step between squares (``window`` or less, so that every pixel is covered).
        perturbations_per_eval: squares evaluated in one forward (captum's
            ``perturbations_per_eval``; memory grows with it).
    """

    window: int = 16
    stride: int = 8
    perturbations_per_eval: int = 8

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"explain.occlusion.window={self.window} must be >= 1")
        if not 1 <= self.stride <= self.window:
            raise ValueError(
                f"explain.occlusion.stride={self.stride} must be between 1 and the window "
                f"({self.window}), so that every pixel is covered"
            )
        if self.perturbations_per_eval < 1:
            raise ValueError(
                f"explain.occlusion.perturbations_per_eval={self.perturbations_per_eval} "
                "must be >= 1"
            )


def date_swap_occlusion(
    model: nn.Module, pre: Tensor, post: Tensor, mask: Tensor, settings: OcclusionSettings
) -> tuple[Tensor, Tensor]:
    """Date-swap occlusion maps of ``S = Σ mask ⊙ model(pre, post)`` for both dates.

    Runs ``model`` as it is (the caller sets eval mode); no gradient is taken.

    Args:
        model: ``model(pre, post) -> logits``.
        pre: B×C×H×W first-date images.
        post: second-date images of the same shape.
        mask: the fixed B×1×H×W target mask (from the unperturbed forward).
        settings: square size, stride and batching.

    Returns:
        ``(pre map, post map)``, B×H×W float32 each: the mean drop of ``S`` over the squares
        covering each pixel when that date's square is swapped for the other date's.
    """
    from captum.attr import Occlusion  # imported where used: captum is slow to import

    x_pre, x_post = pre.detach().clone(), post.detach().clone()
    channels = x_pre.shape[1]
    side = min(settings.window, *x_pre.shape[-2:])
    stride = min(settings.stride, side)
    shape, strides = (channels, side, side), (channels, stride, stride)

    def pre_swapped(a: Tensor, b: Tensor, m: Tensor) -> Tensor:
        return target_score(model(a, b), m)

    def post_swapped(b: Tensor, a: Tensor, m: Tensor) -> Tensor:
        return target_score(model(a, b), m)

    # one date per call: captum 0.9 builds a CPU filler mask when one evaluation mixes squares
    # of two inputs (in its occlusion.py), which fails on CUDA
    maps = []
    with torch.no_grad():
        for forward, x, other in ((pre_swapped, x_pre, x_post), (post_swapped, x_post, x_pre)):
            maps.append(
                Occlusion(forward).attribute(
                    x,
                    sliding_window_shapes=shape,
                    strides=strides,
                    baselines=other,
                    additional_forward_args=(other, mask.float()),
                    perturbations_per_eval=settings.perturbations_per_eval,
                )
            )
    a_pre, a_post = maps
    # every band of a square is swapped together, so the bands hold the same value
    return a_pre.mean(1).float(), a_post.mean(1).float()


__all__ = ["OcclusionSettings", "date_swap_occlusion"]

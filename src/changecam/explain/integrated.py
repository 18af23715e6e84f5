"""Integrated Gradients per date at the input, through captum.

For the target score ``S`` (the explanation's fixed mask ``M``, see
:mod:`changecam.explain.targets`) and a baseline pair ``(b_pre, b_post)``, captum's
``IntegratedGradients`` integrates ``∂S/∂x`` along the straight path from the baseline pair to
``(pre, post)``, both dates at once, and multiplies by ``x − b``. Summed over the bands, that
gives one signed H×W map per date (``pre/input``, ``post/input``) in logit contribution per
pixel, and the maps of both dates together sum to ``S(pre, post) − S(baseline)`` up to the
quadrature error (captum's convergence delta, kept in ``Explanation.ig``).

Baselines (``explain.ig.baseline``):

* ``midpoint`` (default): both dates replaced by their mean ``(pre + post) / 2`` — an unchanged
  pair halfway between the dates, so the maps split ``S(pre, post) − S(no change)`` between
  the dates. It is the middle of the ``other_date`` path.
* ``other_date``: the pre image's baseline is the post image and vice versa — the path from the
  swapped pair. For a model that is symmetric in the dates (e.g. a Siamese U-Net fused by
  ``|pre − post|``) ``S(baseline) = S``, so the total is zero, but the maps need not be: the path's
  second half is the first one with the dates swapped, so the post map is exactly minus the pre
  map, pixel by pixel (both zero where it compares the raw pixels first); a post share there
  says nothing about the dates.
* ``blur``: a Gaussian-blurred copy of each date (``blur_sigma`` pixels) — detail removed,
  layout kept, independent of the other date.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from changecam.explain.targets import target_score

Baseline = Literal["midpoint", "other_date", "blur"]
BASELINES: tuple[Baseline, ...] = get_args(Baseline)


@dataclass(frozen=True)
class IntegratedGradientsSettings:
    """Integrated Gradients (the ``explain.ig`` block; used when ``explain.methods`` lists
    ``integrated_gradients``).

    Args:
        steps: points of the path integral (captum's ``n_steps``, Gauss-Legendre); each is one
            forward and one backward of the batch.
        baseline: ``midpoint``, ``other_date`` or ``blur`` (see the module docs).
        blur_sigma: standard deviation in pixels of the ``blur`` baseline.
        internal_batch_size: at most this many pairs per forward (captum's
            ``internal_batch_size``; at least the batch); ``None``: all steps in one forward.
    """

    steps: int = 32
    baseline: Baseline = "midpoint"
    blur_sigma: float = 4.0
    internal_batch_size: int | None = 16

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"explain.ig.steps={self.steps} must be >= 1")
        if self.baseline not in BASELINES:
            raise ValueError(
                f"explain.ig.baseline={self.baseline!r} is not allowed; expected one of "
                f"{', '.join(BASELINES)}"
            )
        if self.blur_sigma <= 0:
            raise ValueError(f"explain.ig.blur_sigma={self.blur_sigma} must be > 0")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise ValueError(
                f"explain.ig.internal_batch_size={self.internal_batch_size} must be >= 1 or null"
            )


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """``x`` (B×C×H×W) blurred per band by a separable Gaussian (edge-replicated borders)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), rows, groups=c)
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="replicate"), rows.transpose(2, 3), groups=c
    )


def baselines(
    pre: Tensor, post: Tensor, settings: IntegratedGradientsSettings
) -> tuple[Tensor, Tensor]:
    """The baseline pair of ``settings.baseline``."""
    if settings.baseline == "other_date":
        return post, pre
    if settings.baseline == "midpoint":
        mean = (pre + post) / 2
        return mean, mean
    return gaussian_blur(pre, settings.blur_sigma), gaussian_blur(post, settings.blur_sigma)


def integrated_gradients(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    mask: Tensor,
    score: Tensor,
    settings: IntegratedGradientsSettings,
) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
    """Integrated Gradients of ``S = Σ mask ⊙ model(pre, post)`` for both dates at once.

    Runs ``model`` as it is (the caller sets eval mode and enables gradients).

    Args:
        model: ``model(pre, post) -> logits``.
        pre: B×C×H×W first-date images.
        post: second-date images of the same shape.
        mask: the fixed B×1×H×W target mask (from the unperturbed forward).
        score: ``S`` of the unperturbed pair (B), for ``S(baseline)``.
        settings: steps, baseline, batching.

    Returns:
        ``(pre map, post map)``, B×H×W float32 each (attributions summed over the bands), and
        ``{"baseline_score": S(baseline), "delta": convergence delta}`` (B each).
    """
    from captum.attr import IntegratedGradients  # imported where used: captum is slow to import

    x_pre, x_post = pre.detach().clone(), post.detach().clone()
    b_pre, b_post = baselines(x_pre, x_post, settings)

    def forward(a: Tensor, b: Tensor, m: Tensor) -> Tensor:
        # the zero terms keep both dates in the graph: captum refuses an input the model does
        # not use (e.g. a detector that only looks at the post image), whose attribution is 0
        unused = (a * 0).flatten(1).sum(1) + (b * 0).flatten(1).sum(1)
        return target_score(model(a, b), m) + unused

    batch = settings.internal_batch_size
    (a_pre, a_post), delta = IntegratedGradients(forward).attribute(
        (x_pre, x_post),
        baselines=(b_pre, b_post),
        additional_forward_args=(mask.float(),),
        n_steps=settings.steps,
        internal_batch_size=None if batch is None else max(batch, len(pre)),
        return_convergence_delta=True,
    )
    maps = (a_pre.detach().float().sum(1), a_post.detach().float().sum(1))
    delta = delta.detach().float()
    total = maps[0].flatten(1).sum(1) + maps[1].flatten(1).sum(1)
    # delta = Σ attributions − (S − S(baseline)), so S(baseline) needs no extra forward
    return maps, {"baseline_score": score.float() - total + delta, "delta": delta}


__all__ = [
    "BASELINES",
    "Baseline",
    "IntegratedGradientsSettings",
    "baselines",
    "gaussian_blur",
    "integrated_gradients",
]

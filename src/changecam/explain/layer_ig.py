"""Layer Integrated Gradients from the other date, at every per-date layer.

For a per-date layer with activations ``A_pre`` and ``A_post`` (both C×h×w) and the target score
``S`` (the explanation's fixed mask), the post map is

    ``LIG_post = Σ_c (A_post − A_pre)_c ⊙ ∫₀¹ ∂S/∂A_post (A_pre + α (A_post − A_pre)) dα``

with the pre activation kept as it is: the post activation is moved from the pre date's value
to its own, through the rest of the network. The pre map is the mirror. Completeness makes it
the reference of the date-swap at that layer: the post map sums to
``S − S(post activation := A_pre)`` up to the quadrature error (``delta``), the drop in ``S``
when the post date looks like the pre date at that layer. Date-contrastive HiResCAM,
``Σ_c ∂S/∂A_post ⊙ (A_post − A_pre)``, is its one-point (α = 1) approximation.

At the ``input`` layer the activations are the images: the post image is moved from the pre
image to itself (Integrated Gradients with the other date as baseline, one date at a time).

The path is integrated with captum's quadrature (Gauss-Legendre by default, as captum's
``LayerIntegratedGradients``); each step is one forward and one backward of the batch, per date
and layer, so the cost is ``2 × layers × steps`` passes. The interpolated activation replaces the
tap's output through a forward hook, so any network with :class:`~changecam.models.taps.Tap`
modules works, shared encoder or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from changecam.explain.targets import target_score
from changecam.models.taps import Tap


@dataclass(frozen=True)
class LayerIGSettings:
    """Layer Integrated Gradients (the ``explain.layer_ig`` block; used when ``explain.methods``
    lists ``layer_ig``).

    Args:
        steps: points of the path integral (Gauss-Legendre); each is one forward and one
            backward per date and layer.
        internal_batch_size: at most this many pairs per forward (``None``: all steps at once).
    """

    steps: int = 8
    internal_batch_size: int | None = 32

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"explain.layer_ig.steps={self.steps} must be >= 1")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise ValueError(
                f"explain.layer_ig.internal_batch_size={self.internal_batch_size} must be >= 1 "
                "or null"
            )


def path_points(steps: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)`` of captum's Gauss-Legendre rule on [0, 1]."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    return list(alphas(steps)), list(step_sizes(steps))


def layer_integrated_gradients(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    mask: Tensor,
    score: Tensor,
    taps: dict[str, Tap | None],
    activations: dict[str, Tensor],
    layers: Sequence[str],
    settings: LayerIGSettings,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Layer IG maps of both dates at each of ``layers`` (runs ``model`` as it is; the caller
    sets eval mode and enables gradients).

    Args:
        model: ``model(pre, post) -> logits``.
        pre: B×C×H×W first-date images.
        post: second-date images.
        mask: the fixed B×1×H×W target mask.
        score: ``S`` of the unperturbed pair (B).
        taps: tap name -> module (``None`` for the input taps).
        activations: the recorded activation of every tap of ``layers`` (both dates).
        layers: per-date layers (``input``, ``enc3`` ...).
        settings: steps and batching.

    Returns:
        ``maps[tap]`` (B×h×w float32) and ``delta[tap]``: ``Σ map − (S − S(swapped))`` (B), the
        quadrature error against the layer's date-swap.
    """
    alphas, weights = path_points(settings.steps)
    b = len(pre)
    per_pass = max(1, (settings.internal_batch_size or b * len(alphas)) // b)
    maps: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    for layer in layers:
        for date, other in (("pre", "post"), ("post", "pre")):
            tap = f"{date}/{layer}"
            own = activations[tap].detach()
            base = activations[f"{other}/{layer}"].detach()
            grad_sum = torch.zeros_like(own, dtype=torch.float32)
            for start in range(0, len(alphas), per_pass):
                chunk = list(range(start, min(start + per_pass, len(alphas))))
                grads = _path_gradients(
                    model, pre, post, mask, taps[tap], date, base, own, [alphas[i] for i in chunk]
                )
                for j, i in enumerate(chunk):
                    grad_sum += weights[i] * grads[j]
            maps[tap] = ((own - base).float() * grad_sum).sum(1)
            swapped = _swapped_score(model, pre, post, mask, taps[tap], date, base)
            deltas[tap] = maps[tap].flatten(1).sum(1) - (score.detach().float() - swapped)
    return maps, deltas


def _run_with(
    model: nn.Module, pre: Tensor, post: Tensor, tap: Tap | None, date: str, value: Tensor
) -> Tensor:
    """``model`` with the tap's output (or the date's input) replaced by ``value`` (n·B first)."""
    repeats = len(value) // len(pre)
    x_pre, x_post = pre.repeat(repeats, 1, 1, 1), post.repeat(repeats, 1, 1, 1)
    if tap is None:
        return model(value, x_post) if date == "pre" else model(x_pre, value)
    handle = tap.register_forward_hook(lambda module, inputs, output: value)
    try:
        return model(x_pre, x_post)
    finally:
        handle.remove()


def _path_gradients(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    mask: Tensor,
    tap: Tap | None,
    date: str,
    base: Tensor,
    own: Tensor,
    alphas: Sequence[float],
) -> list[Tensor]:
    """``∂S/∂A`` at ``base + α (own − base)`` for each α (B×C×h×w each), in one pass."""
    b = len(pre)
    points = torch.cat([base + a * (own - base) for a in alphas]).requires_grad_(True)
    logits = _run_with(model, pre, post, tap, date, points)
    score = target_score(logits, mask.repeat(len(alphas), 1, 1, 1))
    (grad,) = torch.autograd.grad(score.sum(), points, allow_unused=True)
    if grad is None:  # the score does not depend on this date's activation
        grad = torch.zeros_like(points)
    return [g.float() for g in grad.detach().split(b)]


def _swapped_score(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    mask: Tensor,
    tap: Tap | None,
    date: str,
    base: Tensor,
) -> Tensor:
    """``S`` with the date's activation at the tap replaced by the other date's (B)."""
    with torch.no_grad():
        return target_score(_run_with(model, pre, post, tap, date, base), mask).float()


__all__ = ["LayerIGSettings", "layer_integrated_gradients", "path_points"]

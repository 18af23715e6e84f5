"""The model-parameter randomisation sanity check (Adebayo et al., NeurIPS 2018), cascading.

The network's learnable layers (convolutions, transposed convolutions, linear and attention
layers; the norm layers and free parameters such as BiT's positional embedding keep their
trained values) are ordered by when they first run in a forward pass and
re-initialised from the head down: step ``k`` re-initialises the last ``k`` of them, each with
its own ``reset_parameters`` and a seed of its own, so the cascade is reproducible. An
explanation method that explains the model gives maps that decorrelate from the trained
model's maps as the cascade goes down; a method whose maps barely change is showing the input
(or the architecture), not what the model learned.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from changecam.explain.hirescam import preserved_state

RANDOMISED_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Conv1d, nn.MultiheadAttention)


def cascade_order(model: nn.Module, pre: Tensor, post: Tensor) -> list[str]:
    """The learnable layers of ``model`` from the head down (reverse order of first call).

    Args:
        model: ``model(pre, post) -> logits``.
        pre: a small first-date batch to trace the order (one forward, no gradients).
        post: the second-date batch.

    Raises:
        ValueError: the model has no layer the check can re-initialise.
    """
    first_call: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, RANDOMISED_TYPES):

            def hook(m: nn.Module, i: tuple, o: object, name: str = name) -> None:
                first_call.setdefault(name, len(first_call))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), preserved_state(model):  # a trace: BatchNorm statistics stay
            model(pre, post)
    finally:
        for handle in handles:
            handle.remove()
    if not first_call:
        raise ValueError(
            f"{type(model).__name__} has no convolution or linear layer that ran: nothing to "
            "re-initialise for the randomisation check"
        )
    return sorted(first_call, key=first_call.get, reverse=True)


def randomised(model: nn.Module, layers: Sequence[str], count: int, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the first ``count`` of ``layers`` (head first) re-initialised.

    Each layer gets the seed ``seed + its position in layers``, so step ``k + 1`` keeps the
    re-initialised weights of step ``k`` (a true cascade). The caller's global random state is
    left as it was.
    """
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    with torch.random.fork_rng(devices=[]):
        for position, name in enumerate(layers[:count]):
            module = modules[name]
            torch.manual_seed(seed + position)
            if isinstance(module, nn.MultiheadAttention):
                # its _reset_parameters leaves out_proj's weight (a Linear it never calls)
                module.out_proj.reset_parameters()
                module._reset_parameters()
            else:
                module.reset_parameters()
    return copied


def cascade_points(total: int, points: int) -> list[int]:
    """``points`` steps of the cascade, evenly spread from 1 layer to all ``total`` (distinct)."""
    if total < 1 or points < 1:
        raise ValueError(f"total={total} and points={points} must be >= 1")
    if points >= total:
        return list(range(1, total + 1))
    return sorted(
        {round(1 + i * (total - 1) / (points - 1)) for i in range(points)}
        if points > 1
        else {total}
    )


__all__ = ["RANDOMISED_TYPES", "cascade_order", "cascade_points", "randomised"]

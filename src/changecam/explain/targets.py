"""What an explanation explains: the target score ``S = Σ M ⊙ logits`` of each sample.

``M`` is a fixed (detached) B×1×H×W mask chosen by a :class:`Target`:

* ``predicted`` (default): the predicted change, ``sigmoid(logits) > threshold``;
* ``ground_truth``: the labelled change (needs the batch's ``mask``);
* ``all``: every pixel;
* ``roi``: a user's boolean region of interest (H×W, 1×H×W or B×1×H×W).

An empty ``M`` (e.g. no change predicted) gives ``S = 0`` and all-zero maps; it is reported
through :func:`is_empty`, never divided by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from changecam.metrics import THRESHOLD_RANGE, is_threshold

TargetKind = Literal["predicted", "ground_truth", "all", "roi"]
TARGET_KINDS: tuple[str, ...] = get_args(TargetKind)


@dataclass(frozen=True)
class Target:
    """Which pixels' logits make up the explained score.

    Args:
        kind: ``predicted``, ``ground_truth``, ``all`` or ``roi``.
        threshold: probability above which a pixel counts as predicted change
            (``kind="predicted"`` only).
    """

    kind: TargetKind = "predicted"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(
                f"target kind {self.kind!r} is not allowed; expected one of {TARGET_KINDS}"
            )
        if not is_threshold(self.threshold):
            raise ValueError(f"target threshold {self.threshold} must be {THRESHOLD_RANGE}")


def as_target(target: Target | TargetKind) -> Target:
    """Accept a :class:`Target` or just its kind."""
    return target if isinstance(target, Target) else Target(kind=target)


def _as_batch_mask(region: Tensor, like: Tensor, what: str) -> Tensor:
    """Broadcast an H×W, 1×H×W or B×1×H×W region to ``like``'s B×1×H×W shape, as float {0,1}."""
    region = region.to(device=like.device)
    if region.ndim == 2:
        region = region[None, None]
    elif region.ndim == 3:
        region = region[:, None]
    if region.ndim != 4 or region.shape[1] != 1 or region.shape[-2:] != like.shape[-2:]:
        raise ValueError(
            f"{what} has shape {tuple(region.shape)}; expected H×W, 1×H×W or B×1×H×W "
            f"matching the logits {tuple(like.shape)}"
        )
    if region.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"{what} holds {region.shape[0]} masks for a batch of {like.shape[0]}")
    return (region > 0.5 if region.is_floating_point() else region != 0).expand_as(like).float()


def target_mask(
    logits: Tensor,
    target: Target | TargetKind = "predicted",
    *,
    label: Tensor | None = None,
    roi: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """The detached target mask ``M`` (float B×1×H×W in {0, 1}).

    Args:
        logits: model output, B×1×H×W.
        target: the kind of target (and threshold).
        label: ground-truth change mask, needed for ``ground_truth``.
        roi: boolean region of interest, needed for ``roi``.
        valid: pixels that may count at all (e.g. excluding padding); outside it ``M = 0``.

    Raises:
        ValueError: the target needs a ``label``/``roi`` that is missing or has the wrong shape.
    """
    target = as_target(target)
    logits = logits.detach()
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"expected logits B×1×H×W, got {tuple(logits.shape)}")
    if target.kind == "predicted":
        mask = (torch.sigmoid(logits) > target.threshold).float()
    elif target.kind == "all":
        mask = torch.ones_like(logits)
    elif target.kind == "ground_truth":
        if label is None:
            raise ValueError("target 'ground_truth' needs the ground-truth change mask (label)")
        mask = _as_batch_mask(label.detach(), logits, "ground-truth mask")
    else:
        if roi is None:
            raise ValueError("target 'roi' needs a region of interest (roi)")
        mask = _as_batch_mask(roi.detach(), logits, "region of interest")
    if valid is not None:
        mask = mask * _as_batch_mask(valid.detach(), logits, "valid region")
    return mask.to(logits.dtype)


def target_score(logits: Tensor, mask: Tensor) -> Tensor:
    """``S = Σ_{h,w} M ⊙ logits`` per sample (shape B); ``M`` is detached here as well."""
    return (mask.detach() * logits).flatten(1).sum(1)


def is_empty(mask: Tensor) -> Tensor:
    """Per sample: whether the target mask selects no pixel (B bool) — "no change predicted"."""
    return mask.flatten(1).sum(1) == 0

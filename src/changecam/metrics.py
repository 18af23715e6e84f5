"""Change-class scores: the one place where precision, recall, F1, IoU and accuracy are computed.

Split-level scores are pooled over every pixel of the split (one confusion matrix, the
BIT/ChangeFormer protocol), accumulated by torchmetrics' :class:`BinaryStatScores` on
probabilities, so they stay exact across batches and DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.classification import BinaryStatScores

SCORE_NAMES: tuple[str, ...] = ("f1", "iou", "precision", "recall", "accuracy")
THRESHOLD_RANGE = "a probability in [0, 1) that float32 keeps below 1 (at most 0.99999994)"


def is_threshold(threshold: float) -> bool:
    """Whether ``threshold`` can split change from no change: in [0, 1) as the float32
    probabilities are compared with it (one that float32 rounds to 1 leaves no pixel above)."""
    return 0.0 <= threshold < 1.0 and float(torch.tensor(threshold, dtype=torch.float32)) < 1.0


def scores_from_counts(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor) -> dict[str, Tensor]:
    """Change-class scores from confusion counts (tensors of any matching shape).

    A ratio whose denominator is zero is 0 (nothing predicted and nothing to find gives
    precision = recall = F1 = IoU = 0), matching torchmetrics' ``zero_division=0``.
    """
    tp, fp, fn, tn = (torch.as_tensor(x, dtype=torch.float64) for x in (tp, fp, fn, tn))

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    return {
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
    }


def confusion_counts(probs: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-sample ``[TP, FP, FN, TN]`` (``B x 4``, int64) of probabilities against a {0,1} mask."""
    pred = probs.flatten(1) > threshold
    true = mask.flatten(1) > 0.5
    return torch.stack(
        [
            (pred & true).sum(1),
            (pred & ~true).sum(1),
            (~pred & true).sum(1),
            (~pred & ~true).sum(1),
        ],
        dim=1,
    )


class ChangeScores(BinaryStatScores):
    """Pooled change-class scores of a split; ``update(probs, mask)``, ``compute() -> dict``."""

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        # torchmetrics takes a Python float only; Hydra reads `threshold=0` as an int
        super().__init__(threshold=float(threshold), multidim_average="global", **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if preds.is_floating_point():
            if preds.min() < 0 or preds.max() > 1:
                raise ValueError("ChangeScores expects probabilities in [0, 1], not logits")
            # NaN is no change, as in confusion_counts: torchmetrics would take a batch with a
            # NaN for logits on the CPU and call every pixel change
            preds = torch.nan_to_num(preds, nan=0.0)
        super().update(preds, target.long())

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        tp, fp, tn, fn = self._final_state()
        return {k: v.float() for k, v in scores_from_counts(tp, fp, fn, tn).items()}


def mean_of(values: Sequence[float | None]) -> float | None:
    """The mean over samples of the defined values (``None`` and NaN skipped, e.g. the post
    share of a pair with no predicted change); ``None`` when there are none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else None

"""Per-image scores of an evaluation loop, and the seed notebook's per-batch figure.

:class:`PerImageScores` is a Lightning callback on the same test (or validation) loop that
``train.py`` runs: from each batch's logits (what :class:`~changecam.training.module.
ChangeDetectionModule` returns from its evaluation step) it keeps one row per sample: ``name``,
``TP, FP, FN, TN``, ``F1``, ``IoU`` and the post share of one per-date layer, explained on the
whole sample by :func:`changecam.explain.explain_tensors`. At the end of the loop it logs the
mean post share and the seed-style scores (``seed_style/<split>/...``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor, nn

from changecam.explain import ExplainSettings, FaithfulnessSettings, explain_tensors
from changecam.metrics import SCORE_NAMES, confusion_counts, scores_from_counts
from changecam.values import is_count

SEED_STYLE = "seed_style"


@dataclass(frozen=True)
class ImageScore:
    """One row of ``per_image.csv``."""

    name: str
    TP: int
    FP: int
    FN: int
    TN: int
    F1: float
    IoU: float
    post_share: float


def image_scores(names: Sequence[str], counts: Tensor, shares: Tensor) -> list[ImageScore]:
    """Rows from per-sample ``[TP, FP, FN, TN]`` counts (``N x 4``) and post shares (``N``)."""
    scores = scores_from_counts(*counts.T)
    return [
        ImageScore(
            name,
            *(int(v) for v in counts[i].tolist()),
            F1=float(scores["f1"][i]),
            IoU=float(scores["iou"][i]),
            post_share=float(shares[i]),
        )
        for i, name in enumerate(names)
    ]


def check_seed_batch_size(value: Any) -> None:
    """Refuse a ``seed_batch_size`` that is not an integer >= 1 (eval.py, before it removes an
    earlier run's results; :class:`PerImageScores`).

    Raises:
        ValueError: naming the value.
    """
    if not is_count(value):
        raise ValueError(f"seed_batch_size={value!r} must be an integer >= 1")


def mean_of_group_scores(counts: Tensor, group_size: int) -> dict[str, float]:
    """The seed notebook's figure: scores of consecutive groups of samples, averaged over groups.

    Each group (a "batch" of ``group_size`` samples, the last one possibly smaller) gets its own
    pooled scores; the result is their unweighted mean. Unlike the split-pooled scores it
    depends on the grouping and gives a group without change and without false alarms a
    score of 0 (no true positives possible), which pulls the average down.
    """
    if group_size < 1:
        raise ValueError(f"seed_batch_size={group_size} must be >= 1")
    if counts.ndim != 2 or counts.shape[1] != 4 or len(counts) == 0:
        raise ValueError(f"expected N x 4 confusion counts with N >= 1, got {tuple(counts.shape)}")
    sums = torch.stack([g.sum(0) for g in counts.split(group_size)])
    scores = scores_from_counts(*sums.T)
    return {name: float(scores[name].mean()) for name in SCORE_NAMES}


def post_share_settings(
    layer: str, threshold: float, target: Literal["predicted", "roi"] = "predicted"
) -> ExplainSettings:
    """HiResCAM of one per-date layer on the predicted change (or a given region of it),
    without curves or upsampling."""
    return ExplainSettings(
        taps=(layer,),
        methods=("hirescam",),
        target=target,
        threshold=threshold,
        faithfulness=FaithfulnessSettings(enabled=False),
    )


def whole_image_post_share(
    net: nn.Module,
    pre: Tensor,
    post: Tensor,
    layer: str,
    threshold: float,
    changed: Tensor | None = None,
) -> Tensor:
    """Post share of ``layer`` per sample on whole inputs of any size (padded as needed); NaN
    where nothing is predicted.

    Args:
        changed: B×1×H×W pixels scored as change, when they come from another forward pass
            than ``net``'s own on the whole input (sliding windows): the target is then the
            network's logits over exactly those pixels. Default: ``net``'s own prediction.
    """
    target = "predicted" if changed is None else "roi"
    settings = post_share_settings(layer, threshold, target)
    explained = explain_tensors(net, pre, post, settings, roi=changed, upsample=False)
    return explained.explanation.post_share(layer)


class PerImageScores(L.Callback):
    """Rows of ``per_image.csv`` and the seed-style scores, from an evaluation loop's outputs.

    Args:
        net: the network whose post share is explained (the network itself, also when the
            module predicts through sliding windows: the share is explained on whole samples,
            its target the network's logits over the pixels the row scores as change).
        threshold: probability above which a pixel counts as change.
        post_share_layer: per-date layer of the post share column; ``None``: no post share.
        seed_batch_size: group size of the seed-style mean of per-batch scores.
    """

    def __init__(
        self,
        net: nn.Module,
        threshold: float = 0.5,
        post_share_layer: str | None = None,
        seed_batch_size: int = 16,
    ) -> None:
        super().__init__()
        check_seed_batch_size(seed_batch_size)
        self.net = net
        self.threshold = threshold
        self.post_share_layer = post_share_layer
        self.seed_batch_size = seed_batch_size
        self.rows: list[ImageScore] = []
        # the split's metric keys left undefined (no image with a prediction to explain)
        self.undefined: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self._names: list[str] = []
        self._counts: list[Tensor] = []
        self._shares: list[Tensor] = []

    def _post_shares(self, batch: dict[str, Any], changed: Tensor) -> Tensor:
        pre, post = batch["pre"], batch["post"]
        if self.post_share_layer is None:
            return torch.full((len(pre),), math.nan)
        # the pixels this row scores as change, also when the module blends sliding windows
        return whole_image_post_share(
            self.net, pre, post, self.post_share_layer, self.threshold, changed=changed
        )

    def _on_batch_end(self, outputs: Tensor, batch: dict[str, Any]) -> None:
        probs = torch.sigmoid(outputs.float())
        self._counts.append(confusion_counts(probs, batch["mask"], self.threshold).cpu())
        self._names.extend(batch["name"])
        self._shares.append(self._post_shares(batch, probs > self.threshold).cpu())

    def _on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        split = "val" if trainer.state.stage == RunningStage.VALIDATING else "test"
        counts = torch.cat(self._counts)
        for name, value in mean_of_group_scores(counts, self.seed_batch_size).items():
            pl_module.log(f"{SEED_STYLE}/{split}/{name}", value)
        pl_module.log(f"{SEED_STYLE}/batch_size", float(self.seed_batch_size))
        shares = torch.cat(self._shares)
        if self.post_share_layer is not None and (~shares.isnan()).any():
            pl_module.log(f"{split}/post_share/{self.post_share_layer}", shares.nanmean())
        self.undefined = (
            [f"{split}/post_share/{self.post_share_layer}"]
            if self.post_share_layer is not None and shares.isnan().all()
            else []
        )
        self.rows = image_scores(self._names, counts, shares)
        self._reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._on_batch_end(outputs, batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if not trainer.sanity_checking:
            self._on_batch_end(outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_epoch_end(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._on_epoch_end(trainer, pl_module)

    def columns(self) -> list[str]:
        """The CSV header, with the post-share column named after its layer (none without
        a layer)."""
        fields = list(ImageScore.__dataclass_fields__)
        if self.post_share_layer is None:
            return [f for f in fields if f != "post_share"]
        return [f.replace("post_share", f"post_share_{self.post_share_layer}") for f in fields]

    def csv_text(self) -> str:
        """``per_image.csv`` as text (NaN written as ``nan``)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns())
        for row in self.table():
            writer.writerow(
                f"{v:.6f}" if isinstance(v, float) and not math.isnan(v) else v for v in row
            )
        return buffer.getvalue()

    def table(self) -> list[list[Any]]:
        """The rows as lists (the columns of :meth:`columns`), for a logger's ``log_table``."""
        rows = [asdict(r) for r in self.rows]
        if self.post_share_layer is None:
            for row in rows:
                del row["post_share"]
        return [list(row.values()) for row in rows]


__all__ = [
    "SEED_STYLE",
    "ImageScore",
    "PerImageScores",
    "image_scores",
    "mean_of_group_scores",
    "post_share_settings",
    "whole_image_post_share",
]

"""HiResCAM panels and pre/post evidence shares in W&B (and as PNG files) every validation epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from changecam.explain import (
    Target,
    TargetKind,
    explain_batch,
    faithfulness,
    per_date_layers,
    resolve_taps,
)
from changecam.explain.render import render_panel, save_panel, to_mask, to_rgb
from changecam.metrics import confusion_counts, scores_from_counts

CLASS_LABELS = {0: "no change", 1: "change"}
log = logging.getLogger(__name__)


def select_samples(masks: Sequence[Tensor], k: int) -> list[int]:
    """A fixed, deterministic choice of ``k`` samples that includes samples with change.

    Half (rounded up) are the samples with the largest changed fraction, the rest are spread
    evenly over the remaining ones, in dataset order.

    Args:
        masks: the candidate samples' change masks.
        k: how many to choose (all of them if there are fewer).
    """
    n = len(masks)
    if k >= n:
        return list(range(n))
    fractions = torch.tensor([float(m.float().mean()) for m in masks])
    order = torch.argsort(-fractions, stable=True).tolist()
    most = [i for i in order[: math.ceil(k / 2)] if fractions[i] > 0]
    rest = [i for i in range(n) if i not in most]
    step = len(rest) / (k - len(most))
    spread = [rest[int(j * step)] for j in range(k - len(most))]
    return sorted(most + spread)


class CamPanels(L.Callback):
    """Explain a fixed set of validation samples every ``every_n_epochs`` validation epochs.

    On rank 0 only, it logs to every :class:`WandbLogger` of the trainer: the 2×4 panel of each
    sample (``val/cam/panels``), the post image with toggleable ground-truth and prediction mask
    overlays (``val/cam/overlays``), a table with one row per sample (``val/cam/table``: name, panel,
    post share per layer, F1, IoU, target score), and — through ``pl_module.log`` so every logger
    gets them — the scalars ``val/cam/post_share/<layer>`` (mean over the samples) and
    ``val/cam/faithfulness_gap/<layer>`` of the deepest encoder layer. The same panels are written
    as PNG files to ``<out_dir>/epoch_<NNN>/<name>.png`` whatever the logger.

    Args:
        out_dir: folder of the PNG files (typically ``<run dir>/cam``).
        k: number of fixed validation samples.
        taps: taps or per-date layers to explain (``None``: every tap of the model).
        target: what the explanation explains (``predicted``, ``ground_truth``, ``all``).
        threshold: probability threshold of the predicted change.
        every_n_epochs: explain every N-th validation epoch.
        faithfulness_steps: points of the deletion curve minus one (0 disables the gap).
        random_repeats: random orders averaged for the faithfulness baseline.
        max_candidates: validation samples scanned when choosing the fixed set.
        dpi: resolution of the panels.
    """

    def __init__(
        self,
        out_dir: str | Path,
        k: int = 8,
        taps: Sequence[str] | None = None,
        target: TargetKind = "predicted",
        threshold: float = 0.5,
        every_n_epochs: int = 1,
        faithfulness_steps: int = 5,
        random_repeats: int = 1,
        max_candidates: int = 256,
        dpi: int = 50,
    ) -> None:
        super().__init__()
        if k < 1 or every_n_epochs < 1:
            raise ValueError("callbacks.cam_panels.k and every_n_epochs must be >= 1")
        self.out_dir = Path(out_dir)
        self.k = k
        self.taps = list(taps) if taps is not None else None
        self.target = Target(target, threshold)
        self.threshold = threshold
        self.every_n_epochs = every_n_epochs
        self.faithfulness_steps = faithfulness_steps
        self.random_repeats = random_repeats
        self.max_candidates = max_candidates
        self.dpi = dpi
        self.samples: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolve_taps(pl_module, self.taps)  # fail at start on unknown tap names

    def _fixed_samples(self, trainer: L.Trainer) -> dict[str, Any]:
        if self.samples is None:
            loader = trainer.val_dataloaders
            dataset = (loader[0] if isinstance(loader, list | tuple) else loader).dataset
            stride = max(1, len(dataset) // self.max_candidates)
            candidates = list(range(0, len(dataset), stride))[: self.max_candidates]
            items = [dataset[i] for i in candidates]
            chosen = select_samples([it["mask"] for it in items], self.k)
            picked = [items[i] for i in chosen]
            self.samples = {
                key: torch.stack([it[key] for it in picked]) for key in ("pre", "post", "mask")
            }
            self.samples["name"] = [it["name"] for it in picked]
        return self.samples

    def _due(self, trainer: L.Trainer) -> bool:
        """Validation epochs of fitting only (not the sanity check, not a later ``trainer.validate``)."""
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        return fitting and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        scalars = self._explain_and_log(trainer, pl_module) if trainer.is_global_zero else {}
        for key, value in scalars.items():
            pl_module.log(key, value, rank_zero_only=True)

    def _explain_and_log(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, float]:
        samples = self._fixed_samples(trainer)
        device = pl_module.device
        pre, post, mask = (samples[k].to(device) for k in ("pre", "post", "mask"))
        exp = explain_batch(pl_module, pre, post, taps=self.taps, target=self.target, label=mask)
        layers = per_date_layers(exp.taps)
        deepest = [layer for layer in layers if layer.startswith("enc")][-1:] or layers[-1:]
        faith = None
        if self.faithfulness_steps > 0 and deepest:
            faith = faithfulness(
                pl_module,
                pre,
                post,
                exp,
                layer=deepest[0],
                dates=("both",),
                steps=self.faithfulness_steps,
                insertion=False,
                random_repeats=self.random_repeats,
            )
        exp, mask = exp.to("cpu"), mask.cpu()
        shares = exp.post_shares()
        counts = confusion_counts(torch.sigmoid(exp.logits), mask, self.threshold)
        scores = scores_from_counts(*counts.T)
        gaps = faith.gap("both") if faith is not None else torch.full((len(exp),), math.nan)

        epoch_dir = self.out_dir / f"epoch_{trainer.current_epoch:03d}"
        panels = []
        for i, name in enumerate(samples["name"]):
            panel = render_panel(
                samples["pre"][i],
                samples["post"][i],
                exp,
                index=i,
                label=mask[i, 0],
                faithfulness=faith,
                threshold=self.threshold,
                title=name,
                dpi=self.dpi,
            )
            save_panel(panel, epoch_dir / f"{name}.png")
            panels.append(panel)
        log.info("rank %d wrote %d CAM panels to %s", trainer.global_rank, len(panels), epoch_dir)

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, trainer, samples, exp, mask, panels, shares, scores, gaps)

        scalars = {
            f"val/cam/post_share/{layer}": float(torch.nanmean(share))
            for layer, share in shares.items()
        }
        if deepest:
            scalars[f"val/cam/faithfulness_gap/{deepest[0]}"] = float(torch.nanmean(gaps))
        return {k: v for k, v in scalars.items() if not math.isnan(v)}

    def _log_wandb(self, logger, trainer, samples, exp, mask, panels, shares, scores, gaps) -> None:
        import wandb

        names = samples["name"]
        prob_mask = (torch.sigmoid(exp.logits[:, 0]) > self.threshold).numpy().astype(np.uint8)
        overlays = [
            wandb.Image(
                to_rgb(samples["post"][i]),
                caption=name,
                masks={
                    "ground_truth": {
                        "mask_data": to_mask(mask[i, 0]).astype(np.uint8),
                        "class_labels": CLASS_LABELS,
                    },
                    "prediction": {"mask_data": prob_mask[i], "class_labels": CLASS_LABELS},
                },
            )
            for i, name in enumerate(names)
        ]
        images = [wandb.Image(p, caption=n) for p, n in zip(panels, names, strict=True)]
        layers = list(shares)
        columns = [
            "name",
            "panel",
            *[f"post_share/{layer}" for layer in layers],
            "f1",
            "iou",
            "target_score",
            "faithfulness_gap",
        ]
        rows = [
            [
                name,
                images[i],
                *[float(shares[layer][i]) for layer in layers],
                float(scores["f1"][i]),
                float(scores["iou"][i]),
                float(exp.score[i]),
                float(gaps[i]),
            ]
            for i, name in enumerate(names)
        ]
        logger.experiment.log(
            {
                "val/cam/panels": images,
                "val/cam/overlays": overlays,
                "val/cam/table": wandb.Table(columns=columns, data=rows),
                "trainer/global_step": trainer.global_step,
            }
        )

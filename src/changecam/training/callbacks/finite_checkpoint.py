"""A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` that never keeps a non-finite score.

Lightning ranks a NaN monitored value as the worst one, but while fewer than ``save_top_k``
checkpoints exist it still saves it: a NaN at the first validation becomes ``best.ckpt`` and
``best_model_path``. The ChangeDetectionModule stops a diverged run before the checkpoint
callbacks run (:class:`~changecam.training.module.DivergenceError`); this callback is the
second guard, for modules that log their own metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose monitored checkpoints (``best.ckpt``) hold finite scores only.

    Raises:
        ValueError: ``save_top_k`` keeps more than one checkpoint under one file name (without
            ``{epoch}`` or another field in ``filename``): each would overwrite the last, or
            with the version counter the plain name would hold the latest kept one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        problem = top_k_problem(self.save_top_k, self.filename)
        if problem:
            raise ValueError(problem)

    def check_monitor_top_k(self, trainer: Trainer, current: Tensor | None = None) -> bool:
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            rank_zero_warn(
                f"{self.monitor}={float(current)} at epoch {trainer.current_epoch} is not finite: "
                "no checkpoint is saved for it and it cannot become the best"
            )
            return False
        return super().check_monitor_top_k(trainer, current)


def top_k_problem(save_top_k: Any, filename: str | None) -> str | None:
    """Why these settings would keep the wrong checkpoint, or ``None``: several kept under one
    file name (no field in ``filename``) overwrite each other, and with Lightning's version
    counter the plain name holds the latest kept one, not the best."""
    if save_top_k in (0, 1) or not isinstance(save_top_k, int) or "{" in (filename or "{"):
        return None
    return (
        f"callbacks.model_checkpoint.save_top_k={save_top_k} keeps several checkpoints, but all "
        f"under the name {filename!r}: each would overwrite the last, leaving the latest kept "
        "one, not the best; add a field to the name, e.g. "
        "callbacks.model_checkpoint.filename='best-{epoch:03d}'"
    )

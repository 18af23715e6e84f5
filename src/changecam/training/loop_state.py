"""Where in its fit a Lightning checkpoint was saved: its fit loop's counters, read without
the weights. Every resume decision reads them here: train.py's refusals and warnings
(:mod:`changecam.cli.train`) and the rows the CSV logger keeps
(:mod:`changecam.training.csv_logger`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

EPOCH_COUNTS = ("ready", "started", "processed", "completed")


@dataclass(frozen=True)
class LoopState:
    """A checkpoint's fit-loop counters.

    Lightning counts an epoch *processed* when its training batches and end-of-epoch hooks ran,
    *completed* when the loop moved on to the next; the batch loop says whether it reached the
    epoch's last batch.
    """

    epoch: int = 0
    global_step: int | None = None  # optimizer steps (Lightning's own checkpoints hold it)
    epochs: Mapping[str, int] = field(default_factory=dict)  # fit_loop.epoch_progress.total
    batches: Mapping[str, Any] = field(default_factory=dict)  # epoch_loop.batch_progress
    stepped: int | None = None  # batches that stepped an optimizer (the logger's step)
    callbacks: Mapping[str, Any] = field(default_factory=dict)

    @property
    def counted(self) -> bool:
        """Whether the checkpoint holds the epoch counters (a Lightning fit's does)."""
        return all(isinstance(self.epochs.get(k), int) for k in EPOCH_COUNTS)

    @property
    def at_epoch_end(self) -> bool:
        """Saved as an epoch ended: processed, not yet counted completed (also an epoch that
        ``trainer.max_steps`` or ``max_time`` cut short: see :attr:`cut`)."""
        if not self.counted:
            return False
        ready, started, processed, completed = (self.epochs[k] for k in EPOCH_COUNTS)
        return ready == started == processed == completed + 1

    @property
    def inside_epoch(self) -> bool:
        """Saved inside an epoch (by a validation or a step-interval save there): the epoch is
        not processed yet, and a resumed run goes on in it."""
        processed = self.epochs.get("processed")
        return isinstance(processed, int) and processed == self.epochs.get("completed")

    @property
    def cut(self) -> tuple[int, int] | None:
        """``(epoch, batches trained in it)`` of one saved as the end of an epoch that
        ``trainer.max_steps`` (or ``max_time``) stopped before its last batch; ``None``
        otherwise. Lightning resumes it with the next epoch."""
        processed, completed = self.epochs.get("processed"), self.epochs.get("completed")
        if not isinstance(processed, int) or not isinstance(completed, int):
            return None
        if processed != completed + 1 or self.batches.get("is_last_batch") is not False:
            return None
        trained = self.batches.get("current", {}).get("processed")
        return self.epoch, int(trained) if isinstance(trained, int) else 0

    @property
    def resumed_step(self) -> int | None:
        """The first logger step a run resumed from here logs again (``None``: the checkpoint
        holds neither count).

        Lightning logs at the count of batches that stepped an optimizer. A checkpoint saved
        at an epoch's end holds the count after the epoch's last batch; one saved by a
        validation inside an epoch (``trainer.val_check_interval``) holds it before that batch
        is counted, although the batch and its validation were logged at that step, and
        ``global_step`` (optimizer steps, counted earlier) is then one ahead.
        """
        if self.stepped is None:
            return self.global_step
        if self.global_step is None:  # the batch that stepped is counted at an epoch's end
            return self.stepped + (0 if self.at_epoch_end else 1)
        return min(self.global_step, self.stepped + 1)


def read_loop_state(path: str | Path) -> LoopState:
    """The fit-loop counters of the checkpoint at ``path`` (mapped, not read: the weights and
    optimizer state are not loaded)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    fit_loop = ckpt.get("loops", {}).get("fit_loop", {})
    stepped = fit_loop.get("epoch_loop.state_dict", {}).get("_batches_that_stepped")
    # global_step, or the optimizer steps' count Lightning restores it from
    steps = ckpt.get("global_step")
    if steps is None:
        optimizer = fit_loop.get("epoch_loop.automatic_optimization.optim_progress", {})
        steps = optimizer.get("optimizer", {}).get("step", {}).get("total", {}).get("completed")
    return LoopState(
        epoch=int(ckpt.get("epoch", 0)),
        global_step=None if steps is None else int(steps),
        epochs=fit_loop.get("epoch_progress", {}).get("total", {}),
        batches=fit_loop.get("epoch_loop.batch_progress", {}),
        stepped=None if stepped is None else int(stepped),
        callbacks=ckpt.get("callbacks") or {},
    )

"""A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose step or time saves wait for
the validation of their batch.

Lightning saves a checkpoint due every so many training steps (``every_n_train_steps``) or
seconds (``train_time_interval``) when the batch ends, before the validation that may follow
that batch, and then skips the validation's own save as one of the same step. A run resumed
from it never runs that validation (Lightning counts it as done): its metrics, best
checkpoint and early stopping differed from an uninterrupted run's. Such a save is written
after the validation instead, where a checkpoint of a validation inside an epoch is written,
and at the epoch's end for the epoch's last batch, after the other callbacks have taken in its
validation there.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether a validation runs after the training batch that is ending, as Lightning's loop
    decides it right after the batch's ``on_train_batch_end`` hooks. ``False`` for validations
    every so much time (``val_check_interval`` as a duration): that is decided on the clock
    when it is asked, and a save held for a validation that then does not come is lost."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose saves due at the end of a training batch that a validation
    follows are written at the end of that validation (with its monitored values)."""

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        """The key Lightning reads when this callback's own is missing: the one of Lightning's
        ``ModelCheckpoint`` with the same settings, which wrote changecam's checkpoints (best
        and last) before these classes (2026-12-01), so a resume of one of them keeps its best
        checkpoints too (:func:`~changecam.training.callbacks.finite_checkpoint.rename_legacy_states`
        puts them under the own key first)."""
        return "ModelCheckpoint" + self.state_key.removeprefix(type(self).__qualname__)

    _holding = False
    _owed = False
    _epoch_ends = False  # the batch being held is its epoch's last

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._holding = trainer.training and validation_follows(trainer)
        self._epoch_ends = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._holding = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._owed and not self._epoch_ends:
            self._write_owed(trainer)
        super().on_validation_end(trainer, pl_module)  # skips a second save of this step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # an epoch-end validation is taken in by the best checkpoint and early stopping only at
        # the epoch's end (their default with one validation per epoch): a save written at the
        # validation's end held neither, and a resumed run never counts that validation again
        super().on_train_epoch_end(trainer, pl_module)
        if self._owed:
            self._write_owed(trainer)

    def _write_owed(self, trainer: L.Trainer) -> None:
        self._owed = False
        if self._last_global_step_saved == trainer.global_step:  # the epoch's own save wrote it
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _save_topk_checkpoint(
        self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]
    ) -> None:
        if self._holding:
            self._owed = True
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(
        self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]
    ) -> None:
        if self._holding:
            self._owed = True
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)

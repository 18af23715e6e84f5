"""A callback for the kill-and-resume test: slow training steps down and report each one.

Slowing steps down (``time.sleep``) changes no number; it makes an epoch last long enough
that the test can kill the process in the middle of one, and the printed lines show where
the process was when it died. ``pause_at`` holds the run at one step until it is killed, so
the kill lands there however slow the machine is.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

PAUSE_S = 600.0  # far longer than the test takes to notice the step and kill the run


class SlowSteps(L.Callback):
    """Sleep ``seconds`` after every training step and print ``slow_steps epoch=E batch=B``;
    after step ``pause_at`` (``"E:B"``) sleep for :data:`PAUSE_S` instead."""

    def __init__(self, seconds: float = 0.2, pause_at: str | None = None) -> None:
        self.seconds = seconds
        self.pause_at = pause_at

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        print(f"slow_steps epoch={trainer.current_epoch} batch={batch_idx}", flush=True)
        here = f"{trainer.current_epoch}:{batch_idx}"
        # in short sleeps: a SIGTERM (Lightning's handler only takes note) ends the pause
        end = time.monotonic() + (PAUSE_S if here == self.pause_at else self.seconds)
        while time.monotonic() < end and not trainer.received_sigterm:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))


class StopAt(L.Callback):
    """Stop the process at the start of training step ``at`` (``"E:B"``) with ``SystemExit``:
    in one process, a stand-in for a kill (what is in flight is lost; the last checkpoint
    stays)."""

    def __init__(self, at: str) -> None:
        self.at = at

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if f"{trainer.current_epoch}:{batch_idx}" == self.at:
            raise SystemExit(f"stopped at step {self.at}")

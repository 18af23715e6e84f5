"""A callback for the kill-and-resume test: slow training steps down and report each one.

Slowing steps down (``time.sleep``) changes no number; it makes an epoch last long enough
that the test can kill the process in the middle of one, and the printed lines show where
the process was when it died.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class SlowSteps(L.Callback):
    """Sleep ``seconds`` after every training step and print ``slow_steps epoch=E batch=B``."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        print(f"slow_steps epoch={trainer.current_epoch} batch={batch_idx}", flush=True)
        time.sleep(self.seconds)

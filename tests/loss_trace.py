"""A callback for the DDP tests: every rank writes the size and loss of each training batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class LossTrace(L.Callback):
    """Append ``[samples, loss]`` of every training batch to ``<folder>/rank<R>.jsonl``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps([len(batch["name"]), float(loss)]) + "\n")

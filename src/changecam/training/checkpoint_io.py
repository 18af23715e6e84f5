"""Atomic checkpoint writes: a kill during a save never leaves a corrupt checkpoint.

Lightning's :class:`TorchCheckpointIO` stages the file in the system temporary folder and
moves it into place; where that folder is on another file system, the move is a copy that a
kill can cut short. :class:`AtomicCheckpointIO` writes through :mod:`changecam.atomic`: next to
the target, flushed to disk, renamed with :func:`os.replace`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from changecam.atomic import atomic_open


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through :func:`changecam.atomic.atomic_open`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO plugin with atomic local writes (remote URLs: Lightning's own)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

"""Hydra callbacks (``hydra.callbacks`` in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class MakeSweepDir(Callback):
    """Create the sweep folder when a multirun starts, before the sweeper runs.

    The Optuna sweeper opens its sqlite storage (``<sweep dir>/optuna.db``) before the
    launcher would create the folder.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

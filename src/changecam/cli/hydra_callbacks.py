"""Hydra callbacks (``hydra.callbacks`` in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import os
import time
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


SWEEP_STARTED = "CHANGECAM_SWEEP_STARTED"


class PinSweepStart(Callback):
    """Set ``$CHANGECAM_SWEEP_STARTED`` to this invocation's start time when a multirun starts.

    ``hparams_search=optuna`` names its trial folders ``<start time>_<job number>`` (Hydra
    numbers each invocation's jobs from 0, so a continued study would reuse the earlier
    folders). Each job resolves its folder itself, so the time must be fixed once: in the
    environment, which the launchers' workers and a SLURM job requeued by submitit inherit, so
    a requeued trial finds its own folder (and its ``last.ckpt``) again.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_STARTED] = time.strftime("%Y-%m-%d_%H-%M-%S")

"""Lightning's DDP launcher inside Hydra multiruns.

With ``strategy=ddp`` Lightning starts ranks 1..N-1 by running the command line again with
``hydra.run.dir=<hydra.run.dir>`` appended. That is right for a single run, but in a multirun
the command line starts the whole sweep again (``-m`` and every swept value), and
``hydra.run.dir`` is not the job's folder. :func:`prepare_ddp_relaunch` makes the command line
this one job's overrides, in RUN mode, and points ``hydra.run.dir`` at the job's folder, so the
ranks share one output folder.
"""

from __future__ import annotations

import sys

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import read_write

from changecam.cli.config_checks import ConfigError
from changecam.cli.launch import is_multirun


def starts_rank_processes(trainer: L.Trainer) -> bool:
    """Whether Lightning will start the other ranks itself by re-running this script."""
    strategy = trainer.strategy
    environment = getattr(strategy, "cluster_environment", None)
    return (
        trainer.world_size > 1
        and strategy.launcher is not None
        and getattr(strategy, "_start_method", "popen") == "popen"
        and environment is not None
        and not environment.creates_processes_externally
    )


def prepare_ddp_relaunch(trainer: L.Trainer) -> None:
    """In a Hydra multirun, make Lightning's DDP ranks re-run this job in its own folder.

    Raises:
        ConfigError: under ``hydra/launcher=joblib``, whose worker processes cannot be
            re-run as a script.
    """
    if not (is_multirun() and starts_rank_processes(trainer)):
        return
    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.runtime.choices.get("hydra/launcher")
    if launcher == "joblib":
        raise ConfigError(
            "trainer.strategy=ddp with hydra/launcher=joblib: Lightning starts DDP ranks by "
            "re-running the script, which a joblib worker cannot do. Sweep DDP runs with the "
            "basic launcher (they run one after another) or on SLURM (hydra/launcher=slurm)."
        )
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir

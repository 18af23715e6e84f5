"""Lightning's DDP launcher inside Hydra multiruns.

With ``strategy=ddp`` Lightning starts ranks 1..N-1 by running the command line again with
``hydra.run.dir=<hydra.run.dir>`` appended. That is right for a single run, but in a multirun
the command line starts the whole sweep again (``-m`` and every swept value), and
``hydra.run.dir`` is not the job's folder. :func:`ddp_job` makes the command line
this one job's overrides, in RUN mode, and points ``hydra.run.dir`` at the job's folder, so the
ranks share one output folder; when the job ends, :func:`ddp_job` takes back what Lightning
left in this process (its launcher's environment variables, the process group), so that the
sweep's next job starts its own ranks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
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


# what Lightning's launcher sets in the main process; LOCAL_RANK left set would make the next
# job's trainer take its ranks for started by someone else, and start none
# set for the ranks a sweep job's DDP re-runs (as a plain run, hydra.mode=RUN): they are still
# one job of a sweep, e.g. for ckpt_path=last (train.resolve_ckpt_path)
SWEEP_JOB_ENV = "CHANGECAM_SWEEP_JOB"
LAUNCHER_ENVIRONMENT = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    SWEEP_JOB_ENV,
)


def in_sweep() -> bool:
    """Whether this process runs one job of a Hydra multirun, itself or as a DDP rank of one."""
    return is_multirun() or os.environ.get(SWEEP_JOB_ENV) == "1"


@contextmanager
def ddp_job(trainer: L.Trainer) -> Iterator[None]:
    """Run one job of a Hydra multirun whose DDP ranks Lightning starts by re-running this
    script: the ranks re-run this job only, in its folder, and when the job ends this process
    is as it was before (environment, ``sys.argv``, no process group). Outside a multirun, or
    when the ranks are started by others (SLURM, torchrun), it does nothing.

    Raises:
        ConfigError: under ``hydra/launcher=joblib``, whose worker processes cannot be
            re-run as a script.
    """
    if not (is_multirun() and starts_rank_processes(trainer)):
        yield
        return
    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.runtime.choices.get("hydra/launcher")
    if launcher == "joblib":
        raise ConfigError(
            "trainer.strategy=ddp with hydra/launcher=joblib: Lightning starts DDP ranks by "
            "re-running the script, which a joblib worker cannot do. Sweep DDP runs with the "
            "basic launcher (they run one after another) or on SLURM (hydra/launcher=slurm)."
        )
    argv, environment = sys.argv, {k: os.environ.get(k) for k in LAUNCHER_ENVIRONMENT}
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    os.environ[SWEEP_JOB_ENV] = "1"
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

"""The console entry of every command: light enough that a bad config fails in about a second.

``python train.py ...`` runs :func:`hydra_main`'s ``main``: Hydra composes the config, the
config guards check changecam's own keys and values from source (no torch, no Lightning), and
only then is the command's module imported and run. A failure is reported once: one message on
stderr, the traceback in the run's log file (``HYDRA_FULL_ERROR=1`` raises it as it is, and a
multirun leaves failures to Hydra's sweep).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from changecam.cli.config_checks import check_config
from changecam.environment import configure_environment

log = logging.getLogger("changecam")

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def config_dir() -> str:
    """The folder of changecam's Hydra configs: ``$CHANGECAM_CONFIG_DIR`` or the repository's
    ``conf/``.

    Raises:
        FileNotFoundError: the folder has no ``train.yaml`` (e.g. an install without the repository).
    """
    folder = Path(os.environ.get("CHANGECAM_CONFIG_DIR") or CONF_DIR)
    if not (folder / "train.yaml").is_file():
        raise FileNotFoundError(
            f"changecam's configs are not at {folder} (no train.yaml): run changecam from a "
            "clone of the repository (editable install, `pip install -e .`), or set "
            "CHANGECAM_CONFIG_DIR=<clone>/conf"
        )
    return str(folder)


def is_multirun() -> bool:
    """Whether this job is part of a Hydra multirun (a sweep)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def log_files() -> list[Path]:
    """The files the root logger writes to (Hydra's ``<run dir>/<task>.log``)."""
    return [
        Path(h.baseFilename)
        for h in logging.getLogger().handlers
        if isinstance(h, logging.FileHandler)
    ]


def log_to_file(level: int, message: str) -> None:
    """Write ``message`` to the log files only, not to the console."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class Stopped(Exception):
    """The command was stopped from outside (SIGTERM: a cluster's time limit or preemption,
    ``kill``): exit status 143, as a shell reports a process a SIGTERM ended."""

    exit_code = 128 + 15


def report_failure(err: BaseException) -> None:
    """One line on stderr naming the error; its traceback in the log file."""
    files = log_files()
    log_to_file(logging.ERROR, "".join(traceback.format_exception(err)))
    where = f"\n(traceback in {files[0]})" if files else ""
    print(f"Error: {type(err).__name__}: {err}{where}", file=sys.stderr, flush=True)


def is_rank_zero() -> bool:
    """Whether this process is DDP rank 0 (or no DDP run has started in it). Read from
    Lightning's own record, once Lightning is imported: the quick checks run without it."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    return rank_zero is None or getattr(rank_zero.rank_zero_only, "rank", 0) == 0


def exit_reporting(err: BaseException) -> NoReturn:
    """Exit with ``err``'s status (1, or :class:`Stopped`'s 143), naming it on stderr once.

    A SIGTERM reaches every DDP rank; only rank 0 says so. The other ranks would each repeat
    it, with a resume hint of their own that is wrong in a sweep (they run as single jobs).
    """
    if isinstance(err, Stopped) and not is_rank_zero():
        log_to_file(logging.ERROR, f"{type(err).__name__}: {err}")
    else:
        report_failure(err)
    raise SystemExit(getattr(err, "exit_code", 1)) from None


def run_task(task: str, cfg: DictConfig) -> Any:
    """Check ``cfg`` from source, then import and run ``task`` (``"module:function"``)."""
    configure_environment()
    check_config(cfg, import_targets=False)
    module, _, name = task.partition(":")
    return getattr(importlib.import_module(module), name)(cfg)


def hydra_main(config_name: str, task: str) -> Callable[[], Any]:
    """The console entry point of one command.

    Args:
        config_name: the command's config (``conf/<config_name>.yaml``).
        task: ``"module:function"`` of the command's task (a
            :func:`~changecam.cli.common.task_wrapper` task), imported after the quick checks.
    """

    def job(cfg: DictConfig) -> Any:
        try:
            return run_task(task, cfg)
        except Exception as err:
            # a SIGTERM stops a whole sweep, not only its job: Hydra would go on to the next
            stopped = isinstance(err, Stopped)
            if not stopped and (os.environ.get("HYDRA_FULL_ERROR") == "1" or is_multirun()):
                raise
            exit_reporting(err)

    def main() -> Any:
        # conf/paths: the folder the command is started in, absolute, also in a sweep's jobs
        os.environ.setdefault("CHANGECAM_ROOT", os.getcwd())
        return hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(
            job
        )()

    main.__doc__ = f"``python {config_name}.py``: see conf/{config_name}.yaml."
    return main


__all__ = [
    "CONF_DIR",
    "Stopped",
    "config_dir",
    "exit_reporting",
    "hydra_main",
    "is_multirun",
    "is_rank_zero",
    "log_to_file",
    "report_failure",
]

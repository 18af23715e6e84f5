"""Helpers shared by the Hydra entry points: instantiation, W&B hygiene, results files."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("changecam")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def configure_environment() -> None:
    """Defaults every entry point sets before importing heavy libraries' side effects."""
    os.environ.setdefault("WANDB_MODE", "offline")  # never touch the network unless asked
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def close_wandb() -> None:
    """Finish the active W&B run, if W&B was imported and a run is open."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run a task and always close W&B, also when the task raises (multirun keeps going cleanly)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception:
            log.exception("task failed")
            raise
        finally:
            close_wandb()

    return wrapped


def instantiate_group(cfg: DictConfig | None, kind: type) -> list:
    """Instantiate every ``_target_`` entry of a config group dict (callbacks or loggers)."""
    objects = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a config dict of {kind.__name__}s, got {type(cfg).__name__}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            obj = hydra.utils.instantiate(conf)
            if not isinstance(obj, kind):
                raise TypeError(
                    f"config entry {name!r} built a {type(obj).__name__}, not a {kind.__name__}"
                )
            objects.append(obj)
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return instantiate_group(cfg, Callback)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return instantiate_group(cfg, Logger)


def to_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    """Metric tensors/numbers -> plain floats, sorted by key."""
    return {k: float(v) for k, v in sorted(metrics.items())}


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def print_config(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))


WANDB_LOGGER = "lightning.pytorch.loggers.wandb.WandbLogger"
RUN_ID_FILE = Path("wandb") / "run_id.txt"


def wandb_run_id(output_dir: str | Path) -> str:
    """The W&B run id of a run directory: read from ``wandb/run_id.txt``, else made and stored.

    Resuming in the same directory (``ckpt_path=last``) thus continues the same W&B run. Only
    global rank 0 writes the file; DDP ranks started later read it.
    """
    path = Path(output_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    from wandb.sdk.lib.runid import generate_id

    run_id = generate_id()
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def is_multirun() -> bool:
    """Whether this job is part of a Hydra multirun (a sweep)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def configure_wandb(cfg: DictConfig, output_dir: str | Path) -> None:
    """Fill in the W&B logger's run id (kept on resume) and, in a sweep, a shared group.

    A value set in the config (``logger.wandb.id``/``group``) is kept. The runs of one
    multirun get the group ``<task_name>/<sweep folder>`` and the name ``<task_name>/<job number>``.
    """
    loggers = cfg.get("logger") or {}
    for conf in loggers.values():
        if not (isinstance(conf, DictConfig) and conf.get("_target_") == WANDB_LOGGER):
            continue
        with open_dict(conf):
            if conf.get("id") is None:
                conf.id = wandb_run_id(output_dir)
            if is_multirun():
                hydra_cfg = HydraConfig.get()
                if conf.get("group") is None:
                    conf.group = f"{cfg.task_name}/{Path(hydra_cfg.sweep.dir).name}"
                conf.name = f"{conf.get('name') or cfg.task_name}/{hydra_cfg.job.num}"

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
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

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

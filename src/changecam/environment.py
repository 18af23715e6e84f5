"""changecam's environment defaults, set in one place (values the user set are kept).

W&B stays offline unless ``WANDB_MODE=online`` is set, and albumentations does not query PyPI
for updates when it is imported. The commands set these when they start
(:func:`changecam.cli.common.task_wrapper`), the data transforms before they import
albumentations, and the tests and benchmarks at their start.
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

ENVIRONMENT = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}


# Lightning's start-up notes that repeat what the config says (or advertise): log file only.
QUIET_INFO = {
    "lightning.pytorch.utilities.rank_zero": (
        "GPU available:",
        "TPU available:",
        "HPU available:",
        "Restoring states from the checkpoint path",
        "Loaded model weights from the checkpoint",
        "Trainer already configured with model summary callbacks",
        "💡 Tip:",
    ),
    "lightning.fabric.utilities.seed": ("Seed set to",),
}
# Deprecation notes inside third-party code that its users cannot act on.
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _ToLogFileOnly(logging.Filter):
    """Send matching INFO records to the root logger's files only (Hydra's run log)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not record.getMessage().startswith(self.prefixes):
            return True
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        return False


def configure_environment() -> None:
    """Set the defaults of :data:`ENVIRONMENT` that the environment does not set already, and
    quiet the third-party messages of :data:`QUIET_INFO` and :data:`QUIET_WARNINGS`."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for name, prefixes in QUIET_INFO.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToLogFileOnly) for f in logger.filters):
            logger.addFilter(_ToLogFileOnly(prefixes))
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Inside, Python's full garbage collections skip the objects that existed on entry
    (``gc.freeze``): after predict.py's imports about 430,000, which a full collection walks in
    0.17 s on a 2-core CPU, a pause that lands wherever the objects a long prediction makes
    happen to trigger it. The objects made inside are collected as before, and on exit
    the frozen ones are collectable again. Nested uses leave them frozen until the outermost
    exits."""
    outermost = gc.get_freeze_count() == 0
    if outermost:
        gc.freeze()
    try:
        yield
    finally:
        if outermost:
            gc.unfreeze()

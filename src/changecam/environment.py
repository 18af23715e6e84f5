"""changecam's environment defaults, set in one place (values the user set are kept).

W&B stays offline unless ``WANDB_MODE=online`` is set, and albumentations does not query PyPI
for updates when it is imported. The commands set these when they start
(:func:`changecam.cli.common.task_wrapper`), the data transforms before they import
albumentations, and the tests and benchmarks at their start.
"""

from __future__ import annotations

import os

ENVIRONMENT = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}


def configure_environment() -> None:
    """Set the defaults of :data:`ENVIRONMENT` that the environment does not set already."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)

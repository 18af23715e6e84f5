"""Plain helpers and constants of the test suite (no fixtures): ``from helpers import ...``.

Importing this module also sets the environment every test process runs with (W&B offline
and silent, no albumentations update check), the same defaults the commands set.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig, open_dict

from changecam.cli.common import compose_config
from changecam.data.synthetic import SyntheticSpec
from changecam.environment import configure_environment

configure_environment()  # the commands' defaults: W&B offline, no albumentations update check

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(
    os.environ.get("CHANGECAM_SAMPLES", REPO.parent / "shared" / "data" / "levir-cd-256-samples")
)
# committed: SAMPLES downscaled to 64 px, same names and lists (tests/fixtures/make_fixtures.py)
LEVIR256_TINY = REPO / "tests" / "fixtures" / "levir256_tiny"

TINY_SPEC = SyntheticSpec(image_size=64, train=4, val=2, test=2, seed=3)


def script_module(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_train(tmp_path: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose a config the way ``train.py`` (or ``config_name``'s command) does, with outputs
    under ``tmp_path`` and no config printout."""
    cfg = compose_config(config_name, overrides, tmp_path)
    with open_dict(cfg):
        cfg.print_config = False
    return cfg


# ReduceLROnPlateau in place of the cosine schedule, following val/f1 as it must (mode max)
PLATEAU = (
    "module.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
    "~module.scheduler.T_max",
    "+module.scheduler.mode=max",
)

# the tiny network of tiny_overrides: a width-4, depth-2 Siamese U-Net
TINY_UNET = ("model.base_channels=4", "model.depth=2")


def tiny_overrides(synthetic_root: Path, model: Sequence[str] = TINY_UNET) -> list[str]:
    """Overrides that make any experiment tiny: 32 px tiles of the 64 px synthetic set, and the
    ``model`` overrides (default: width 4, depth 2; other architectures pass their own)."""
    return [
        f"data.root={synthetic_root}",
        "data.synthetic=null",
        "data.layout=levir",
        "data.train_protocol=tiles",
        "data.eval_protocol=tiles",
        "data.patch_size=32",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
        *model,
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]


def quiet_trainer(**kwargs):
    """A CPU ``lightning.Trainer`` without logger, progress bar or model summary."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def run_script(
    script: str,
    args: list[str],
    cwd: Path,
    timeout: float = 600,
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
):
    """Run one of the repository's scripts (``train.py``, ``eval.py``, ...) in a fresh
    interpreter with one torch thread; with ``check``, require it to succeed.

    Args:
        script: file name in the repository root.
        args: its command-line arguments (Hydra overrides).
        cwd: working directory.
        timeout: seconds before the run counts as hung.
        check: assert a zero exit status (showing the end of the output otherwise).
        env: extra environment variables (e.g. ``HYDRA_FULL_ERROR=0`` for error-message tests).
    """
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **(env or {})}
    full_env.pop("CHANGECAM_ROOT", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def paused_after(target: str, count: int, command: Sequence[str]) -> list[str]:
    """``command`` (``[python, script, *args]``) run through ``tests/pause_after.py``: the
    function ``target`` (``module:Qual.name``) pauses after its ``count``-th call."""
    python, script, *args = command
    return [
        python,
        str(Path(__file__).with_name("pause_after.py")),
        target,
        str(count),
        script,
        *args,
    ]


def kill_when_logged(
    proc: subprocess.Popen, log: Path, marker: str, count: int = 3, timeout: float = 300
) -> None:
    """SIGKILL ``proc`` once ``log`` holds ``marker`` at least ``count`` times (the run is then
    mid-way); fails if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count(marker) >= count:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

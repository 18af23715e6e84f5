"""A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` that never keeps a non-finite score.

Lightning ranks a NaN monitored value as the worst one, but while fewer than ``save_top_k``
checkpoints exist it still saves it: a NaN at the first validation becomes ``best.ckpt`` and
``best_model_path``. The ChangeDetectionModule stops a diverged run before the checkpoint
callbacks run (:class:`~changecam.training.module.DivergenceError`); this callback is the
second guard, for modules that log their own metrics.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from changecam.atomic import atomic_open
from changecam.training.callbacks.step_checkpoint import StepCheckpoint


def rename_legacy_states(callbacks: Sequence[Any], checkpoint: dict[str, Any]) -> None:
    """Put a callback's state that ``checkpoint`` holds under its legacy key (a string
    ``_legacy_state_key``: :attr:`StepCheckpoint._legacy_state_key`) under its own
    key, before Lightning restores the callbacks: it reads the legacy key too, but warns that
    the callback that wrote it is missing ("Please add the following callbacks")."""
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict):
        return
    for callback in callbacks:
        legacy = getattr(callback, "_legacy_state_key", None)
        if isinstance(legacy, str) and legacy in states and callback.state_key not in states:
            states[callback.state_key] = states.pop(legacy)


class FiniteModelCheckpoint(StepCheckpoint):
    """``ModelCheckpoint`` whose monitored checkpoints (``best.ckpt``) hold finite scores only.

    Raises:
        ValueError: ``save_top_k`` keeps more than one checkpoint under one file name (without
            ``{epoch}`` or another field in ``filename``): each would overwrite the last, or
            with the version counter the plain name would hold the latest kept one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        problem = top_k_problem(self.save_top_k, self.filename)
        if problem:
            raise ValueError(problem)

    _fitting = False

    _fit_trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = trainer.state.fn == TrainerFn.FITTING  # states are loaded after setup
        self._fit_trainer = trainer  # its ckpt_path is known when the states are loaded

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, except that a run resumed into another folder (``ckpt_path=<.ckpt>``)
        keeps the earlier run's best checkpoints: Lightning forgets their scores there, so the
        first validation after the resume became ``best.ckpt`` however bad it was. They are
        copied into this run's folder, which thus holds its own best, with their scores; a run
        folder moved or copied with its checkpoints keeps them where they are now (a file is
        taken for a best one only if it records that score)."""
        earlier = state_dict.get("dirpath", self.dirpath)
        super().load_state_dict(state_dict)
        if earlier == self.dirpath or self.dirpath is None or not self._fitting:
            return  # scoring a checkpoint (validate, test) keeps no best of its own
        if state_dict.get("monitor") != self.monitor or not state_dict.get("best_k_models"):
            return
        # each best file is looked for where it was recorded, beside the checkpoint resumed (a
        # run folder moved or copied with its checkpoints) and in this folder; a file is taken
        # only if its own state records its score (another run's may sit at any of them), one
        # that also records the recorded path first (two runs can tie, e.g. at f1 0)
        resumed = self._fit_trainer.ckpt_path if self._fit_trainer is not None else None
        kept: dict[str, Tensor] = {}
        copies: dict[str, str] = {}
        for path, score in state_dict["best_k_models"].items():
            name = Path(path).name
            target = Path(self.dirpath) / name
            places = [Path(path), *([Path(resumed).parent / name] if resumed else []), target]
            matches = [(self._saved_as(c, path, score), i, c) for i, c in enumerate(places)]
            best_match = max(matches, key=lambda m: (m[0], -m[1]))
            found = best_match[2] if best_match[0] > 0 else None
            if found is None:
                rank_zero_warn(
                    f"the resumed run's earlier best checkpoint {path} is gone (nor beside "
                    f"{resumed}): the best {self.monitor} is counted anew from this run's "
                    "validations"
                )
                # Lightning restored the gone file as the best: scoring would load it
                self.best_model_path, self.best_model_score = "", None
                return
            if not same_file(found, target):
                copies[str(target)] = str(found)
            kept[str(target)] = score
        if rank_zero_only.rank == 0:  # the rank that writes checkpoints
            for target, source in copies.items():
                with open(source, "rb") as src, atomic_open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        pick = min if self.mode == "min" else max
        self.best_k_models = kept
        self.best_model_path = pick(kept, key=lambda p: float(kept[p]))
        self.best_model_score = kept[self.best_model_path]
        self.kth_best_model_path = (max if self.mode == "min" else min)(
            kept, key=lambda p: float(kept[p])
        )
        self.kth_value = kept[self.kth_best_model_path]

    def _saved_as(self, path: Path, recorded: str, score: Any) -> int:
        """How surely ``path`` is the best checkpoint recorded at ``recorded`` with ``score``: 2
        when its own state (this callback's, as saved with it) holds that score as the one it
        was saved for (``current_score``) and lists ``recorded`` among its best, 1 when it holds
        the score only (a copy an earlier resume made lists the folder it came from), else 0."""
        if not path.is_file():
            return 0
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a checkpoint torch reads: not this one
            return 0
        states = saved.get("callbacks", {}) if isinstance(saved, dict) else {}
        wanted = float(torch.as_tensor(score))
        sure = 0
        for state in states.values():
            if not isinstance(state, dict) or state.get("monitor") != self.monitor:
                continue
            current = state.get("current_score")
            if current is None or float(torch.as_tensor(current)) != wanted:
                continue
            sure = max(sure, 2 if recorded in (state.get("best_k_models") or {}) else 1)
        return sure

    def check_monitor_top_k(self, trainer: Trainer, current: Tensor | None = None) -> bool:
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            rank_zero_warn(
                f"{self.monitor}={float(current)} at epoch {trainer.current_epoch} is not finite: "
                "no checkpoint is saved for it and it cannot become the best"
            )
            return False
        return super().check_monitor_top_k(trainer, current)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through a symlink or a relative path too)."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def top_k_problem(save_top_k: Any, filename: str | None) -> str | None:
    """Why these settings would keep the wrong checkpoint, or ``None``: several kept under one
    file name (no field in ``filename``) overwrite each other, and with Lightning's version
    counter the plain name holds the latest kept one, not the best."""
    if save_top_k in (0, 1) or not isinstance(save_top_k, int) or "{" in (filename or "{"):
        return None
    return (
        f"callbacks.model_checkpoint.save_top_k={save_top_k} keeps several checkpoints, but all "
        f"under the name {filename!r}: each would overwrite the last, leaving the latest kept "
        "one, not the best; add a field to the name, e.g. "
        "callbacks.model_checkpoint.filename='best-{epoch:03d}'"
    )

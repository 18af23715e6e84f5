"""Random number generator states in checkpoints, so a resumed run draws what it would have.

Lightning restores weights, optimiser, schedulers and loop counters, but not the RNGs. The
datasets draw each sample's augmentation seed from torch's global generator and the training
loader shuffles with it, so without the states a resumed run sees different batches than an
uninterrupted one. :class:`RNGStateCallback` stores the states of torch (CPU and the current
CUDA device), NumPy's global generator and Python's ``random`` — one set per DDP rank — as
plain tensors (checkpoints stay loadable with ``torch.load(weights_only=True)``) and restores
them when training resumes.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

CHECKPOINT_KEY = "rng_states"


def capture_rng_states() -> dict[str, Tensor]:
    """This process's RNG states as tensors."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    _, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss, cached_gaussian], dtype=torch.float64),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": torch.tensor(
            [gauss_next is not None, gauss_next or 0.0], dtype=torch.float64
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Tensor]) -> None:
    """Set this process's RNGs from :func:`capture_rng_states` output."""
    torch.set_rng_state(states["torch"].cpu().to(torch.uint8))
    pos, has_gauss, cached_gaussian = states["numpy_rest"].tolist()
    np.random.set_state(
        (
            "MT19937",
            states["numpy_keys"].cpu().numpy().astype(np.uint32),
            int(pos),
            int(has_gauss),
            float(cached_gaussian),
        )
    )
    has_next, gauss_next = states["python_gauss"].tolist()
    random.setstate((3, tuple(states["python"].tolist()), gauss_next if has_next else None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].cpu().to(torch.uint8))


class RNGStateCallback(L.Callback):
    """Save every rank's RNG states into checkpoints; restore them when a fit resumes.

    The states are captured when the checkpoint is written and set again where the resumed
    fit reaches the point the uninterrupted run went on from. After a checkpoint written at an
    epoch's end that is the fit's start (``on_fit_start``): Lightning then draws nothing
    before it creates the training loader's iterator (its sanity check runs under
    ``isolate_rng``), just as the uninterrupted run draws nothing between writing the
    checkpoint and starting the next epoch. After one written by a validation Lightning counts
    inside its epoch (``trainer.val_check_interval`` < 1, or every
    ``check_val_every_n_epoch`` > 1 epochs) it is again at ``on_train_start``: the resumed fit
    has by then created a loader iterator (a draw from torch's generator) that the
    uninterrupted run did not create at that point.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Tensor] | None = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = capture_rng_states()
        if trainer.world_size > 1:  # every rank runs this hook; gather to rank 0's file
            states = {
                k: trainer.strategy.all_gather(v.to(pl_module.device)).cpu()
                for k, v in states.items()
            }
        else:
            states = {k: v.unsqueeze(0) for k, v in states.items()}
        checkpoint[CHECKPOINT_KEY] = states

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            rank_zero_warn(
                "the checkpoint holds no RNG states: the resumed run draws other augmentations "
                "than an uninterrupted one would"
            )
            return
        saved_world = next(iter(states.values())).shape[0]
        if saved_world != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds RNG states of {saved_world} processes but this run has "
                f"{trainer.world_size}: RNG states are not restored"
            )
            return
        # a copy of the rank's row: torch.set_rng_state crashes the process on a view that
        # does not start its storage (rank >= 1)
        self._pending = {k: v[trainer.global_rank].clone() for k, v in states.items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the loops' counters are restored and judged by now (not yet at on_fit_start)
        if self._pending is not None and trainer.fit_loop.restarted_mid_epoch:
            restore_rng_states(self._pending)
        self._pending = None

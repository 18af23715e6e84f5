"""Training throughput of the quickstart on a GPU in fp32 and in bf16 mixed precision.

``python benchmarks/gpu_precision.py`` composes ``experiment=quickstart trainer=gpu`` (data
written to a temporary folder), and trains one epoch with ``trainer.precision=32-true`` and
one with ``bf16-mixed`` in the same process, from the same weights and batches. The training
epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (validation excluded,
CUDA synchronised); patches/s is the number of training patches over that time. A first,
discarded fp32 epoch warms CUDA and cuDNN up. Without a CUDA GPU the script says so and
measures nothing; ``--tiny`` runs the same code on the CPU with a tiny model (a smoke test,
not a figure to report).

Last line: ``{"fp32_patches_per_s", "bf16_patches_per_s", "bf16_speedup", "machine", ...}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from common import emit, machine
from omegaconf import DictConfig

from changecam.cli.common import compose_config

SEED = 1234
TINY = [
    "trainer=cpu",
    "data.synthetic.image_size=64",
    "data.synthetic.train=4",
    "data.synthetic.val=2",
    "data.synthetic.test=2",
    "data.patch_size=32",
    "model.base_channels=4",
    "model.depth=2",
]


class EpochTimer(L.Callback):
    """Wall time and number of samples of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.samples: list[int] = []

    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)
        self._count = 0
        self._start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
    ) -> None:
        self._count += batch["pre"].shape[0]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)
        self.seconds.append(time.perf_counter() - self._start)
        self.samples.append(self._count)


def compose_quickstart(root: Path, overrides: list[str]) -> DictConfig:
    return compose_config("train", overrides, root)


def epoch_throughput(cfg: DictConfig, precision: str, state: dict[str, torch.Tensor]) -> float:
    """Patches/s of one training epoch at ``precision`` from the weights ``state``."""
    L.seed_everything(SEED, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model)
    net.load_state_dict(state)
    module = hydra.utils.instantiate(cfg.module, net=net)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.samples[0] / timer.seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model")
    args = parser.parse_args()
    figures: dict[str, Any] = {"machine": machine()}
    if not args.tiny and not torch.cuda.is_available():
        figures["skipped"] = "no CUDA GPU on this machine: fp32 vs bf16-mixed not measured"
        emit(figures)
        return
    overrides = ["experiment=quickstart", "logger=none", *(TINY if args.tiny else ["trainer=gpu"])]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_quickstart(Path(tmp), overrides)
        torch.manual_seed(SEED)
        state = hydra.utils.instantiate(cfg.model).state_dict()
        if not args.tiny and not torch.cuda.is_bf16_supported():
            figures["skipped"] = f"{torch.cuda.get_device_name()} has no bfloat16 support"
            emit(figures)
            return
        precisions = ("32-true", "bf16-mixed")
        for precision in precisions:  # warm-up of each (first-use kernels), discarded
            epoch_throughput(cfg, precision, state)
        rounds: dict[str, list[float]] = {p: [] for p in precisions}
        for round_ in range(1 if args.tiny else 3):  # alternating, best of the rounds
            for precision in precisions if round_ % 2 == 0 else precisions[::-1]:
                rounds[precision].append(epoch_throughput(cfg, precision, state))
        fp32, bf16 = (max(rounds[p]) for p in precisions)
    figures.update(
        {
            "setup": "experiment=quickstart, one training epoch each, same weights and batches, "
            "each precision warmed up, best of alternating rounds"
            + (" (--tiny: CPU smoke run)" if args.tiny else ", trainer=gpu"),
            "fp32_patches_per_s": round(fp32, 1),
            "bf16_patches_per_s": round(bf16, 1),
            "bf16_speedup": round(bf16 / fp32, 3),
            "patches_per_s_per_round": {p: [round(x, 1) for x in v] for p, v in rounds.items()},
        }
    )
    emit(figures)


if __name__ == "__main__":
    main()

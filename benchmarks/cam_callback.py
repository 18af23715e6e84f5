"""Cost of the CAM-panel callback: a validation epoch with it / without it, side by side.

The quickstart setting: synthetic 256² images (12 validation pairs -> 48 tiles of 128²), the
quickstart network (width 8, depth 4), ``k=8`` fixed samples, default callback settings. Each
repetition fits one (one-batch) training epoch with and then without the callback and times
the validation epoch from its first to its last hook; the figure is the ratio of the medians.

    python benchmarks/cam_callback.py [--reps 5] [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import emit, machine, median

from changecam.callbacks.cam_panels import CamPanels
from changecam.data import ChangeDetectionDataModule, SyntheticSpec
from changecam.models import SiameseUNet
from changecam.module import ChangeDetectionModule


class ValEpochTimer(L.Callback):
    """Wall-clock time of each validation epoch of fitting, hooks included."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def val_epoch_time(
    datamodule, net_state, out_dir: Path, k: int | None, base: int, depth: int
) -> float:
    net = SiameseUNet(3, base, depth)
    net.load_state_dict(net_state)
    module = ChangeDetectionModule(net, optimizer=lambda params: torch.optim.AdamW(params, lr=0.0))
    timer = ValEpochTimer()
    callbacks = ([CamPanels(out_dir, k=k)] if k else []) + [timer]  # the timer's end hook runs last
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    args = parser.parse_args()
    spec = SyntheticSpec(image_size=64, train=2, val=2, test=1) if args.tiny else SyntheticSpec()
    patch, base, depth, k = (32, 4, 2, 2) if args.tiny else (128, 8, 4, 8)
    reps = 1 if args.tiny else args.reps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dm = ChangeDetectionDataModule(
            tmp / "synthetic",
            layout="levir",
            patch_size=patch,
            batch_size=8,
            eval_batch_size=16,
            synthetic=spec,
        )
        dm.prepare_data()
        state = SiameseUNet(3, base, depth).state_dict()
        val_epoch_time(dm, state, tmp / "cam", None, base, depth)  # warm-up
        with_cb, without = [], []
        for rep in range(reps):
            with_cb.append(val_epoch_time(dm, state, tmp / f"cam{rep}", k, base, depth))
            without.append(val_epoch_time(dm, state, tmp / "none", None, base, depth))
    figures = {
        "val_epoch_ratio_with_callback": median(with_cb) / median(without),
        "val_epoch_s_with_callback": median(with_cb),
        "val_epoch_s_without_callback": median(without),
        "k": k,
        "val_patches": len(dm.dataset("val")),
        "reps": reps,
        "machine": machine(),
    }
    print(
        f"validation epoch: {median(without):.3f} s plain, {median(with_cb):.3f} s with CamPanels(k={k})"
    )
    emit(figures)


if __name__ == "__main__":
    main()

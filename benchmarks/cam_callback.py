"""Cost of the CAM-panel callback: validation epochs and whole fits with it / without it.

The quickstart setting: synthetic 256² images (48 training pairs -> 192 tiles, 12 validation
pairs -> 48 tiles of 128²), the quickstart network (width 8, depth 4), ``k=8`` fixed samples,
default callback settings. Fits of ``--epochs`` full epochs run side by side:

* with the quickstart's torch threads (all cores): without the callback, with it in
  ``background`` mode (a CPU process explains a copy of the weights while training goes on)
  and in ``inline`` mode (all the work inside the validation epoch); the default ``auto`` mode
  is whichever of the two it picks here;
* with one core left free (torch threads = cores - 1, as on a GPU machine where the CPU
  mostly waits): without the callback and in ``background`` mode.

Each validation epoch is timed from its first to its last hook; a whole fit includes waiting
for the last epoch's panels. The figures are ratios of medians (validation epochs) and of
totals (fits) against the fit without the callback in the same setting.

    python benchmarks/cam_callback.py [--epochs 3] [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import emit, machine, median

from changecam.data import ChangeDetectionDataModule, SyntheticSpec
from changecam.environment import usable_cores
from changecam.models import SiameseUNet
from changecam.training.callbacks.cam_panels import CamPanels
from changecam.training.module import ChangeDetectionModule


class EpochTimer(L.Callback):
    """Wall-clock time of each training epoch and each validation epoch (hooks included)."""

    def __init__(self) -> None:
        self.val: list[float] = []
        self.train: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:  # before validation starts
            self.train.append(time.perf_counter() - self._train_start)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append(time.perf_counter() - self._val_start)


def fit(datamodule, out_dir: Path, mode: str, k: int, base: int, depth: int, epochs: int, batches):
    """One fit: (its epoch timer, whole fit seconds)."""
    torch.manual_seed(0)
    net = SiameseUNet(3, base, depth)
    module = ChangeDetectionModule(net, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    timer = EpochTimer()
    cam = [] if mode == "none" else [CamPanels(out_dir, k=k, mode=mode)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*cam, timer],  # the timer's end hooks run last
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return timer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    args = parser.parse_args()
    spec = SyntheticSpec(image_size=64, train=2, val=2, test=1) if args.tiny else SyntheticSpec()
    patch, base, depth, k = (32, 4, 2, 2) if args.tiny else (128, 8, 4, 8)
    epochs = 2 if args.tiny else args.epochs
    threads, cores = torch.get_num_threads(), usable_cores()
    settings = {"all_threads": (threads, ("none", "background", "inline"))}
    if cores > 1:
        settings["spare_core"] = (min(threads, cores - 1), ("none", "background"))
    runs: dict[str, dict[str, tuple]] = {}
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
        fit(dm, tmp / "warmup", "none", k, base, depth, 1, 1)
        for name, (n_threads, modes) in settings.items():
            torch.set_num_threads(n_threads)
            runs[name] = {
                m: fit(dm, tmp / name / m, m, k, base, depth, epochs, None) for m in modes
            }
        torch.set_num_threads(threads)
        module = ChangeDetectionModule(SiameseUNet(3, base, depth), optimizer=torch.optim.AdamW)
        auto = CamPanels(tmp, mode="auto")._background(module)
        train_batches = len(dm.train_dataloader())

    def val_ratio(name: str, mode: str) -> float:
        return median(runs[name][mode][0].val) / median(runs[name]["none"][0].val)

    def fit_ratio(name: str, mode: str) -> float:
        return runs[name][mode][1] / runs[name]["none"][1]

    default_mode = "background" if auto else "inline"
    figures = {
        "val_epoch_ratio_with_callback": val_ratio("all_threads", default_mode),
        "auto_mode_picks": default_mode,
        "val_epoch_ratio_background": val_ratio("all_threads", "background"),
        "val_epoch_ratio_inline": val_ratio("all_threads", "inline"),
        "fit_ratio_background": fit_ratio("all_threads", "background"),
        "fit_ratio_inline": fit_ratio("all_threads", "inline"),
        "torch_threads": threads,
        "k": k,
        "epochs": epochs,
        "train_batches_per_epoch": train_batches,
        "val_patches": len(dm.dataset("val")),
        "machine": machine(),
    }
    if "spare_core" in runs:
        figures["spare_core_torch_threads"] = settings["spare_core"][0]
        figures["val_epoch_ratio_background_spare_core"] = val_ratio("spare_core", "background")
        figures["fit_ratio_background_spare_core"] = fit_ratio("spare_core", "background")
    seconds = {}
    for name, by_mode in runs.items():
        for mode, (timer, total) in by_mode.items():
            seconds[f"{name}/{mode}"] = {
                "train_epochs": [round(t, 2) for t in timer.train],
                "val_epochs": [round(t, 3) for t in timer.val],
                "fit": round(total, 2),
            }
            print(
                f"{name:>11} {mode:>10}: training epochs "
                f"{', '.join(f'{t:.2f}' for t in timer.train)} s, validation epochs "
                f"{', '.join(f'{t:.2f}' for t in timer.val)} s, fit {total:.1f} s"
            )
    figures["seconds"] = seconds
    emit(figures)


if __name__ == "__main__":
    main()

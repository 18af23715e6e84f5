"""The LEVIR-CD recipe at full scale, checked without LEVIR-CD: a synthetic dataset with
LEVIR-CD's exact structure, ``experiment=siamese_unet`` on it for a bounded number of batches,
per-batch times, and the CAM callback's share of a full LEVIR-CD epoch.

* Structure: the official layout ``{train,val,test}/{A,B,label}/<split>_<n>.png`` with
  445/64/128 images of 1024², i.e. 7,120/1,024/2,048 tiles of 256² (checked through the
  datamodule). To stay within minutes, ``--scenes`` distinct 1024² scenes per split are
  rendered and the other names are hard links to them (the loader, the tiles and the per-batch
  cost do not depend on the content). Each 1024² scene is a 4 × 4 mosaic of 256² synthetic
  scenes: the current generator places no changed building at ``image_size=1024`` (its
  unchanged buildings fill the room first; ``scripts/real_stats.py``), while its 256² scenes
  have LEVIR-like building sizes and change.
* Run: ``train.py experiment=siamese_unet`` (width 32, the default callbacks with the CAM
  panels at k = 8) with ``trainer.limit_train_batches`` / ``limit_val_batches`` /
  ``limit_test_batches`` and one epoch: fit, validate and test end to end.
* Times: wall time of every training, validation and test batch (the first of each loop
  dropped as warm-up, median of the rest), and the CAM callback's own time at its validation
  epoch end, measured between two timer callbacks placed just before and after it (inline mode;
  in background mode it runs in another process and costs the loop only the hand-over).
* Share of a full LEVIR-CD epoch: ``cam / (890 × train batch + 128 × val batch + cam)`` at
  batch 8 (7,120 and 1,024 tiles). Target ≤ 5 %.

    python benchmarks/full_scale.py [--train-batches 3] [--val-batches 3] [--scenes 2] [--tiny]

Not part of ``make bench`` (run on its own: ``make bench-full``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from common import emit, machine, timed
from omegaconf import open_dict

from changecam.cli.common import close_wandb, compose_config
from changecam.cli.train import train
from changecam.data.io import write_png
from changecam.data.synthetic import SyntheticSpec, generate_pair

LEVIR_IMAGES = {"train": 445, "val": 64, "test": 128}
LEVIR_TILES = {"train": 7120, "val": 1024, "test": 2048}
SIDE, TILE = 1024, 256


def mosaic(split: str, scene: int, tile: int = TILE, side: int = SIDE) -> tuple[np.ndarray, ...]:
    """A ``side``² (pre, post, label) made of (side/tile)² synthetic ``tile``² scenes."""
    per_row = side // tile
    spec = SyntheticSpec(image_size=tile, seed=0)
    parts = [
        generate_pair(spec, split, scene * per_row**2 + k) for k in range(per_row**2)
    ]  # (pre, post, label) of each cell
    out = []
    for j in range(3):
        rows = [
            np.concatenate([parts[r * per_row + c][j] for c in range(per_row)], axis=1)
            for r in range(per_row)
        ]
        out.append(np.concatenate(rows, axis=0))
    return tuple(out)


def write_levir_structure(
    root: Path, images: dict[str, int], scenes: int, side: int = SIDE, tile: int = TILE
) -> Path:
    """The official layout with ``images[split]`` files per folder, ``scenes`` rendered per split
    and the rest hard-linked to them."""
    for split, count in images.items():
        rendered = []
        for s in range(min(scenes, count)):
            pre, post, label = mosaic(split, s, tile, side)
            paths = [root / split / sub / f"{split}_{s + 1}.png" for sub in ("A", "B", "label")]
            for path, array in zip(paths, (pre, post, label * 255), strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(path, array)
            rendered.append(paths)
        for n in range(len(rendered), count):
            for source in rendered[n % len(rendered)]:
                os.link(source, source.parent / f"{split}_{n + 1}.png")
    return root


class Clock:
    """Shared state of the timer callbacks (one benchmark run at a time)."""

    batches: dict[str, list[float]] = {"train": [], "val": [], "test": []}
    started: dict[str, float] = {}
    cam_epoch_end: list[float] = []
    cam_t0 = 0.0

    @classmethod
    def reset(cls) -> None:
        cls.batches = {"train": [], "val": [], "test": []}
        cls.started, cls.cam_epoch_end = {}, []


def finished(trainer: L.Trainer) -> float:
    """``time.perf_counter()`` once the queued device work is done (CUDA runs asynchronously:
    without this a batch's time would land in whatever synchronises next, e.g. the CAMs)."""
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class BatchTimer(L.Callback):
    """Wall time of every batch of each loop, its device work finished."""

    def _stage(self, trainer: L.Trainer) -> str | None:
        if trainer.sanity_checking:
            return None
        return "test" if trainer.testing else "val"

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        Clock.started["train"] = finished(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        Clock.batches["train"].append(finished(trainer) - Clock.started["train"])

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        Clock.started["val"] = finished(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stage = self._stage(trainer)
        if stage is not None:
            Clock.batches[stage].append(finished(trainer) - Clock.started["val"])

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        Clock.started["test"] = finished(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        Clock.batches["test"].append(finished(trainer) - Clock.started["test"])


class CamStart(L.Callback):
    """Placed just before the CAM callback: its validation-epoch-end work starts here."""

    def on_validation_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        Clock.cam_t0 = finished(trainer)


class CamEnd(L.Callback):
    """Placed just after the CAM callback: its validation-epoch-end work ends here."""

    def on_validation_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        Clock.cam_epoch_end.append(finished(trainer) - Clock.cam_t0)


def timer(name: str) -> dict[str, str]:
    return {"_target_": f"{__name__}.{name}"}


def median_after_warmup(values: list[float]) -> float | None:
    """Median of the batch times without the first (warm-up); ``None`` without batches."""
    kept = values[1:] if len(values) > 1 else values
    return round(statistics.median(kept), 3) if kept else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-batches", type=int, default=3)
    parser.add_argument("--val-batches", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=2, help="rendered scenes per split")
    parser.add_argument("--tiny", action="store_true", help="128² images, 32² tiles, width 4")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args(argv)
    side, tile, width = (128, 32, 4) if args.tiny else (SIDE, TILE, 32)
    images = {"train": 5, "val": 3, "test": 3} if args.tiny else LEVIR_IMAGES
    Clock.reset()
    with tempfile.TemporaryDirectory(prefix="changecam-full-") as tmp_dir:
        tmp = Path(tmp_dir)
        gen_s, root = timed(
            lambda: write_levir_structure(tmp / "LEVIR-CD", images, args.scenes, side, tile)
        )
        overrides = [
            "experiment=siamese_unet",
            f"data.root={root}",
            f"model.base_channels={width}",
            "trainer.max_epochs=1",
            f"+trainer.limit_train_batches={args.train_batches}",
            f"+trainer.limit_val_batches={args.val_batches}",
            f"+trainer.limit_test_batches={args.val_batches}",
            "trainer.enable_progress_bar=false",
            "callbacks.progress_bar=null",
            "logger=csv",
            # inline: the callback's work in the loop, where it can be timed (background mode
            # runs it in an idle-priority process, which a loaded machine can starve for minutes)
            "callbacks.cam_panels.mode=inline",
            *(
                [f"data.patch_size={tile}", "model.depth=2", "callbacks.cam_panels.k=2"]
                if args.tiny
                else []
            ),
            *args.override,
        ]
        cfg = compose_config("train", overrides, tmp / "out")
        with open_dict(cfg):
            cfg.print_config = False
            callbacks = dict(cfg.callbacks)
            cam = callbacks.pop("cam_panels")
            cfg.callbacks = {
                "batch_timer": timer("BatchTimer"),
                **callbacks,
                "cam_start": timer("CamStart"),
                "cam_panels": cam,
                "cam_end": timer("CamEnd"),
            }
        from changecam.data import ChangeDetectionDataModule

        data = ChangeDetectionDataModule(root, layout="levir", patch_size=tile)
        tiles = {s: len(data.dataset(s)) for s in images}
        run_s, metrics = timed(lambda: train(cfg))
        close_wandb()
    batch = int(cfg.data.batch_size)
    t_train = median_after_warmup(Clock.batches["train"])
    t_val = median_after_warmup(Clock.batches["val"])
    cam_s = round(statistics.median(Clock.cam_epoch_end), 3) if Clock.cam_epoch_end else None
    figures: dict[str, Any] = {
        "machine": machine(),
        "images": images,
        "tiles": tiles,
        "levir_structure": tiles == LEVIR_TILES,
        "generate_s": round(gen_s, 1),
        "run_s": round(run_s, 1),
        "width": width,
        "batch_size": batch,
        "cam_k": int(cam.k),
        "train_batch_s": t_train,
        "val_batch_s": t_val,
        "test_batch_s": median_after_warmup(Clock.batches["test"]),
        "batches_timed": {k: len(v) for k, v in Clock.batches.items()},
        "cam_epoch_end_s": cam_s,
        "val_f1": metrics.get("val/f1"),
    }
    if None not in (t_train, t_val, cam_s):
        full_train = -(-LEVIR_TILES["train"] // batch) * t_train
        full_val = -(-LEVIR_TILES["val"] // int(cfg.data.eval_batch_size)) * t_val
        epoch = full_train + full_val + cam_s
        figures["levir_epoch_s"] = round(epoch, 1)
        figures["cam_share_of_levir_epoch"] = round(cam_s / epoch, 5)
    emit(figures)
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

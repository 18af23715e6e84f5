"""Loader throughput: changecam's training loader versus a naive one, side by side.

On LEVIR-format 1024² tiles (synthetic, written to a temporary folder) with the ``tiles``
protocol at 256² and the LEVIR-CD training augmentations (``conf/data/levir_cd.yaml``), one
DataLoader worker each:

* **changecam**: ``ChangeDetectionDataModule.train_dataloader()`` as training uses it (the
  per-worker decoded-image cache plus :class:`~changecam.data.ImageGroupedSampler`);
* **naive**: the seed notebook's way, reading A, B and label in full for every patch (same
  decoder, crop, augmentation and tensors; plain shuffle);
* **random order** (ablation): changecam's cached dataset under a plain shuffle, i.e. without
  the sampler.

Every measurement starts a fresh loader (worker start-up and empty caches included) and runs
until its last batch; repeats alternate between the loaders, and the best of each are
compared, as ``timeit`` does (interference from other processes only ever slows a loader).
The naive and random-order loaders run for ``--naive-batches`` batches (their cost per patch
does not fall over an epoch); changecam's for a whole epoch (it pays its decodes up front).

Last line: ``{"loader_speedup_vs_naive", "loader_patches_per_s", ...}``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import REPO, emit, machine, timed
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from changecam.data import ChangeDetectionDataModule, SyntheticSpec, generate
from changecam.data.dataset import ChangeDetectionDataset
from changecam.data.io import read_image, read_label
from changecam.data.transforms import image_to_tensor, mask_to_tensor


class NaiveTiles(Dataset):
    """Tiles of ``base``'s images, decoding the full pre, post and label files for every tile."""

    def __init__(self, base: ChangeDetectionDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        i, row, col = self.base.index[index]
        t = self.base.triplets[i]
        pre, post, mask = read_image(t.pre), read_image(t.post), read_label(t.label)
        ps = self.base.patch_size
        pre, post, mask = (a[row : row + ps, col : col + ps] for a in (pre, post, mask))
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        if self.base.transform is not None:
            pre, post, mask = self.base.transform(pre, post, mask, seed)
        return {
            "pre": image_to_tensor(pre),
            "post": image_to_tensor(post),
            "mask": mask_to_tensor(mask),
            "name": t.name,
        }


def worker_peak_rss_mib(iterator: Any) -> float | None:
    """Peak RSS (VmHWM) of the first worker of a live multi-process DataLoader iterator."""
    workers = getattr(iterator, "_workers", None)
    if not workers:
        return None
    status = Path(f"/proc/{workers[0].pid}/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def patches_per_s(loader: DataLoader, batches: int | None) -> tuple[float, float | None]:
    """Throughput from a fresh iterator to its ``batches``-th batch, and the worker's peak RSS."""

    def run() -> tuple[int, float | None]:
        iterator = iter(loader)
        count = sum(len(b["name"]) for b in itertools.islice(iterator, batches))
        rss = worker_peak_rss_mib(iterator)
        del iterator
        return count, rss

    seconds, (count, rss) = timed(run)
    gc.collect()  # let the persistent worker go before the next measurement
    return count / seconds, rss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="training images")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-batches", type=int, default=6)
    parser.add_argument("--root", type=Path, help="an existing LEVIR-layout dataset instead")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.image_size, args.patch_size, args.batch_size = 6, 128, 32, 4
        args.repeats, args.naive_batches = 1, 2
    augment = OmegaConf.to_container(OmegaConf.load(REPO / "conf/data/levir_cd.yaml").augment)

    with tempfile.TemporaryDirectory(prefix="changecam-loader-") as tmp:
        root = args.root
        if root is None:
            spec = SyntheticSpec(image_size=args.image_size, train=args.images, val=0, test=0)
            seconds, root = timed(lambda: generate(Path(tmp) / "levir", spec))
            print(f"generated {args.images} synthetic {args.image_size}² pairs in {seconds:.1f} s")
        dm = ChangeDetectionDataModule(
            root,
            layout="levir",
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            augment=augment,
        )
        dataset = dm.dataset("train")
        loader_kwargs = dict(
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        results: dict[str, list[float]] = {"changecam": [], "naive": [], "random_order": []}
        rss: dict[str, float | None] = {}
        for repeat in range(args.repeats):
            torch.manual_seed(repeat)
            loaders = {
                "naive": (DataLoader(NaiveTiles(dataset), **loader_kwargs), args.naive_batches),
                "changecam": (dm.train_dataloader(), None),
                "random_order": (DataLoader(dataset, **loader_kwargs), args.naive_batches),
            }
            for name, (loader, batches) in loaders.items():
                speed, rss[name] = patches_per_s(loader, batches)
                results[name].append(speed)
                print(f"repeat {repeat}: {name:>12} {speed:7.1f} patches/s")
            del loaders
            gc.collect()

    changecam, naive = max(results["changecam"]), max(results["naive"])
    cache_mib = dm.cache_images * 7 * args.image_size**2 / 2**20
    figures = {
        "loader_speedup_vs_naive": round(changecam / naive, 2),
        "loader_patches_per_s": round(changecam, 1),
        "naive_patches_per_s": round(naive, 1),
        "random_order_speedup_vs_naive": round(max(results["random_order"]) / naive, 2),
        "loader_cache_mib_per_worker": round(cache_mib, 1),
        "worker_peak_rss_mib": {k: None if v is None else round(v, 1) for k, v in rss.items()},
        "setup": {
            "images": len(dataset.triplets),
            "image_size": args.image_size,
            "patch_size": args.patch_size,
            "patches_per_epoch": len(dataset),
            "batch_size": args.batch_size,
            "workers": args.workers,
            "cache_images": dm.cache_images,
            "repeats": args.repeats,
            "augment": augment,
            "dataset": str(args.root) if args.root else "synthetic",
        },
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

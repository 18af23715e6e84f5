"""LightningDataModule over LEVIR-style folders (real or synthetic)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from changecam.data.dataset import ChangeDetectionDataset, Protocol
from changecam.data.layout import Layout, Split, find_triplets
from changecam.data.sampler import ImageGroupedSampler
from changecam.data.synthetic import SyntheticSpec, generate
from changecam.data.transforms import PairTransform
from changecam.environment import usable_cores


class ChangeDetectionDataModule(L.LightningDataModule):
    """Train/val/test loaders of ``{"pre", "post", "mask", "name"}`` batches.

    Args:
        root: dataset folder in the official LEVIR-CD or the flat LEVIR-CD-256 layout.
        layout: ``auto`` (detect), ``levir`` or ``levir256``.
        train_protocol: sampling protocol of the training split.
        eval_protocol: sampling protocol of the validation and test splits.
        patch_size: tile/crop side (or the resize target).
        batch_size: samples per batch (per process under DDP).
        eval_batch_size: samples per evaluation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes (capped at the cores this process may use).
        augment: keyword arguments of :class:`PairTransform` for training; ``None`` disables.
        synthetic: if given, a :class:`SyntheticSpec` (or its fields) to generate into ``root``.
        cache_images: decoded images kept per worker (``7 x H x W`` bytes each: 56 MiB for 8
            LEVIR-CD 1024² triplets); also how many images the training sampler shuffles
            together (see :class:`ImageGroupedSampler`).
        pin_memory: pin host memory for CUDA copies (ignored without CUDA).
    """

    def __init__(
        self,
        root: str | Path,
        layout: Layout = "auto",
        train_protocol: Protocol = "tiles",
        eval_protocol: Protocol = "tiles",
        patch_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: dict[str, Any] | None = None,
        synthetic: dict[str, Any] | SyntheticSpec | None = None,
        cache_images: int = 8,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        # Plain attributes rather than save_hyperparameters(): checkpoints stay loadable with
        # torch.load(weights_only=True) (no Paths or OmegaConf objects inside).
        self.root = Path(root)
        self.layout: Layout = layout
        self.train_protocol: Protocol = train_protocol
        self.eval_protocol: Protocol = eval_protocol
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = min(num_workers, usable_cores())  # more only thrash and warn
        self.cache_images = cache_images
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning serves CUDA copies
        self.synthetic = SyntheticSpec(**synthetic) if isinstance(synthetic, Mapping) else synthetic
        self.transform = PairTransform(**augment) if augment else None
        self.datasets: dict[str, ChangeDetectionDataset] = {}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            generate(self.root, self.synthetic)

    def dataset(self, split: Split) -> ChangeDetectionDataset:
        """The dataset of one split, built on first use."""
        if split not in self.datasets:
            self.datasets[split] = ChangeDetectionDataset(
                find_triplets(self.root, split, self.layout),
                protocol=self.train_protocol if split == "train" else self.eval_protocol,
                patch_size=self.patch_size,
                transform=self.transform if split == "train" else None,
                cache_images=self.cache_images,
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(
            stage or "", ()
        )
        for split in splits:
            self.dataset(split)

    def train_sampler(self) -> ImageGroupedSampler:
        """The training order: shuffled every epoch, each image decoded once per worker.

        Under DDP it shards by the attached trainer's rank itself (Lightning leaves a
        ``DistributedSampler`` subclass in place).
        """
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        dataset = self.dataset("train")
        return ImageGroupedSampler(
            dataset.sample_images,
            images_per_block=self.cache_images,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            num_replicas=world_size,
            rank=rank,
            seed=sampler_seed(world_size),
        )

    def _loader(self, split: Split) -> DataLoader:
        train = split == "train"
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self.train_sampler() if train else None,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def sampler_seed(world_size: int) -> int:
    """The training sampler's seed: torch's seed (``seed_everything`` sets it) in one process;
    under DDP the seed every rank shares (Lightning's ``PL_GLOBAL_SEED``, else 0)."""
    if world_size > 1:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    return torch.initial_seed()

"""LightningDataModule over LEVIR-style folders (real or synthetic)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader

from changecam.data.dataset import ChangeDetectionDataset, Protocol, check_crop_count
from changecam.data.io import image_size
from changecam.data.layout import SPLITS, Layout, Split, Triplet, find_triplets
from changecam.data.sampler import ImageGroupedSampler
from changecam.data.synthetic import SyntheticSpec, generate, labelled_change_problem
from changecam.data.transforms import PairTransform
from changecam.data.validate import (
    NetworkFit,
    SplitUse,
    Validation,
    check_mode,
    network_fit,
    validate_splits,
    warn_shared_pairs,
)
from changecam.environment import usable_cores

T = TypeVar("T")

log = logging.getLogger(__name__)


def settings_block(cls: type[T], values: Mapping[str, Any], key: str) -> T:
    """``cls(**values)`` for the dataclass a nested block of the config builds
    (``data.augment``, ``data.synthetic``), which the config guards, checking each
    ``_target_``'s own arguments, do not see into: an unknown key is named with the allowed
    ones and the closest, and a number given as anything else is named with its key.

    Raises:
        ValueError: naming ``key.<name>``.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}.{name}: unknown key{hint}; allowed keys: {', '.join(names)}")
        expected = hints.get(name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        not_float = expected is float and not number
        not_int = expected is int and not (number and isinstance(value, int))
        if not_float or not_int:
            kind = "a number" if expected is float else "an integer"
            raise ValueError(f"{key}.{name}={value!r} must be {kind}")
    return cls(**values)


STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
}


def checkpoints_inside_epochs(trainer: L.Trainer) -> bool:
    """Whether the fit may write a checkpoint inside an epoch: a validation inside it
    (``trainer.val_check_interval``), or a checkpoint every so many steps or seconds."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return True  # validations every so much time ("00:00:01:00"): no val_check_interval
    interval = trainer.val_check_interval  # an int counts batches, a float is a fraction
    if isinstance(interval, int) or interval != 1.0:
        return True
    return any(
        getattr(callback, "_every_n_train_steps", 0)
        or getattr(callback, "_train_time_interval", None)
        for callback in trainer.checkpoint_callbacks
    )


def batches_trained_in_epoch(trainer: L.Trainer) -> int:
    """Batches of the current epoch already trained on when a fit resumes from a checkpoint
    written inside it (``trainer.val_check_interval`` < 1); 0 otherwise. Lightning counts on
    from there but does not skip them in a loader it cannot restore: the sampler must."""
    loop = trainer.fit_loop
    epochs = loop.epoch_progress.total
    inside = epochs.started == epochs.ready and epochs.processed == epochs.started - 1
    return loop.epoch_loop.batch_progress.current.ready if inside else 0


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
        validate: how the splits are checked at the first set-up, before any training or
            evaluation: ``headers`` (lists, pairing, headers and file lengths; fast),
            ``full`` (also decode every file once, with a progress bar) or ``none`` (lists
            and pairing only). See :mod:`changecam.data.validate`.
        crops_per_image: random crops per image and epoch under the ``random_crop`` protocol
            (``None``: as many as the image has tiles).
        change_crops: fraction of the training crops placed around a changed pixel
            (``random_crop`` only; see :class:`ChangeDetectionDataset`).
        extra_train: more training data: folders (either layout) whose ``train`` split joins
            this dataset's, e.g. the synthetic data an ``init_from`` checkpoint learned from
            (the README's "Real imagery" measures that on real pairs). Each of their images
            gives its tiles, or under ``random_crop`` as many random crops per epoch as it has
            tiles (``crops_per_image`` counts only this dataset's images); validation and test
            use this dataset alone.
        splits: every split the run will use, checked together at the first set-up (e.g.
            ``train.py`` adds ``test`` when it will test after fitting, so a bad test list
            fails before the first epoch); default: the splits of each stage as it is set up.
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
        validate: Validation = "headers",
        crops_per_image: int | None = None,
        change_crops: float = 0.0,
        extra_train: Sequence[str | Path] | None = None,
        splits: Sequence[Split] | None = None,
    ) -> None:
        super().__init__()
        # Plain attributes rather than save_hyperparameters(): checkpoints stay loadable with
        # torch.load(weights_only=True) (no Paths or OmegaConf objects inside).
        for key, value in (
            ("patch_size", patch_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("cache_images", cache_images),
        ):  # 0 gave a division by zero, an empty sampler, (eval) the train batch size, or
            # (cache) a refusal naming no key after the sanity validation
            if value is not None and value < 1:
                null = " (or null: data.batch_size)" if key == "eval_batch_size" else ""
                raise ValueError(f"data.{key}={value} must be at least 1{null}")
        self.root = Path(root)
        self.layout: Layout = layout
        self.train_protocol: Protocol = train_protocol
        self.eval_protocol: Protocol = eval_protocol
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be a whole number >= 0")
        self.num_workers = min(num_workers, usable_cores())  # more only thrash and warn
        if self.num_workers < num_workers:  # its config and logged hparams say the given one
            log.info(
                "data.num_workers=%d: %d loader workers, the usable cores",
                num_workers,
                self.num_workers,
            )
        self.cache_images = cache_images
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning serves CUDA copies
        self.synthetic = (
            settings_block(SyntheticSpec, synthetic, "data.synthetic")
            if isinstance(synthetic, Mapping)
            else synthetic
        )
        problem = self.synthetic is not None and labelled_change_problem(self.synthetic)
        if problem:
            raise ValueError(problem)
        self.transform = settings_block(PairTransform, augment, "data.augment") if augment else None
        self.validate_mode: Validation = check_mode(validate)
        check_crop_count(crops_per_image)
        self.crops_per_image = crops_per_image
        self.change_crops = change_crops
        # what the tiles, resize and full protocols would silently ignore
        if change_crops and train_protocol != "random_crop":
            raise ValueError(
                f"data.change_crops={change_crops} places training crops, but "
                f"data.train_protocol={train_protocol} takes none: set "
                "data.train_protocol=random_crop, or data.change_crops=0"
            )
        if crops_per_image is not None and "random_crop" not in (train_protocol, eval_protocol):
            raise ValueError(
                f"data.crops_per_image={crops_per_image} counts random crops, but "
                f"data.train_protocol={train_protocol} and data.eval_protocol={eval_protocol} "
                "take none: set one of them to random_crop, or data.crops_per_image=null"
            )
        if isinstance(extra_train, str | Path):  # data.extra_train=<folder>: one folder, not
            extra_train = [extra_train]  # one per character
        self.extra_train = [Path(p) for p in extra_train or ()]
        unknown = [s for s in splits or () if s not in SPLITS]
        if unknown:
            raise ValueError(f"unknown split {unknown[0]!r}; expected some of {SPLITS}")
        self.splits: tuple[Split, ...] = tuple(splits or ())
        self.datasets: dict[str, ChangeDetectionDataset] = {}
        self._triplets: dict[str, list[Triplet]] = {}
        self._own_train = 0  # training triplets of ``root`` (the rest are ``extra_train``'s)
        self._checked: set[str] = set()
        self._sizes: dict[str, list[tuple[int, int]]] = {}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            generate(self.root, self.synthetic)

    def triplets(self, split: Split) -> list[Triplet]:
        """The files of one split, found on first use (``train``: with ``extra_train``'s)."""
        if split not in self._triplets:
            if self.synthetic is not None and getattr(self.synthetic, split) == 0:
                raise ValueError(  # the set has no such folder: not a missing LEVIR-CD download
                    f"data.synthetic.{split}=0 writes no {split} pairs, and this run uses the "
                    f"{split} split: give it pairs (e.g. data.synthetic.{split}=4)"
                    + (" or leave it out (test=false)" if split == "test" else "")
                )
            found = find_triplets(self.root, split, self.layout)
            if split == "train":
                self._own_train = len(found)
                for root in self.extra_train:
                    found = found + find_triplets(root, "train")
            self._triplets[split] = found
        return self._triplets[split]

    def image_sizes(self, split: Split) -> list[tuple[int, int]]:
        """The distinct (height, width) of a split's images, from their headers (cached): what
        the ``resize`` protocol scales from (:mod:`changecam.training.input_scale`)."""
        if split not in self._sizes:
            self._sizes[split] = sorted({image_size(t.pre) for t in self.triplets(split)})
        return self._sizes[split]

    def crops(self, split: Split) -> int | list[int | None] | None:
        """``crops_per_image`` of a split's images: ``extra_train`` images count their tiles."""
        if split != "train" or not self.extra_train:
            return self.crops_per_image
        extra = len(self.triplets(split)) - self._own_train
        return [self.crops_per_image] * self._own_train + [None] * extra

    def protocol(self, split: Split) -> tuple[Protocol, str]:
        """The sampling protocol of a split and its config key."""
        if split == "train":
            return self.train_protocol, "data.train_protocol"
        return self.eval_protocol, "data.eval_protocol"

    def check(self, splits: Sequence[Split], network: NetworkFit | None = None) -> None:
        """Validate the splits not yet checked, as ``data.validate`` says, in one go.

        Args:
            splits: the splits to check.
            network: what the sizes must suit; default: the network of the attached
                trainer's module (its ``net``), or none.

        Raises:
            DatasetNotFoundError / LayoutError: a split list or folder is missing or empty,
                or its files do not pair up.
            DataValidationError: files are unreadable, truncated or disagree (all listed).
        """
        todo = [s for s in dict.fromkeys(splits) if s not in self._checked]
        if not todo:
            return
        uses = []
        for split in todo:
            protocol, key = self.protocol(split)
            train = split == "train"
            uses.append(
                SplitUse(
                    split,
                    self.triplets(split),
                    protocol,
                    key,
                    self.batch_size if train else self.eval_batch_size,
                    "data.batch_size" if train else "data.eval_batch_size",
                )
            )
        validate_splits(uses, self.patch_size, network or self.network_fit(), self.validate_mode)
        known = [s for s in self._triplets if s in self._checked or s in todo]
        warn_shared_pairs({s: self._triplets[s] for s in known}, todo)
        self._checked.update(todo)

    def network_fit(self) -> NetworkFit:
        """The size multiple the attached trainer's network needs (1 without a trainer)."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        if module is None:
            return NetworkFit()
        return network_fit(getattr(module, "net", module))

    def dataset(self, split: Split) -> ChangeDetectionDataset:
        """The dataset of one split, built on first use."""
        if split not in self.datasets:
            self.datasets[split] = ChangeDetectionDataset(
                self.triplets(split),
                protocol=self.protocol(split)[0],
                patch_size=self.patch_size,
                transform=self.transform if split == "train" else None,
                cache_images=self.cache_images,
                crops_per_image=self.crops(split),
                change_crops=self.change_crops if split == "train" else 0.0,
                # overfitting a few batches (trainer.overfit_batches) needs the same ones every
                # epoch: Lightning's sequential sampler gives indexes, without the seeds of ours
                fixed_crops=split != "train" or self.overfits(),
            )
        return self.datasets[split]

    def overfits(self) -> bool:
        """Whether the attached trainer overfits a few batches (``debug=overfit``)."""
        return self.trainer is not None and bool(self.trainer.overfit_batches)

    def setup(self, stage: str | None = None) -> None:
        """Check every split the run will use (at the first call), then build the stage's."""
        splits = STAGE_SPLITS.get(stage or "", ())
        self.check([*self.splits, *splits])
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
        sampler = ImageGroupedSampler(
            dataset.sample_images,
            images_per_block=self.cache_images,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            num_replicas=world_size,
            rank=rank,
            seed=sampler_seed(world_size),
            # the workers' generators are not in the checkpoints (the main process's is), and
            # every DDP rank's main generator draws the same numbers: each sample its own seed.
            # So too when checkpoints are written inside epochs: Lightning fetches a batch
            # ahead, so the next batch's seeds were drawn before the checkpoint's RNG states
            sample_seeds=self.num_workers > 0
            or world_size > 1
            or (trainer is not None and checkpoints_inside_epochs(trainer)),
        )
        # loader workers draw the first indices when Lightning creates the iterator, before
        # it calls set_epoch: a resumed fit would replay epoch 0's order without this. The
        # epoch is the one Lightning sets (epoch_progress.current.processed), restored by now
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer else 0)
        sampler.resume_after(batches_trained_in_epoch(trainer) if trainer else 0)
        return sampler

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

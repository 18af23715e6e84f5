"""A training sampler that shuffles every epoch yet lets each image be decoded once per epoch.

With the ``tiles`` protocol a 1024² LEVIR-CD image yields 16 samples. A plain shuffle scatters
them over the whole epoch, so a worker's small decoded-image cache almost never hits and every
patch pays for decoding two full images and a label. :class:`ImageGroupedSampler` keeps the
shuffle but orders it so that the cache always hits:

1. the images are shuffled and their samples laid out image after image;
2. under DDP each rank takes one contiguous slice of that sequence (padded by wrapping round,
   like :class:`~torch.utils.data.DistributedSampler`, so every rank has the same length);
3. the slice is split into one contiguous part per DataLoader worker, sized so that part ``w``
   exactly fills the batches that worker ``w`` receives (a DataLoader hands batch ``j`` to
   worker ``j mod num_workers``);
4. within each part, the samples of every run of ``images_per_block`` consecutive images are
   shuffled together, so a batch mixes up to ``images_per_block`` images.

Each worker then sees its images' samples within one block, and a per-worker cache of
``images_per_block`` decoded images decodes each image once per epoch (images cut by a part
or rank boundary: once per worker holding them). The order is a function of ``(seed, epoch)``,
like :class:`~torch.utils.data.DistributedSampler`'s, and of the layout the samples are dealt
to (batch size, workers, replicas): the same seed with other workers gives other batches.
Call :meth:`set_epoch` every epoch (Lightning does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler


class ImageGroupedSampler(DistributedSampler):
    """Shuffled sample order in which each worker reads its images' samples close together.

    It subclasses :class:`~torch.utils.data.DistributedSampler` so that Lightning recognises
    it as already sharded by rank and leaves it in place under DDP.

    Args:
        sample_images: image index of each sample (e.g.
            :attr:`changecam.data.ChangeDetectionDataset.sample_images`).
        images_per_block: images whose samples are shuffled together; at most the decoded-image
            cache size of the dataset, or the cache thrashes.
        batch_size: the DataLoader's batch size.
        num_workers: the DataLoader's worker processes (0 counts as one: the main process).
        num_replicas: number of DDP processes.
        rank: this process's rank.
        seed: base seed; every rank must use the same one.
        sample_seeds: yield ``(index, seed)`` pairs: each sample's augmentation seed, drawn
            from ``(seed, epoch)`` (:meth:`epoch_seeds`). With loader workers the dataset
            would otherwise draw it from the worker's generator, whose state no checkpoint
            holds, so a resumed run would augment differently.
    """

    def __init__(
        self,
        sample_images: Sequence[int],
        images_per_block: int,
        batch_size: int,
        num_workers: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        sample_seeds: bool = False,
    ) -> None:
        if images_per_block < 1:
            raise ValueError(f"images_per_block={images_per_block} must be at least 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if len(sample_images) == 0:
            raise ValueError("no samples to draw from: sample_images is empty")
        super().__init__(
            sample_images, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )  # type: ignore[arg-type]
        self.sample_images = np.asarray(sample_images, dtype=np.int64)
        self.images_per_block = images_per_block
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.sample_seeds = sample_seeds
        self._skipped: tuple[int, int] | None = None  # (epoch, batches) already trained

    def __len__(self) -> int:
        return self.num_samples  # the whole epoch's, also while resuming inside it

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._skipped is not None and self._skipped[0] != epoch:
            self._skipped = None

    def resume_after(self, batches: int) -> None:
        """Leave out the first ``batches`` batches of the current epoch (a fit resumed from a
        checkpoint written inside it: those were trained on). Later epochs are whole."""
        if batches < 0:
            raise ValueError(f"batches={batches} must be at least 0")
        self._skipped = (self.epoch, batches) if batches else None

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = self.order().tolist()
        if self._skipped is not None:
            order = order[self._skipped[1] * self.batch_size :]
        if not self.sample_seeds:
            return iter(order)
        seeds = self.epoch_seeds().tolist()
        return iter([(i, seeds[i]) for i in order])

    def epoch_seeds(self) -> np.ndarray:
        """Each sample's augmentation seed in the current epoch (by sample index)."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        return rng.integers(0, 2**31 - 1, size=len(self.sample_images))

    def order(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in the order they are drawn."""
        rng = np.random.default_rng([self.seed, self.epoch])
        _, image_ids = np.unique(self.sample_images, return_inverse=True)
        position = rng.permutation(image_ids.max() + 1)  # each image's place in the epoch
        laid_out = np.argsort(position[image_ids], kind="stable")  # image after image
        padded = np.resize(laid_out, self.total_size)  # wraps round, like DistributedSampler
        mine = padded[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]

        # Batch j goes to worker j % W; the last batch may be short.
        sizes = np.full(-(-len(mine) // self.batch_size), self.batch_size)
        sizes[-1] = len(mine) - self.batch_size * (len(sizes) - 1)
        owner = np.arange(len(sizes)) % self.num_workers
        bounds = np.cumsum([0] + [int(sizes[owner == w].sum()) for w in range(self.num_workers)])
        parts = [
            self._shuffle_blocks(mine[bounds[w] : bounds[w + 1]], rng)
            for w in range(self.num_workers)
        ]
        taken = [0] * self.num_workers
        batches = []
        for size, w in zip(sizes.tolist(), owner.tolist(), strict=True):
            batches.append(parts[w][taken[w] : taken[w] + size])
            taken[w] += size
        return np.concatenate(batches)

    def _shuffle_blocks(self, part: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Shuffle ``part`` within runs of ``images_per_block`` consecutive images."""
        if len(part) == 0:
            return part
        images = self.sample_images[part]
        # start of each run of one image, then every images_per_block-th run starts a block
        run_starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
        block_starts = run_starts[:: self.images_per_block]
        blocks = np.split(part, block_starts[1:])
        return np.concatenate([rng.permutation(block) for block in blocks])

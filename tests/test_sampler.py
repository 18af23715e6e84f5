"""ImageGroupedSampler: a shuffle in which each worker decodes each of its images once."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from changecam.data import ChangeDetectionDataModule, ImageGroupedSampler
from changecam.data.datamodule import sampler_seed

# 13 images with uneven sample counts (tiles of differently sized images)
COUNTS = [16, 16, 4, 16, 9, 16, 16, 1, 16, 16, 12, 16, 16]
SAMPLE_IMAGES = [i for i, n in enumerate(COUNTS) for _ in range(n)]


def worker_batches(order: np.ndarray, batch_size: int, workers: int) -> list[list[np.ndarray]]:
    """The batches each worker receives: a DataLoader hands batch j to worker j % workers."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[w::workers] for w in range(workers)]


def decodes(order: np.ndarray, batch_size: int, workers: int, cache: int) -> int:
    """Images decoded by workers that each keep an LRU cache of ``cache`` images."""
    images = np.asarray(SAMPLE_IMAGES)
    total = 0
    for batches in worker_batches(order, batch_size, workers):
        lru: OrderedDict[int, None] = OrderedDict()
        for sample in np.concatenate(batches) if batches else []:
            image = int(images[sample])
            if image in lru:
                lru.move_to_end(image)
                continue
            total += 1
            lru[image] = None
            if len(lru) > cache:
                lru.popitem(last=False)
    return total


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_permutation_and_one_decode_per_image_and_worker(workers, batch_size):
    sampler = ImageGroupedSampler(
        SAMPLE_IMAGES, images_per_block=3, batch_size=batch_size, num_workers=workers, seed=5
    )
    order = np.asarray(list(sampler))
    assert len(sampler) == len(order) == len(SAMPLE_IMAGES)
    assert sorted(order.tolist()) == list(range(len(SAMPLE_IMAGES)))
    # every image is decoded once, plus at most one extra for each worker-part boundary
    n = decodes(order, batch_size, max(1, workers), cache=3)
    assert len(COUNTS) <= n <= len(COUNTS) + max(1, workers) - 1
    # a plain shuffle with the same cache decodes far more
    shuffled = np.random.default_rng(0).permutation(len(SAMPLE_IMAGES))
    assert decodes(shuffled, batch_size, max(1, workers), cache=3) > 2 * len(COUNTS)


def test_batches_mix_images_of_a_block():
    sampler = ImageGroupedSampler(SAMPLE_IMAGES, images_per_block=4, batch_size=8, seed=1)
    images = np.asarray(SAMPLE_IMAGES)[sampler.order()]
    distinct = [len(set(images[i : i + 8].tolist())) for i in range(0, len(images), 8)]
    assert max(distinct) <= 2 * 4  # a batch spans at most two consecutive blocks ...
    assert np.mean(distinct) > 2.5  # ... and usually several of them
    one = ImageGroupedSampler(SAMPLE_IMAGES, images_per_block=1, batch_size=8, seed=1)
    runs = np.asarray(SAMPLE_IMAGES)[one.order()]
    assert (np.diff(runs) != 0).sum() == len(COUNTS) - 1  # image after image


def test_order_is_a_function_of_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ImageGroupedSampler(SAMPLE_IMAGES, 3, batch_size=4, num_workers=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(7, 0) == order(7, 0)
    assert order(7, 0) != order(7, 1)
    assert order(7, 0) != order(8, 0)


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_split_the_epoch_evenly(replicas):
    orders = [
        list(ImageGroupedSampler(SAMPLE_IMAGES, 3, 4, 2, num_replicas=replicas, rank=r, seed=3))
        for r in range(replicas)
    ]
    per_rank = -(-len(SAMPLE_IMAGES) // replicas)
    assert all(len(o) == per_rank for o in orders)
    flat = sum(orders, [])
    assert set(flat) == set(range(len(SAMPLE_IMAGES)))  # all covered, padding repeats a few
    assert len(flat) - len(set(flat)) == per_rank * replicas - len(SAMPLE_IMAGES)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="images_per_block=0"):
        ImageGroupedSampler(SAMPLE_IMAGES, 0, 4)
    with pytest.raises(ValueError, match="batch_size=0"):
        ImageGroupedSampler(SAMPLE_IMAGES, 2, 0)
    with pytest.raises(ValueError, match="empty"):
        ImageGroupedSampler([], 2, 4)


class WhoLoads(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, get_worker_info().id


def test_dataloader_hands_batch_j_to_worker_j_mod_w():
    """The assumption the sampler's layout rests on, checked against torch itself."""
    loader = DataLoader(WhoLoads(), batch_size=4, num_workers=2)
    for j, (_, worker) in enumerate(loader):
        assert worker.tolist() == [j % 2] * 4


def test_datamodule_epoch_decodes_each_image_once(tiny_synthetic, monkeypatch):
    import changecam.data.dataset as mod

    calls = []
    real = mod.read_image
    monkeypatch.setattr(mod, "read_image", lambda p: calls.append(p) or real(p))
    dm = ChangeDetectionDataModule(
        tiny_synthetic, layout="levir", patch_size=32, batch_size=4, cache_images=2,
        augment={"hflip": 0.5},
    )  # fmt: skip
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ImageGroupedSampler)
    names = [name for batch in loader for name in batch["name"]]
    assert len(names) == len(set(names)) == 4 * 4  # 4 images of 4 tiles, each tile once
    assert len(calls) == 2 * 4  # pre and post of each image, once, with a cache of 2 images


def test_datamodule_order_follows_torch_seed(tiny_synthetic):
    def names(seed: int, epoch: int = 0) -> list[str]:
        torch.manual_seed(seed)
        dm = ChangeDetectionDataModule(tiny_synthetic, layout="levir", patch_size=32)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [n for batch in loader for n in batch["name"]]

    assert names(0) == names(0)
    assert names(0) != names(1)
    assert names(0) != names(0, epoch=1)


class NameRecorder(L.LightningModule):
    """Writes the sample names each rank trains on, per epoch, to ``out``."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.names: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.names += batch["name"]
        return (self.weight * batch["pre"].mean()).sum()

    def on_train_epoch_end(self) -> None:
        path = self.out / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.names))
        self.names = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def teardown(self, stage: str) -> None:
        # both ranks leave together, their process group closed before they exit: left to
        # Lightning's exit handler, a rank aborted at exit in 3 of 30 runs here ("terminate
        # called without an active exception", SIGABRT), after training had finished
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_train_on_disjoint_halves(tmp_path, tiny_synthetic):
    """Under real DDP (2 CPU processes) Lightning keeps the sampler and each rank takes its half."""
    L.seed_everything(3)
    dm = ChangeDetectionDataModule(tiny_synthetic, layout="levir", patch_size=32, batch_size=3)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(NameRecorder(tmp_path), datamodule=dm)
    seen = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("rank*_epoch*.json")}
    for epoch in (0, 1):
        rank0, rank1 = seen[f"rank0_epoch{epoch}"], seen[f"rank1_epoch{epoch}"]
        assert len(rank0) == len(rank1) == 8  # 16 tiles, half each
        assert set(rank0).isdisjoint(rank1) and len(set(rank0) | set(rank1)) == 16
    assert seen["rank0_epoch0"] != seen["rank0_epoch1"]  # reshuffled every epoch


def test_sampler_seed_is_shared_under_ddp(monkeypatch):
    torch.manual_seed(11)
    assert sampler_seed(1) == 11  # one process: torch's seed
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    assert sampler_seed(2) == 5  # DDP: the seed seed_everything gave every rank
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert sampler_seed(2) == 0  # DDP without a seed: a constant all ranks agree on


def test_ddp_ranks_without_workers_augment_each_sample_by_its_own_seed(tiny_synthetic):
    """Every rank's torch generator is seeded alike: drawn from it, each step's augmentation
    would be the same on every rank."""
    seeds = []
    for rank in (0, 1):
        torch.manual_seed(0)
        dm = ChangeDetectionDataModule(tiny_synthetic, layout="levir", patch_size=32)
        counts = {"ready": 0, "started": 0, "processed": 0}
        progress = SimpleNamespace(
            current=SimpleNamespace(**counts), total=SimpleNamespace(**counts)
        )
        dm.trainer = SimpleNamespace(  # type: ignore[assignment]
            world_size=2,
            global_rank=rank,
            fit_loop=SimpleNamespace(epoch_progress=progress),
            overfit_batches=0,
        )
        drawn = list(dm.train_sampler())
        assert all(isinstance(d, tuple) for d in drawn), "(index, seed) pairs"
        seeds.append([s for _, s in drawn])
    assert all(a != b for a, b in zip(*seeds, strict=True))


def test_sample_seeds_come_with_the_order_and_follow_the_epoch():
    sampler = ImageGroupedSampler([0, 0, 1, 1, 2], images_per_block=2, batch_size=2, seed=3)
    plain = list(sampler)
    sampler.sample_seeds = True
    pairs = list(sampler)
    assert [i for i, _ in pairs] == plain
    assert pairs == list(sampler), "the same epoch gives the same seeds"
    assert len({s for _, s in pairs}) == 5
    sampler.set_epoch(1)
    assert {s for _, s in pairs}.isdisjoint(s for _, s in sampler)


@pytest.mark.parametrize("sample_seeds", [False, True])
def test_a_fit_resumed_inside_an_epoch_draws_the_rest_of_that_epoch_only(sample_seeds):
    """Lightning counts on from a checkpoint written inside an epoch but cannot skip batches in
    a loader it cannot restore: without the sampler leaving them out, the resumed epoch trained
    on its first batches again and never on its last ones (helper-82)."""
    sampler = ImageGroupedSampler(SAMPLE_IMAGES, 4, batch_size=8, sample_seeds=sample_seeds)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.resume_after(5)
    assert list(sampler) == whole[5 * 8 :] and len(sampler) == len(whole)  # len: the epoch's
    sampler.set_epoch(4)  # the next epoch is whole
    assert len(list(sampler)) == len(whole)
    sampler.set_epoch(3)
    assert list(sampler) == whole

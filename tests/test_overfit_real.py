"""The real LEVIR-CD patches load, and a small model can overfit them."""

import pytest
import torch
import torch.nn.functional as F

from changecam.data.dataset import ChangeDetectionDataset
from changecam.data.layout import find_triplets
from changecam.metrics import ChangeScores
from changecam.models import SiameseUNet
from changecam.training.module import dice_loss


def test_real_samples_load(samples_dir):
    triplets = [t for s in ("train", "val", "test") for t in find_triplets(samples_dir, s)]
    ds = ChangeDetectionDataset(triplets, "full")
    sample = ds[0]
    assert sample["pre"].shape == (3, 256, 256) and sample["mask"].shape == (1, 256, 256)
    fractions = [ds[i]["mask"].mean().item() for i in range(len(ds))]
    assert min(fractions) == 0.0 and max(fractions) > 0.02  # train_386 has no change


@pytest.mark.slow
def test_overfit_real_patches(samples_dir):
    torch.manual_seed(0)
    triplets = [t for s in ("train", "val", "test") for t in find_triplets(samples_dir, s)]
    ds = ChangeDetectionDataset(triplets, "resize", patch_size=64)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("pre", "post", "mask")}
    net = SiameseUNet(3, 8, 3, "concat", shared_encoder=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        logits = net(batch["pre"], batch["post"])
        loss = F.binary_cross_entropy_with_logits(logits, batch["mask"]) + dice_loss(
            logits, batch["mask"]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    metric = ChangeScores()
    with torch.no_grad():
        metric.update(torch.sigmoid(net(batch["pre"], batch["post"])), batch["mask"])
    assert metric.compute()["f1"] >= 0.9

"""The CAM-panel callback: W&B panels, table and share history; PNG files with any logger; DDP."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from changecam.callbacks.cam_panels import select_samples
from changecam.train import train
from conftest import REPO, compose_train, tiny_overrides
from wandb_offline import history

K = 3


def test_select_samples_is_fixed_and_includes_change():
    masks = [torch.zeros(1, 4, 4) for _ in range(10)]
    masks[7][..., :2, :] = 1
    masks[2][..., 0, 0] = 1
    chosen = select_samples(masks, 4)
    assert chosen == select_samples(masks, 4) and len(chosen) == 4 and len(set(chosen)) == 4
    assert {2, 7} <= set(chosen)
    assert select_samples(masks[:3], 8) == [0, 1, 2]


def overrides(tiny_synthetic, logger: str) -> list[str]:
    return [
        "experiment=quickstart",
        "trainer.max_epochs=2",
        f"logger={logger}",
        f"callbacks.cam_panels.k={K}",
        *tiny_overrides(tiny_synthetic),
    ]


def test_two_epochs_log_panels_table_and_share_history_to_wandb(tmp_path, tiny_synthetic):
    train(compose_train(tmp_path, overrides(tiny_synthetic, "wandb")))
    run_dir = tmp_path / "run"
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    rows = [r for r in history(offline) if "val/cam/panels/filenames" in r]
    assert len(rows) == 2, "one CAM log per validation epoch"
    for row in rows:
        files = [offline / "files" / f for f in row["val/cam/panels/filenames"]]
        assert len(files) == K
        for f in files:
            image = np.asarray(Image.open(f).convert("RGB"))
            assert image.shape[0] > 200 and image.shape[1] > 400
            assert image.std() > 10, f"{f} is a real picture, not a constant colour"
        assert row["val/cam/overlays/count"] == K and "all_masks" in " ".join(row)
        table = json.loads((offline / "files" / row["val/cam/table/path"]).read_text())
        assert table["columns"][:2] == ["name", "panel"]
        assert {"post_share/enc1", "post_share/enc2", "f1", "iou", "target_score"} <= set(
            table["columns"]
        )
        assert len(table["data"]) == K
    share_rows = [r for r in history(offline) if "val/cam/post_share/enc2" in r]
    assert len(share_rows) >= 1  # NaN epochs (nothing predicted) are left out of the chart
    for r in share_rows:
        assert 0.0 <= r["val/cam/post_share/enc2"] <= 1.0
    for epoch in ("epoch_000", "epoch_001"):
        assert len(list((run_dir / "cam" / epoch).glob("*.png"))) == K


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_other_loggers_still_write_pngs(tmp_path, tiny_synthetic, logger):
    train(compose_train(tmp_path, overrides(tiny_synthetic, logger)))
    for epoch in ("epoch_000", "epoch_001"):
        pngs = list((tmp_path / "run" / "cam" / epoch).glob("*.png"))
        assert len(pngs) == K
    if logger == "csv":
        header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
        assert "val/cam/post_share/enc1" in header


@pytest.mark.slow
def test_ddp_writes_panels_once(tmp_path, tiny_synthetic):
    args = overrides(tiny_synthetic, "none") + [
        "trainer=ddp_cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        "print_config=false",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    writes = [line for line in out.splitlines() if "CAM panels to" in line]
    assert len(writes) == 2 and all("rank 0 wrote" in line for line in writes), writes
    assert len(list((tmp_path / "run" / "cam" / "epoch_001").glob("*.png"))) == K


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()

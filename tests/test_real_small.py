"""``experiment=real_small``: a few labelled real pairs, ``data.root`` required, ``init_from`` a
synthetic checkpoint; (slow) one epoch on the six shared 1024² LEVIR-CD images."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from changecam.cli.config_checks import ConfigError, check_config
from changecam.cli.train import train
from changecam.data import ChangeDetectionDataModule
from changecam.training.module import ChangeDetectionModule
from helpers import REPO, compose_train

SIX_IMAGES = REPO.parent / "shared" / "data" / "levir-cd-1024-samples"
QUIET = [  # and fast: no worker process to start, no CAM panels
    "data.num_workers=0",
    "callbacks.cam_panels=null",
    "logger=none",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def test_real_small_requires_data_root(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=real_small"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg, import_targets=False)
    message = str(err.value)
    assert "data.root is required: set data.root=<value> on the command line" in message
    assert "<root>/list/{train,val,test}.txt" in message  # both layouts are named


def test_real_small_finetune_requires_a_checkpoint_and_lowers_the_rate(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=real_small_finetune", "data.root=/pairs"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg, import_targets=False)
    message = str(err.value)
    assert "module.init_from is required: set module.init_from=<value>" in message
    assert "checkpoints/best.ckpt" in message and "data.root" not in message
    GlobalHydra.instance().clear()
    recipe = compose_train(tmp_path, ["experiment=real_small", "data.root=/pairs"])
    assert (cfg.module.optimizer.lr, recipe.module.optimizer.lr) == (1e-3, 3e-3)
    # everything else is experiment=real_small's
    for group in ("data", "model", "trainer", "callbacks"):
        assert cfg[group] == recipe[group], group
    assert {k: v for k, v in cfg.module.items() if k != "optimizer"} == {
        k: v for k, v in recipe.module.items() if k != "optimizer"
    }


def quickstart_checkpoint(path: Path, tmp_path: Path, synthetic: Path) -> Path:
    """A changecam checkpoint of the quickstart network (width 8, depth 4), one step on the
    tiny synthetic set."""
    net = hydra.utils.instantiate(compose_train(tmp_path / "q", ["experiment=quickstart"]).model)
    GlobalHydra.instance().clear()
    module = ChangeDetectionModule(net, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    data = ChangeDetectionDataModule(synthetic, layout="levir", patch_size=32, batch_size=2)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(path)
    return path


def test_real_small_fast_dev_run_on_the_256_samples_from_a_synthetic_checkpoint(
    tmp_path, samples_dir, tiny_synthetic, caplog
):
    ckpt = quickstart_checkpoint(tmp_path / "quickstart.ckpt", tmp_path, tiny_synthetic)
    overrides = ["experiment=real_small", f"data.root={samples_dir}", "debug=fdr", *QUIET]
    cfg = compose_train(tmp_path / "run", [*overrides, f"module.init_from={ckpt}"])
    with caplog.at_level("INFO", logger="changecam"):
        metrics = train(cfg)
    assert {"val/f1", "test/f1", "val/loss", "test/iou"} <= set(metrics)
    loaded = [r.getMessage() for r in caplog.records if "module.init_from" in r.getMessage()]
    assert loaded == [f"module.init_from={ckpt}: loaded 129 of 129 tensors"]


def test_real_small_with_extra_train_data(tmp_path, samples_dir, tiny_synthetic):
    """``data.extra_train=[<synthetic set>]`` reaches the datamodule from the command line: the
    run trains on both, and a missing folder is named before any training."""
    from changecam.data.layout import DatasetNotFoundError

    overrides = [
        "experiment=real_small",
        f"data.root={samples_dir}",
        "data.patch_size=64",  # the tiny synthetic set is 64²
        "debug=fdr",
        *QUIET,
    ]
    cfg = compose_train(tmp_path / "run", [*overrides, f"data.extra_train=[{tiny_synthetic}]"])
    assert {"val/f1", "test/f1"} <= set(train(cfg))
    GlobalHydra.instance().clear()
    missing = tmp_path / "no_such_set"
    cfg = compose_train(tmp_path / "bad", [*overrides, f"data.extra_train=[{missing}]"])
    with pytest.raises(DatasetNotFoundError, match="no_such_set"):
        train(cfg)
    assert not (tmp_path / "bad" / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_real_small_one_epoch_on_the_six_1024_images(tmp_path):
    if not (SIX_IMAGES / "A").is_dir():
        pytest.skip(f"the six 1024² LEVIR-CD images are not at {SIX_IMAGES}")
    cfg = compose_train(
        tmp_path,
        [
            "experiment=real_small",
            f"data.root={SIX_IMAGES}",
            "trainer.max_epochs=1",
            "callbacks.cam_panels.every_n_epochs=1",  # the recipe draws every 5th epoch
            *QUIET[2:],
        ],
    )  # the recipe's own loader workers and CAM panels
    metrics = train(cfg)
    assert {"val/f1", "test/f1"} <= set(metrics)
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert list((tmp_path / "run" / "cam").rglob("*.png")), "the CAM panels of the first epoch"

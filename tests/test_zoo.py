"""Every architecture of conf/model/ through the whole tool, with no per-architecture code here:
``experiment=quickstart model=<name>`` with ``debug=fdr``, and (slow) a trained checkpoint through
eval, predict and explain, with the CAM callback on.

The per-architecture facts (published parameter counts, taps, exact maps) are tested next to
each architecture (tests/test_zoo_<family>.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from changecam.cli.evaluate import evaluate
from changecam.cli.explain import explain
from changecam.cli.launch import config_dir
from changecam.cli.predict import predict
from changecam.cli.train import train
from helpers import compose_train

ZOO = sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml") if p.stem != "external")


def tiny_zoo_overrides(name: str, data_root: Path) -> list[str]:
    """``experiment=quickstart model=<name>`` at width 4 on 32 px tiles of the tiny synthetic set."""
    return [
        "experiment=quickstart",
        f"model={name}",
        "model.base_channels=4",
        f"data.root={data_root}",
        "data.synthetic=null",
        "data.patch_size=32",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]


def test_the_zoo_has_every_family():
    expected = {"siamese_unet", "siamese_unet_seed", "fc_ef", "fc_siam_conc", "fc_siam_diff"}
    expected |= {"snunet", "bit"}
    assert expected <= set(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_fast_dev_run_of_every_architecture(tmp_path, tiny_synthetic, name):
    cfg = compose_train(tmp_path, [*tiny_zoo_overrides(name, tiny_synthetic), "debug=fdr"])
    metrics = train(cfg)
    assert {"val/f1", "test/f1", "val/loss"} <= set(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_every_architecture_trains_loads_and_explains(
    tmp_path, tiny_synthetic, levir256_tiny, name
):
    cfg = compose_train(
        tmp_path / "train",
        [
            *tiny_zoo_overrides(name, tiny_synthetic),
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
            "callbacks.cam_panels.k=1",
            "callbacks.cam_panels.explain.faithfulness.steps=2",
        ],
    )
    train(cfg)
    ckpt = tmp_path / "train" / "run" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    assert list((tmp_path / "train" / "run").rglob("cam/**/*.png")), "CAM panels written"

    fast = ["device=cpu", f"ckpt_path={ckpt}", "explain.faithfulness.steps=2"]
    pair = [
        f"input.pre={levir256_tiny}/A/test_2_0000_0000.png",
        f"input.post={levir256_tiny}/B/test_2_0000_0000.png",
    ]
    report = explain(compose_train(tmp_path / "explain", [*fast, *pair], "explain"))
    assert report["pairs"] == 1 or len(report["pairs"]) == 1
    predicted = predict(
        compose_train(tmp_path / "predict", [*fast, *pair, "sliding_window.window=64"], "predict")
    )
    assert len(predicted["pairs"]) == 1 and not predicted["failed"]
    metrics = evaluate(
        compose_train(
            tmp_path / "eval",
            [
                "device=cpu",
                f"ckpt_path={ckpt}",
                f"data.root={tiny_synthetic}",
                "data.synthetic=null",
                "data.patch_size=32",
            ],
            "eval",
        )
    )
    assert "test/f1" in metrics

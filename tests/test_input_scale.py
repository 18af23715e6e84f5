"""The training data's pixel scale: recorded in checkpoints, warned about where a command runs
the network at another (a ``resize``-trained network on images at their own resolution)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from changecam.cli.evaluate import evaluate
from changecam.cli.explain import explain
from changecam.cli.predict import predict
from changecam.data.io import write_png
from changecam.models.protocol import network_config
from changecam.training.checkpoint import CONFIG_KEY, PREFIX_KEY, read_checkpoint
from changecam.training.input_scale import DATA_KEY, scale_warning, training_factors
from helpers import compose_train
from test_checkpoint import make_lightning_checkpoint
from test_eval import hand_made, hand_made_overrides, red_detector  # noqa: F401 (fixture)

LEVIR_RESIZE = {"train_protocol": "resize", "patch_size": 256, "image_sizes": [[1024, 1024]]}


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        ("resize", {"train_protocol": "resize", "patch_size": 32, "image_sizes": [[64, 64]]}),
        ("tiles", {"train_protocol": "tiles", "patch_size": 32}),
    ],
)
def test_training_records_its_data_protocol(tmp_path, tiny_synthetic, protocol, expected):
    """64 px synthetic images: ``resize`` to 32 px trains at scale 1/2, tiles at scale 1."""
    ckpt = make_lightning_checkpoint(
        tmp_path / "best.ckpt", tiny_synthetic, steps=1, train_protocol=protocol
    )
    assert torch.load(ckpt, weights_only=True)[DATA_KEY] == expected
    _, hparams = read_checkpoint(ckpt)
    assert hparams[DATA_KEY] == expected
    assert training_factors(expected) == ([0.5] if protocol == "resize" else [1.0])


def test_scale_warning_says_what_was_trained_and_what_runs():
    message = scale_warning(LEVIR_RESIZE, "seed.ckpt", "predict.py", "Do this.")
    assert message == (
        "seed.ckpt was trained on 1024x1024 images resized to 256x256 "
        "(data.train_protocol=resize, scale 1/4, each network pixel covering 4x4 image pixels), "
        "but predict.py runs it on images at their own resolution (scale 1): a scale it never "
        "saw, so its output may be poor without any error. Do this."
    )
    # the same scale, or nothing recorded (older checkpoints, plain state dicts): no warning
    assert scale_warning(LEVIR_RESIZE, "x", "eval.py", "", [0.25], "resized") is None
    assert (
        scale_warning({"train_protocol": "tiles", "patch_size": 256}, "x", "predict.py", "") is None
    )
    assert scale_warning(None, "x", "predict.py", "") is None
    # tiles-trained, resized to evaluate: the other way round
    tiles = scale_warning(
        {"train_protocol": "random_crop", "patch_size": 256}, "x", "eval.py", "", [0.25], "resized"
    )
    assert tiles is not None and "data.train_protocol=random_crop, scale 1" in tiles


def red_checkpoint(path: Path, record: dict | None) -> Path:
    """The red detector as a changecam Lightning checkpoint with the data record ``record``."""
    net = red_detector()
    checkpoint = {
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        CONFIG_KEY: network_config(net),
        PREFIX_KEY: "net.",
        "hyper_parameters": {"threshold": 0.5},
    }
    if record is not None:
        checkpoint[DATA_KEY] = record
    torch.save(checkpoint, path)
    return path


RESIZED_64 = {"train_protocol": "resize", "patch_size": 32, "image_sizes": [[64, 64]]}
WARNING = "was trained on 64x64 images resized to 32x32"


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_predict_and_explain_warn_for_a_resize_trained_checkpoint(tmp_path, caplog, command):
    rng = np.random.default_rng(0)
    for date in ("A", "B"):
        write_png(tmp_path / "in" / date / "p.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    run = {"predict": predict, "explain": explain}[command]
    for record, warned in (
        (RESIZED_64, True),
        ({"train_protocol": "tiles", "patch_size": 32}, False),
    ):
        caplog.clear()
        ckpt = red_checkpoint(tmp_path / f"{warned}.ckpt", record)
        overrides = [f"ckpt_path={ckpt}", f"input.dir={tmp_path / 'in'}", "device=cpu"]
        if command == "predict":
            overrides.append("sliding_window.window=32")
        with caplog.at_level("WARNING"):
            run(compose_train(tmp_path / f"{command}{warned}", overrides, command))
        assert (WARNING in caplog.text) is warned, caplog.text
        if warned:
            assert (
                f"{command}.py runs it on images at their own resolution (scale 1)" in caplog.text
            )


def test_eval_warns_when_it_scores_at_another_scale(tmp_path, hand_made, caplog):  # noqa: F811
    """The hand-made test images are 32x32: a network trained resized from 64 to 32 (scale
    1/2) is warned about on tiles, on ``resize`` to 32 (scale 1) and on sliding windows, each
    time with the settings that score it at scale 1/2, and not on ``resize`` to 16."""
    root, _ = hand_made
    ckpt = red_checkpoint(tmp_path / "resized.ckpt", RESIZED_64)
    base = [*hand_made_overrides(root, ckpt), "logger=none", "post_share=false"]
    base = [o for o in base if not o.startswith(("model", "data.patch_size"))]
    remedy = "Score it at its training scale: data.eval_protocol=resize data.patch_size=16"
    for extra, warned in (
        (["data.eval_protocol=tiles", "data.patch_size=32"], True),
        (["data.eval_protocol=resize", "data.patch_size=32"], True),
        (["sliding_window.enabled=true", "data.patch_size=32"], True),
        (["data.eval_protocol=resize", "data.patch_size=16"], False),
    ):
        caplog.clear()
        with caplog.at_level("WARNING"):
            evaluate(compose_train(tmp_path / "_".join(extra), [*base, *extra], "eval"))
        assert (WARNING in caplog.text) is warned, (extra, caplog.text)
        if warned:
            windows = extra[0].startswith("sliding_window")
            assert remedy + (" sliding_window.enabled=false." if windows else ".") in caplog.text


def test_eval_lists_the_split_after_the_synthetic_set_is_made_again(tmp_path, caplog):
    """The scale check lists the test split's files: only after prepare_data has written the
    set the config describes, or eval.py would score an earlier set's list."""
    ckpt = red_checkpoint(tmp_path / "resized.ckpt", RESIZED_64)
    overrides = [
        f"ckpt_path={ckpt}",
        f"data.root={tmp_path / 'synthetic'}",
        "data.eval_protocol=resize",
        "data.patch_size=16",
        "data.synthetic.train=1",
        "data.synthetic.val=1",
        "logger=none",
        "post_share=false",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    for size, count in ((64, 2), (32, 3)):
        spec = [f"data.synthetic.image_size={size}", f"data.synthetic.test={count}"]
        caplog.clear()
        with caplog.at_level("WARNING"):
            evaluate(compose_train(tmp_path / f"run{size}", [*overrides, *spec], "eval"))
        rows = (tmp_path / f"run{size}" / "run" / "per_image.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + count
        # 64 px resized to 16 is scale 1/4, not the 1/2 trained; 32 px to 16 is 1/2
        assert (WARNING in caplog.text) is (size == 64), caplog.text


def test_scales_met_in_training_are_not_warned_about():
    """Non-square images resized to a square train at two scales; running at those, or at one
    of several trained sizes, is no scale it never saw."""
    wide = {"train_protocol": "resize", "patch_size": 256, "image_sizes": [[512, 1024]]}
    assert scale_warning(wide, "x", "eval.py", "", [0.25, 0.5], "resized") is None
    assert scale_warning(wide, "x", "predict.py", "") is not None
    mixed = {
        "train_protocol": "resize",
        "patch_size": 256,
        "image_sizes": [[256, 256], [1024, 1024]],
    }
    assert scale_warning(mixed, "x", "predict.py", "") is None


def test_a_data_module_of_ones_own_is_not_judged():
    """Without changecam's protocol, patch size or image sizes nothing can be compared."""
    from types import SimpleNamespace

    from changecam.cli.common import warn_split_scale

    hparams = {DATA_KEY: RESIZED_64}
    for module in (
        SimpleNamespace(),
        SimpleNamespace(eval_protocol="tiles", patch_size=32),  # no image_sizes
    ):
        for windows in (False, True):
            assert warn_split_scale("x", hparams, module, "test", "eval.py", windows) is None
    # with the image sizes it is judged: tiles of 64 px images run at scale 1, not 1/2
    ours = SimpleNamespace(eval_protocol="tiles", patch_size=32, image_sizes=lambda _: [(64, 64)])
    assert WARNING in warn_split_scale("x", hparams, ours, "test", "eval.py", False)
    windows = warn_split_scale("x", hparams, ours, "test", "eval.py", True)
    assert (
        "on whole images at their own resolution (sliding_window.enabled=true, scale 1)" in windows
    )

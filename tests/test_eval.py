"""eval.py: pooled and per-image scores on a hand-made prediction set, seed-style figure, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from changecam.cli.evaluate import evaluate
from changecam.data.io import write_png
from changecam.evaluation.per_image import (
    PerImageScores,
    image_scores,
    mean_of_group_scores,
    whole_image_post_share,
)
from changecam.models import SiameseUNet
from changecam.models.protocol import network_config
from changecam.training.checkpoint import CONFIG_KEY, PREFIX_KEY
from helpers import compose_train, run_script
from test_checkpoint import make_lightning_checkpoint
from wandb_offline import config, job_type

EPS = 1e-5  # BatchNorm's eps: running_var = 1 - eps makes it the exact identity


def red_detector() -> SiameseUNet:
    """A real SiameseUNet wired by hand: logit +10 where the post image's red band is 1 and the
    pre image's is 0, else -10 (every 3x3 kernel uses its centre only: translation-equivariant).
    """
    net = SiameseUNet(in_channels=3, base_channels=1, depth=1, fusion="diff", shared_encoder=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.zero_()
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - EPS)
        net.encoder1.conv1.conv.weight[0, 0, 1, 1] = 1.0  # red band
        net.encoder1.conv2.conv.weight[0, 0, 1, 1] = 1.0
        net.decoder1.conv1.conv.weight[0, 1, 1, 1] = 1.0  # the fused skip post - pre
        net.decoder1.conv2.conv.weight[0, 0, 1, 1] = 1.0
        net.final_conv.weight.fill_(20.0)
        net.final_conv.bias.fill_(-10.0)
    return net.eval()


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory) -> tuple[Path, Path]:
    """Two 32x32 test pairs in the LEVIR-CD layout and the red detector's weights.

    test_1: prediction rows 0-7, label rows 4-11 (cols 0-7): TP 32, FP 32, FN 32, TN 928.
    test_2: nothing predicted, nothing labelled: TN 1024.
    """
    root = tmp_path_factory.mktemp("hand_made")
    black = np.zeros((32, 32, 3), np.uint8)
    post1 = black.copy()
    post1[0:8, 0:8, 0] = 255
    label1 = np.zeros((32, 32), np.uint8)
    label1[4:12, 0:8] = 255
    for name, post, label in (
        ("test_1", post1, label1),
        ("test_2", black, np.zeros((32, 32), np.uint8)),
    ):
        write_png(root / "test" / "A" / f"{name}.png", black)
        write_png(root / "test" / "B" / f"{name}.png", post)
        write_png(root / "test" / "label" / f"{name}.png", label)
    weights = root / "red_detector.pth"
    torch.save(red_detector().state_dict(), weights)
    return root, weights


def hand_made_overrides(root: Path, weights: Path) -> list[str]:
    return [
        f"ckpt_path={weights}",
        "model=siamese_unet",
        "model.base_channels=1",
        "model.depth=1",
        "model.fusion=diff",
        f"data.root={root}",
        "data.synthetic=null",
        "data.layout=levir",
        "data.patch_size=32",
        "data.eval_batch_size=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_red_detector_predicts_what_it_should():
    pre = torch.zeros(1, 3, 4, 4)
    post = torch.zeros(1, 3, 4, 4)
    post[0, 0, 0, :2] = 1.0
    with torch.no_grad():
        logits = red_detector()(pre, post)[0, 0]
    expected = torch.full((4, 4), -10.0)
    expected[0, :2] = 10.0
    torch.testing.assert_close(logits, expected)


def test_eval_on_a_hand_made_prediction_set(tmp_path, hand_made):
    cfg = compose_train(
        tmp_path, [*hand_made_overrides(*hand_made), "logger=csv", "seed_batch_size=1"], "eval"
    )
    metrics = evaluate(cfg)
    run = tmp_path / "run"
    # pooled over both images: TP 32, FP 32, FN 32, TN 1952
    expected = {
        "test/f1": 0.5,
        "test/iou": 1 / 3,
        "test/precision": 0.5,
        "test/recall": 0.5,
        "test/accuracy": 1984 / 2048,
        # seed style with batches of 1: per-image scores averaged; test_2 scores 0
        "seed_style/test/f1": 0.25,
        "seed_style/test/iou": 1 / 6,
        "seed_style/test/precision": 0.25,
        "seed_style/test/recall": 0.25,
        "seed_style/test/accuracy": (960 / 1024 + 1.0) / 2,
        "seed_style/batch_size": 1.0,
        # the pre image is black: all positive evidence at enc1 comes from the post date
        "test/post_share/enc1": 1.0,
    }
    assert metrics == pytest.approx(expected, abs=1e-6)
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(expected, abs=1e-6)
    rows = read_rows(run / "per_image.csv")
    assert list(rows[0]) == ["name", "TP", "FP", "FN", "TN", "F1", "IoU", "post_share_enc1"]
    assert [r["name"] for r in rows] == ["test_1_0000_0000", "test_2_0000_0000"]
    assert [(r["TP"], r["FP"], r["FN"], r["TN"]) for r in rows] == [
        ("32", "32", "32", "928"),
        ("0", "0", "0", "1024"),
    ]
    assert float(rows[0]["F1"]) == pytest.approx(0.5) and float(rows[0]["IoU"]) == pytest.approx(
        1 / 3, abs=1e-6
    )
    assert float(rows[1]["F1"]) == 0.0 and float(rows[1]["IoU"]) == 0.0
    assert float(rows[0]["post_share_enc1"]) == pytest.approx(1.0)
    assert rows[1]["post_share_enc1"] == "nan", "nothing predicted: the share is undefined"
    logged = (run / "csv" / "metrics.csv").read_text()
    assert "test/f1" in logged and "seed_style/test/f1" in logged


def test_a_ddp_trainer_config_scores_on_one_device_as_one_process(tmp_path, hand_made, recwarn):
    """trainer=ddp_cpu ran eval's one process under the DDP strategy, warning for every
    metric that it is not synced (helper-158); its guard could never fire."""
    base = [*hand_made_overrides(*hand_made), "logger=none"]
    single = evaluate(compose_train(tmp_path / "single", base, "eval"))
    recwarn.clear()
    ddp = evaluate(compose_train(tmp_path / "ddp", [*base, "trainer=ddp_cpu"], "eval"))
    assert ddp == single
    assert not [w for w in recwarn if "sync_dist" in str(w.message)]
    # the trainer's GPU accelerator is not eval's device (it was refused as needing a GPU),
    # and device=cpu:0 was passed to the trainer as devices=[0] (helper-192)
    gpu = compose_train(tmp_path / "gpu", [*base, "trainer=gpu", "device=cpu:0"], "eval")
    assert evaluate(gpu) == single
    from changecam.cli.config_checks import ConfigError

    for extra, said in (
        (["device=mps"], "device='mps': use auto, cpu, cuda"),
        *(
            [(["device=cuda:0", "trainer=cpu"], "device=cuda:0 but CUDA is not available")]
            if not torch.cuda.is_available()
            else []
        ),
        (["device=cpu", "trainer.precision=16-mixed"], "16-mixed: float16 needs a CUDA GPU"),
    ):
        with pytest.raises((ValueError, ConfigError), match=said):
            evaluate(compose_train(tmp_path / "refused", [*base, *extra], "eval"))


def test_eval_refuses_to_run_as_one_of_several_tasks(tmp_path, hand_made, monkeypatch):
    """A SLURM job of two tasks ran the whole evaluation in each, writing one run folder's
    results twice (helper-159): refused before anything is written."""
    from changecam.cli.config_checks import ConfigError

    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    cfg = compose_train(tmp_path, [*hand_made_overrides(*hand_made), "logger=none"], "eval")
    with pytest.raises(ConfigError, match="one of several launched for one job"):
        evaluate(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a job of one task is one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)  # torchrun --nproc_per_node=1 (helper-161: refused)
    assert evaluate(cfg)["test/f1"] == pytest.approx(0.5, abs=1e-6)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a second rank
    with pytest.raises(ConfigError, match="one of several"):
        evaluate(cfg)


def test_an_undefined_post_share_is_null_and_post_share_false_drops_the_column(tmp_path, hand_made):
    """Nothing predicted (a threshold above every probability): the split's post share is
    undefined, written as null; post_share=false: no post-share column at all."""
    base = [*hand_made_overrides(*hand_made), "logger=none"]
    metrics = evaluate(compose_train(tmp_path / "none", [*base, "threshold=0.99999"], "eval"))
    saved = json.loads((tmp_path / "none" / "run" / "metrics.json").read_text())
    assert metrics["test/post_share/enc1"] is None and saved["test/post_share/enc1"] is None
    assert metrics["test/f1"] == 0.0
    metrics = evaluate(compose_train(tmp_path / "off", [*base, "post_share=false"], "eval"))
    assert not any("post_share" in key for key in metrics)
    rows = read_rows(tmp_path / "off" / "run" / "per_image.csv")
    assert list(rows[0]) == ["name", "TP", "FP", "FN", "TN", "F1", "IoU"]


def test_eval_scores_at_the_checkpoints_threshold_unless_given(tmp_path, hand_made, caplog):
    """The red detector's change probability is sigmoid(10) = 0.99995: a checkpoint trained
    with module.threshold=0.99999 predicts nothing, and eval.py scores it so; threshold=0.5
    given scores test_1's 8 rows (F1 0.5) and says it differs from the checkpoint's."""
    root, _ = hand_made
    net = red_detector()
    ckpt = tmp_path / "strict.ckpt"
    torch.save(
        {
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            CONFIG_KEY: network_config(net),
            PREFIX_KEY: "net.",
            "hyper_parameters": {"threshold": 0.99999, "loss": "bce", "pos_weight": 3.0},
        },
        ckpt,
    )
    base = [*hand_made_overrides(root, ckpt), "logger=none", "post_share=false"]
    own = compose_train(tmp_path / "own", [*base, "logger=wandb"], "eval")
    assert evaluate(own)["test/f1"] == 0.0
    # W&B tells an eval run from training runs, and records what it scored with (its config
    # leaves them to the checkpoint: threshold null, no module)
    (offline,) = (tmp_path / "own/run/wandb").glob("offline-run-*")
    assert job_type(offline) == "eval"
    logged = config(offline)
    assert logged["threshold"] == 0.99999
    assert logged["module"] == {"loss": "bce", "pos_weight": 3.0, "threshold": 0.99999}
    with caplog.at_level("WARNING"):
        given = evaluate(compose_train(tmp_path / "given", [*base, "threshold=0.5"], "eval"))
    assert given["test/f1"] == pytest.approx(0.5)
    assert "trained and scored with module.threshold=0.99999" in caplog.text


def test_seed_style_with_one_batch_equals_the_pooled_scores(tmp_path, hand_made):
    cfg = compose_train(tmp_path, [*hand_made_overrides(*hand_made), "logger=none"], "eval")
    metrics = evaluate(cfg)  # default seed_batch_size=16 > 2 images: one group
    for name in ("f1", "iou", "precision", "recall", "accuracy"):
        assert metrics[f"seed_style/test/{name}"] == pytest.approx(metrics[f"test/{name}"])


@pytest.mark.parametrize(("window", "overlap"), [(32, 0.0), (16, 0.5)])
def test_sliding_window_eval_scores_whole_images(tmp_path, hand_made, window, overlap):
    overrides = [
        *hand_made_overrides(*hand_made),
        "logger=none",
        "sliding_window.enabled=true",
        f"sliding_window.window={window}",
        f"sliding_window.overlap={overlap}",
    ]
    metrics = evaluate(compose_train(tmp_path, overrides, "eval"))
    assert metrics["test/f1"] == pytest.approx(0.5) and metrics["test/iou"] == pytest.approx(1 / 3)
    rows = read_rows(tmp_path / "run" / "per_image.csv")
    assert [r["name"] for r in rows] == ["test_1", "test_2"], "whole images, not tiles"
    assert (rows[0]["TP"], rows[0]["FP"], rows[0]["FN"]) == ("32", "32", "32")


def test_mean_of_group_scores_by_hand():
    counts = torch.tensor([[1, 1, 0, 2], [0, 0, 2, 2], [3, 0, 1, 0]])
    # groups of 2: [1,1,2,4] -> f1 2/5; [3,0,1,0] -> f1 6/7
    assert mean_of_group_scores(counts, 2)["f1"] == pytest.approx((2 / 5 + 6 / 7) / 2)
    assert mean_of_group_scores(counts, 3)["f1"] == pytest.approx(8 / (8 + 1 + 3))
    with pytest.raises(ValueError, match="seed_batch_size=0"):
        mean_of_group_scores(counts, 0)


def test_image_scores_rows():
    rows = image_scores(
        ["a", "b"], torch.tensor([[2, 1, 1, 6], [0, 0, 0, 4]]), torch.tensor([0.25, math.nan])
    )
    assert rows[0].F1 == pytest.approx(4 / 6) and rows[0].IoU == pytest.approx(0.5)
    assert (rows[1].TP, rows[1].TN, rows[1].F1) == (0, 4, 0.0) and math.isnan(rows[1].post_share)


def test_bad_settings_name_the_key(tmp_path, hand_made):
    base = [*hand_made_overrides(*hand_made), "logger=none"]
    evaluate(compose_train(tmp_path, base, "eval"))  # a finished run in the same folder
    assert (tmp_path / "run" / "metrics.json").is_file()
    # judged with the network, before the earlier results are removed (helper-125: after)
    with pytest.raises(
        ValueError, match="post_share_layer='enc9'.*available: \\['input', 'enc1'\\]"
    ):
        evaluate(compose_train(tmp_path, [*base, "post_share_layer=enc9"], "eval"))
    assert (tmp_path / "run" / "metrics.json").is_file()
    with pytest.raises(ValueError, match="split='train'"):  # a typo: its results stay
        evaluate(compose_train(tmp_path, [*base, "split=train"], "eval"))
    assert (tmp_path / "run" / "per_image.csv").exists()
    with pytest.raises(ValueError, match="sliding_window.window=15 must be divisible"):
        evaluate(
            compose_train(
                tmp_path, [*base, "sliding_window.enabled=true", "sliding_window.window=15"], "eval"
            )
        )
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "per_image.csv").is_file()


def test_eval_cli_on_a_trained_checkpoint(tmp_path, tiny_synthetic):
    ckpt = make_lightning_checkpoint(tmp_path / "best.ckpt", tiny_synthetic, steps=2)
    run = tmp_path / "eval_run"
    proc = run_script(
        "eval.py",
        [
            f"ckpt_path={ckpt}",
            "data=synthetic",
            f"data.root={tiny_synthetic}",
            "data.synthetic=null",
            "data.patch_size=32",
            "logger=csv",
            "trainer=cpu",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert {
        "test/f1",
        "test/iou",
        "test/precision",
        "test/recall",
        "test/accuracy",
        "seed_style/test/f1",
    } <= set(metrics)
    rows = read_rows(run / "per_image.csv")
    assert len(rows) == 2 * 4, "2 test images of 64 px in 32 px tiles"
    counts = np.array([[int(r[k]) for k in ("TP", "FP", "FN", "TN")] for r in rows]).sum(0)
    tp, fp, fn, _ = counts
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    assert metrics["test/f1"] == pytest.approx(f1, abs=1e-6), (
        "per-image counts add up to the pooled score"
    )
    assert "test (pooled over all pixels)" in proc.stdout


def test_post_share_of_whole_images_of_odd_size():
    pre = torch.zeros(1, 3, 33, 31)
    post = torch.zeros(1, 3, 33, 31)
    post[0, 0, 30:, 25:] = 1.0  # predicted change touching the bottom-right (padded) border
    share = whole_image_post_share(red_detector(), pre, post, "enc1", threshold=0.5)
    assert share.shape == (1,) and share.item() == pytest.approx(1.0)
    empty = whole_image_post_share(red_detector(), pre, pre, "enc1", threshold=0.5)
    assert math.isnan(empty.item())


def test_a_rows_post_share_explains_the_pixels_that_row_scores_as_change():
    """Under sliding windows the scored logits are blended, not the network's own whole-image
    pass: the share's target is the row's scored change, so it is undefined exactly when the
    row predicts nothing."""
    pre, post = torch.zeros(2, 3, 33, 31), torch.zeros(2, 3, 33, 31)
    post[:, 0, 30:, 25:] = 1.0  # the network itself predicts change here, in both samples
    batch = {"pre": pre, "post": post, "mask": torch.zeros(2, 1, 33, 31), "name": ["a", "b"]}
    scored = torch.full((2, 1, 33, 31), -10.0)
    scored[0, 0, 30:, 25:] = 10.0  # the blended logits: change in a, nothing in b
    rows = PerImageScores(red_detector(), threshold=0.5, post_share_layer="enc1")
    rows.on_test_batch_end(None, None, scored, batch, 0)
    (shares,) = rows._shares
    assert shares[0].item() == pytest.approx(1.0) and math.isnan(shares[1].item())


def test_train_and_eval_give_the_same_test_scores_on_one_checkpoint(tmp_path, tiny_synthetic):
    """eval.py runs train.py's test loop: the same module, data and checkpoint, the same numbers."""
    from changecam.cli.train import train
    from helpers import tiny_overrides

    data = tiny_overrides(tiny_synthetic)
    trained = train(
        compose_train(
            tmp_path / "train",
            ["experiment=quickstart", "trainer.max_epochs=2", "logger=none", *data],
        )
    )
    ckpt = tmp_path / "train" / "run" / "checkpoints" / "best.ckpt"
    evaluated = evaluate(
        compose_train(
            tmp_path / "eval",
            [
                f"ckpt_path={ckpt}",
                "logger=none",
                "post_share=false",
                *[o for o in data if o.startswith(("data.", "trainer."))],
            ],
            "eval",
        )
    )
    names = ["f1", "iou", "precision", "recall", "accuracy", "loss"]
    assert 0 < trained["test/f1"] < 1, "a model that is neither perfect nor empty"
    assert {n: evaluated[f"test/{n}"] for n in names} == {n: trained[f"test/{n}"] for n in names}
    # the loss is a mean over samples: Dice over whole batches made it depend on the batch size
    one_by_one = evaluate(
        compose_train(
            tmp_path / "eval1",
            [
                f"ckpt_path={ckpt}",
                "logger=none",
                "post_share=false",
                *[o for o in data if o.startswith(("data.", "trainer."))],
                "data.eval_batch_size=1",
            ],
            "eval",
        )
    )
    assert one_by_one["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-5)


def test_a_synthetic_set_of_other_settings_is_replaced_with_a_warning(
    tmp_path, hand_made, tiny_synthetic, caplog
):
    """eval.py with data=synthetic writes the set its config describes (the scale check lists
    that set's files), but replaced a set of other settings without a word (helper-114): a
    warning names the settings that differ."""
    import shutil

    from changecam.data.synthetic import SPEC_FILE, other_settings
    from helpers import TINY_SPEC

    root = tmp_path / "set"
    shutil.copytree(tiny_synthetic, root)
    overrides = [o for o in hand_made_overrides(*hand_made) if not o.startswith("data.")]
    spec = ["data.synthetic.image_size=32", "data.synthetic.train=1", "data.synthetic.val=1"]
    cfg = compose_train(
        tmp_path,
        [*overrides, f"data.root={root}", "data.patch_size=32", *spec, "logger=none"],
        "eval",
    )
    with caplog.at_level("WARNING", logger="changecam"):
        evaluate(cfg)
    assert f"replacing the synthetic set in {root}, written with other settings" in caplog.text
    assert "image_size: 64 (asked: 32)" in caplog.text
    assert '"image_size": 32' in (root / SPEC_FILE).read_text()
    assert other_settings(tiny_synthetic, TINY_SPEC) == []

"""``module.init_from`` (weights only, a new run), ``module.init_strict``, ``module.freeze``."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from changecam.cli.config_checks import ConfigError, check_config
from changecam.cli.train import train
from changecam.data import ChangeDetectionDataModule
from changecam.models import SiameseUNet
from changecam.training.checkpoint import CheckpointError
from changecam.training.init_from import freeze_parts, load_initial_weights
from changecam.training.module import ChangeDetectionModule
from helpers import compose_train, quiet_trainer, tiny_overrides


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def run_overrides(synthetic: Path, *extra: str) -> list[str]:
    """Quickstart, tiny, one epoch of two batches, no CAM panels or W&B."""
    return [
        "experiment=quickstart",
        *tiny_overrides(synthetic),
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "callbacks.cam_panels=null",
        "logger=none",
        *extra,
    ]


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory, tiny_synthetic) -> Path:
    """A changecam checkpoint of the tiny network after 3 optimiser steps."""
    torch.manual_seed(1)
    module = ChangeDetectionModule(
        SiameseUNet(3, 4, 2), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2)
    )
    data = ChangeDetectionDataModule(
        tiny_synthetic, layout="levir", patch_size=32, batch_size=4, augment=None
    )
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path_factory.mktemp("source") / "source.ckpt"
    trainer.save_checkpoint(path)
    return path


def net_state(path: Path) -> dict[str, torch.Tensor]:
    """The network's tensors as the file holds them (``net.`` keys of a Lightning
    checkpoint's state_dict), read apart from the loader under test."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def test_init_from_loads_exactly_the_weights(tmp_path, tiny_synthetic, source_ckpt):
    cfg = compose_train(tmp_path, run_overrides(tiny_synthetic, f"module.init_from={source_ckpt}"))
    net = hydra.utils.instantiate(cfg.model)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    module = hydra.utils.instantiate(cfg.module, net=net)
    loaded, expected = module.net.state_dict(), net_state(source_ckpt)
    assert loaded.keys() == expected.keys()
    for key in expected:  # every tensor, buffers (BN running stats, counts) included
        assert torch.equal(loaded[key], expected[key]), key
    assert not all(torch.equal(fresh[k], expected[k]) for k in expected), "weights were copied"
    assert module.init_report.skipped == []


def test_init_from_starts_a_new_run_at_epoch_0_with_a_fresh_optimiser(
    tmp_path, tiny_synthetic, source_ckpt
):
    source = torch.load(source_ckpt, weights_only=True)
    assert source["global_step"] == 3 and source["optimizer_states"][0]["state"][0]["step"] == 3
    cfg = compose_train(tmp_path, run_overrides(tiny_synthetic, f"module.init_from={source_ckpt}"))
    train(cfg)
    new = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (new["epoch"], new["global_step"]) == (0, 2)  # this run's one epoch of 2 steps only
    adam = new["optimizer_states"][0]
    assert {int(s["step"]) for s in adam["state"].values()} == {2}  # not 3 + 2: a fresh optimiser
    assert new["hyper_parameters"]["init_from"] == str(source_ckpt)


def test_init_strict_false_loads_what_fits_and_lists_the_rest(tmp_path, caplog):
    torch.manual_seed(0)
    source = SiameseUNet(3, 4, 2, fusion="concat")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    target = SiameseUNet(3, 4, 3, fusion="concat")  # one stage deeper
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(target, tmp_path / "w.pth")
    message = str(err.value)
    assert message.startswith(f"cannot initialise from it (module.init_from): {tmp_path / 'w.pth'}")
    assert "does not fit the network" in message and "missing keys: encoder3" in message
    assert (
        "a config that fits: model=siamese_unet model.in_channels=3 model.base_channels=4 model.depth=2"
        in message
    )

    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="changecam"):
        module = ChangeDetectionModule(target, init_from=str(tmp_path / "w.pth"), init_strict=False)
    report = module.init_report
    file_state, now = source.state_dict(), target.state_dict()
    # depth 2 -> 3: encoder3 and decoder3 are new, the bottleneck doubles its width
    assert report.unexpected == []
    assert {k.split(".")[0] for k in report.missing} == {"encoder3", "decoder3"}
    assert [s.split(":")[0] for s in report.shape_mismatches] == [
        "bottleneck.conv.weight",
        "bottleneck.conv.bias",
        "bottleneck.bn.weight",
        "bottleneck.bn.bias",
        "bottleneck.bn.running_mean",
        "bottleneck.bn.running_var",
    ]
    for key in report.loaded:
        assert torch.equal(now[key], file_state[key]), key
    for key in report.skipped:
        if key in now:
            assert torch.equal(now[key], before[key]), f"{key} left as initialised"
    assert set(report.loaded) | set(report.skipped) == set(now)
    warning = next(r for r in caplog.records if "module.init_from" in r.getMessage())
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert f"loaded {len(report.loaded)} of {len(now)} tensors" in text
    assert "skipped, not in the file (left as initialised): encoder3.conv1.conv.weight" in text
    assert (
        "shapes differ (left as initialised): bottleneck.conv.weight: file (16, 16, 3, 3) vs model (32, 32, 3, 3)"
        in text
    )


def test_init_strict_false_refuses_a_file_of_another_width(tmp_path):
    """Only batch-norm step counters and the one-channel head's bias fit a network of another
    width: the lenient load "loaded 18 of 129 tensors" and trained from scratch (helper-181)."""
    torch.save(SiameseUNet(3, 8, 2).state_dict(), tmp_path / "wide.pth")
    net = SiameseUNet(3, 4, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(net, tmp_path / "wide.pth", strict=False)
    message = str(err.value)
    assert "not one tensor fits (only " in message and "final_conv.bias" in message
    assert (
        "a config that fits: model=siamese_unet" in message and "model.base_channels=8" in message
    )
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_lenient_load_names_the_config_that_fits_and_warns_of_frozen_random_parts(
    tmp_path, caplog
):
    """A wider first stage only: the rest loads; the warning names the config that fits the
    file, and freezing the part that did not load is called out (it stays random)."""
    torch.manual_seed(0)
    source = SiameseUNet(4, 4, 2)  # four input bands
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="changecam"):
        module = ChangeDetectionModule(
            SiameseUNet(3, 4, 2),
            init_from=str(tmp_path / "w.pth"),
            init_strict=False,
            freeze=["encoder1"],
        )
    assert module.init_report.not_loaded() == ["encoder1.conv1.conv.weight"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    report = next(m for m in messages if m.startswith("module.init_from="))
    assert "a config that fits the whole file: model=siamese_unet model.in_channels=4" in report
    frozen = next(m for m in messages if m.startswith("module.freeze="))
    assert "freezes 1 parameter tensors that module.init_from did not load" in frozen
    assert frozen.endswith("(encoder1.conv1.conv.weight)")


def test_a_lenient_load_of_other_key_names_names_the_config_that_fits(tmp_path, caplog):
    """Per-date encoders (the seed's) loaded into the shared one: only the decoder fits; the
    hint was given for shape mismatches only (helper-185)."""
    torch.save(SiameseUNet(3, 4, 2, shared_encoder=False).state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.WARNING, logger="changecam"):
        module = ChangeDetectionModule(
            SiameseUNet(3, 4, 2), init_from=str(tmp_path / "w.pth"), init_strict=False
        )
    assert module.init_report.missing and not module.init_report.shape_mismatches
    assert "model.shared_encoder=false" in module.init_report.summary()


def test_prefixes_of_torch_compile_and_ddp_are_taken_off(tmp_path):
    torch.manual_seed(0)
    source = SiameseUNet(3, 4, 2)
    for prefix in ("_orig_mod.", "module._orig_mod."):
        torch.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "w.pth")
        net = SiameseUNet(3, 4, 2)
        load_initial_weights(net, tmp_path / "w.pth")  # refused as fitting no network before
        for key, value in net.state_dict().items():
            assert torch.equal(value, source.state_dict()[key]), (prefix, key)


def test_init_include_loads_only_the_named_parts(tmp_path, caplog):
    torch.manual_seed(0)
    source = SiameseUNet(3, 4, 2)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    target = SiameseUNet(3, 4, 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="changecam"):
        module = ChangeDetectionModule(
            target, init_from=str(tmp_path / "w.pth"), init_include=["encoder*", "bottleneck"]
        )
    report, now, file_state = module.init_report, target.state_dict(), source.state_dict()
    trunk = [k for k in now if k.split(".")[0] in ("encoder1", "encoder2", "bottleneck")]
    assert report.loaded == trunk
    assert report.excluded == [k for k in now if k not in trunk]
    assert {k.split(".")[0] for k in report.excluded} == {"decoder2", "decoder1", "final_conv"}
    assert report.missing == report.unexpected == report.shape_mismatches == []
    for key in now:
        assert torch.equal(now[key], (file_state if key in trunk else before)[key]), key
    # the two seeds' convolutions differ, so both groups tell the file from the fresh network
    differ = {k.split(".")[0] for k in now if not torch.equal(file_state[k], before[k])}
    assert differ == {"encoder1", "encoder2", "bottleneck", "decoder2", "decoder1", "final_conv"}
    text = next(r for r in caplog.records if "module.init_from" in r.getMessage()).getMessage()
    assert f"loaded {len(trunk)} of {len(now)} tensors" in text
    assert (
        f"left as initialised, outside module.init_include: {len(report.excluded)} tensors "
        "(decoder2, decoder1, final_conv)" in text
    )


def test_init_include_with_a_file_of_only_those_parts(tmp_path):
    source = SiameseUNet(3, 4, 2).state_dict()
    encoders = {k: v for k, v in source.items() if k.startswith("encoder")}
    torch.save(encoders, tmp_path / "encoders.pth")
    net = SiameseUNet(3, 4, 2)
    report = load_initial_weights(net, tmp_path / "encoders.pth", include=["encoder*"])
    assert report.loaded == list(encoders)
    for key, value in encoders.items():
        assert torch.equal(net.state_dict()[key], value), key
    # strict: every tensor of the named parts must be in the file
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(net, tmp_path / "encoders.pth", include=["encoder1", "decoder1"])
    assert "missing keys: decoder1.upconv.weight" in str(err.value)
    assert "encoder2" not in str(err.value).split("missing keys:")[1].split("\n")[0]
    lenient = load_initial_weights(
        net, tmp_path / "encoders.pth", strict=False, include=["encoder1", "decoder1"]
    )
    assert {k.split(".")[0] for k in lenient.loaded} == {"encoder1"}
    assert {k.split(".")[0] for k in lenient.missing} == {"decoder1"}
    assert lenient.unexpected == []  # encoder2's tensors in the file lie outside the parts


def test_init_include_names_are_checked(tmp_path):
    torch.save(SiameseUNet(3, 4, 2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError) as err:
        load_initial_weights(SiameseUNet(3, 4, 2), tmp_path / "w.pth", include=["encodr*"])
    message = str(err.value)
    assert message.startswith("module.init_include=['encodr*']: 'encodr*' names no part")
    assert "valid top-level names: encoder1, encoder2, bottleneck" in message
    with pytest.raises(ValueError, match=r"module.init_include=\['encoder1'\] names the parts"):
        ChangeDetectionModule(SiameseUNet(3, 4, 2), init_include=["encoder1"])


def test_init_from_refuses_what_eval_refuses(tmp_path):
    net = SiameseUNet(3, 4, 2)
    with pytest.raises(FileNotFoundError, match=r"module.init_from=.*nothing.pth does not exist"):
        load_initial_weights(net, tmp_path / "nothing.pth")
    torch.save(SiameseUNet(3, 4, 2), tmp_path / "whole.pt")  # needs the class to unpickle
    with pytest.raises(CheckpointError, match=r"module.init_from.*needs pickled Python code"):
        load_initial_weights(net, tmp_path / "whole.pt", strict=False)
    state = SiameseUNet(3, 4, 2).state_dict()
    state["final_conv.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"non-finite weights .* final_conv.bias"):
        load_initial_weights(net, tmp_path / "nan.pth")
    torch.save({"a.weight": torch.ones(2)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not one tensor fits"):
        load_initial_weights(net, tmp_path / "foreign.pth", strict=False)
    torch.save(SiameseUNet(3, 8, 2).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches.*model.base_channels=8"):
        load_initial_weights(net, tmp_path / "wide.pth")


def test_freeze_keeps_frozen_parts_bit_identical_after_training_steps(tiny_synthetic):
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2)
    module = ChangeDetectionModule(
        net,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        freeze=["encoder*"],
    )
    assert module.frozen.modules == ("encoder1", "encoder2")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = ChangeDetectionDataModule(
        tiny_synthetic, layout="levir", patch_size=32, batch_size=4, augment=None
    )
    trainer = quiet_trainer(
        max_steps=3, enable_checkpointing=False, limit_val_batches=1, val_check_interval=2
    )
    trainer.fit(module, datamodule=data)
    after = net.state_dict()
    frozen = [k for k in after if k.startswith("encoder")]
    assert any("running_mean" in k for k in frozen) and any("num_batches" in k for k in frozen)
    for key in frozen:  # weights and batch-norm statistics alike
        assert torch.equal(after[key], before[key]), key
    others = [k for k in after if not k.startswith("encoder") and after[k].is_floating_point()]
    assert others and all(not torch.equal(after[k], before[k]) for k in others)
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[i] for i in optimised) == sorted(
        n for n in names.values() if not n.startswith("encoder")
    )


def test_freeze_holds_in_a_fit_resumed_inside_an_epoch(tmp_path, tiny_synthetic):
    """Resumed from a checkpoint written inside an epoch, Lightning skips on_train_epoch_start,
    where the frozen modules were put in eval mode: their batch-norm statistics moved
    (helper-105)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps: int, ckpt_path: str | None = None) -> ChangeDetectionModule:
        torch.manual_seed(0)
        module = ChangeDetectionModule(
            SiameseUNet(3, 4, 2),
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
            freeze=["encoder*"],
        )
        data = ChangeDetectionDataModule(
            tiny_synthetic, layout="levir", patch_size=32, batch_size=2, augment=None
        )
        steps = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)
        trainer = quiet_trainer(max_steps=max_steps, callbacks=[steps], limit_val_batches=0)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    fit(2)
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=True)
    assert saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0, "inside"
    after = fit(4, str(tmp_path / "step=2.ckpt")).net.state_dict()
    frozen = [k for k in after if k.startswith("encoder")]
    assert any("running_mean" in k for k in frozen)
    for key in frozen:
        assert torch.equal(after[key], saved["state_dict"][f"net.{key}"]), key


def test_freeze_names_are_checked():
    net = SiameseUNet(3, 4, 2)
    with pytest.raises(ValueError) as err:
        freeze_parts(net, ["encoder", "decoder1"])
    message = str(err.value)
    assert message.startswith("module.freeze=['encoder', 'decoder1']: 'encoder' names no part")
    assert (
        "valid top-level names: encoder1, encoder2, bottleneck, decoder2, decoder1, final_conv"
        in message
    )
    parts = freeze_parts(SiameseUNet(3, 4, 2), ["decoder1.upconv", "final_conv.weight"])
    assert parts.modules == ("decoder1.upconv",)  # final_conv.weight: that tensor only
    assert parts.parameters == (
        "decoder1.upconv.weight",
        "decoder1.upconv.bias",
        "final_conv.weight",
    )


def test_freezing_every_part_or_a_threshold_outside_0_1_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"module.freeze=\['\*'\] freezes every parameter"):
        ChangeDetectionModule(SiameseUNet(3, 4, 2), freeze=["*"])
    with pytest.raises(ValueError, match=r"module.threshold=2 must be a probability in \[0, 1\)"):
        ChangeDetectionModule(SiameseUNet(3, 4, 2), threshold=2)
    # a negative weight rewarded calling change no change without bound; NaN failed as if the
    # network had diverged (helper-105)
    for weight in (-3, 0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"module.pos_weight=.* must be a finite number > 0"):
            ChangeDetectionModule(SiameseUNet(3, 4, 2), pos_weight=weight)


def test_module_keys_pass_the_config_checks(tmp_path, tiny_synthetic):
    cfg = compose_train(
        tmp_path,
        run_overrides(
            tiny_synthetic,
            "module.init_from=/x.ckpt",
            "module.init_strict=false",
            "module.init_include=[encoder*,bottleneck]",
            "module.freeze=[encoder1]",
        ),
    )
    check_config(cfg, import_targets=False)
    check_config(cfg)
    assert list(cfg.module.init_include) == ["encoder*", "bottleneck"]
    bad = compose_train(tmp_path, run_overrides(tiny_synthetic, "++module.init_strcit=false"))
    with pytest.raises(ConfigError, match="did you mean 'init_strict'"):
        check_config(bad, import_targets=False)


def test_unknown_freeze_name_stops_train_before_fitting(tmp_path, tiny_synthetic):
    cfg = compose_train(tmp_path, run_overrides(tiny_synthetic, "module.freeze=[encodr1]"))
    with pytest.raises(ValueError, match="'encodr1' names no part of SiameseUNet"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_resuming_does_not_read_init_from(tmp_path, tiny_synthetic):
    first = compose_train(tmp_path, run_overrides(tiny_synthetic))
    train(first)
    GlobalHydra.instance().clear()
    again = compose_train(
        tmp_path,
        run_overrides(
            tiny_synthetic,
            "trainer.max_epochs=2",
            "ckpt_path=last",
            f"module.init_from={tmp_path / 'gone.ckpt'}",  # not read: the resume has the weights
            "module.init_include=[encoder1]",  # nor are the parts to take from it
        ),
    )
    train(again)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)

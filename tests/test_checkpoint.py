"""Weights loading: Lightning checkpoints, plain state dicts, the seed layout, refusals, mismatches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import Tensor, nn

from changecam.cli.launch import CONF_DIR
from changecam.data import ChangeDetectionDataModule
from changecam.models import SiameseUNet
from changecam.training.checkpoint import (
    CheckpointError,
    format_suggestion,
    load_network,
    split_checkpoint,
    suggest_siamese_unet,
)
from changecam.training.module import ChangeDetectionModule

NET = "changecam.models.SiameseUNet"


def make_lightning_checkpoint(
    path: Path,
    synthetic_root: Path,
    steps: int = 2,
    patch_size: int = 32,
    train_protocol: str = "tiles",
    **net_kwargs,
) -> Path:
    """A real changecam Lightning checkpoint: a tiny SiameseUNet fitted for a few steps."""
    kwargs = {"base_channels": 4, "depth": 2, **net_kwargs}
    torch.manual_seed(0)
    module = ChangeDetectionModule(
        net=SiameseUNet(**kwargs),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    )
    data = ChangeDetectionDataModule(
        synthetic_root,
        layout="levir",
        train_protocol=train_protocol,
        patch_size=patch_size,
        batch_size=4,
        augment=None,
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def model_cfg(**kwargs) -> dict:
    return {"_target_": NET, "in_channels": 3, "base_channels": 4, "depth": 2, **kwargs}


def compose_model(name: str) -> dict:
    """The network config of a ``model=<name>`` group, as Hydra composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    return OmegaConf.to_container(cfg.model)


# --- the seed notebook's network, written the way the notebook describes it -------------------


class SeedConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class SeedEncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = SeedConvBlock(cin, cout), SeedConvBlock(cout, cout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.conv2(self.conv1(x))
        return skip, self.pool(skip)


class SeedDecoderBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv1, self.conv2 = SeedConvBlock(cout + cskip, cout), SeedConvBlock(cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv2(self.conv1(torch.cat([self.upconv(x), skip], 1)))


class SeedSiameseUNet(nn.Module):
    """Two unshared encoders 64..512, concat skips, 1024->1024 bottleneck, sigmoid output."""

    def __init__(self) -> None:
        super().__init__()
        widths, cin = [64, 128, 256, 512], 3
        for k, w in enumerate(widths, 1):
            setattr(self, f"encoder{k}a", SeedEncoderBlock(cin, w))
            setattr(self, f"encoder{k}b", SeedEncoderBlock(cin, w))
            cin = w
        self.bottleneck = SeedConvBlock(1024, 1024)
        cin = 1024
        for k in (4, 3, 2, 1):
            w = widths[k - 1]
            setattr(self, f"decoder{k}", SeedDecoderBlock(cin, 2 * w, w))
            cin = w
        self.final_conv = nn.Conv2d(64, 1, 1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        skips = []
        for k in range(1, 5):
            sa, a = getattr(self, f"encoder{k}a")(a)
            sb, b = getattr(self, f"encoder{k}b")(b)
            skips.append(torch.cat([sa, sb], 1))
        y = self.bottleneck(torch.cat([a, b], 1))
        for k in (4, 3, 2, 1):
            y = getattr(self, f"decoder{k}")(y, skips[k - 1])
        return torch.sigmoid(self.final_conv(y))


# --- tests --------------------------------------------------------------------------------------


def test_lightning_checkpoint_loads_with_its_stored_config(tmp_path, tiny_synthetic):
    path = make_lightning_checkpoint(tmp_path / "tiny.ckpt", tiny_synthetic, fusion="diff")
    net = load_network(path)
    assert isinstance(net, SiameseUNet) and not net.training
    assert (net.base_channels, net.depth, net.fusion) == (4, 2, "diff")
    raw = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, raw[f"net.{key}"]), key


def test_a_model_config_that_builds_another_network_than_the_checkpoint_is_refused(
    tmp_path, tiny_synthetic
):
    """eval/predict/explain with ``model.fusion=absdiff`` on a ``fusion=diff`` checkpoint (the
    same weight shapes) scored it as that other network without a word (helper-93); the
    network the file records, given again, is fine."""
    path = make_lightning_checkpoint(tmp_path / "tiny.ckpt", tiny_synthetic, fusion="diff")
    with pytest.raises(CheckpointError, match="fusion: 'diff' in the checkpoint, 'absdiff' now"):
        load_network(path, model_cfg(fusion="absdiff"))
    again = load_network(path, model_cfg(fusion="diff"))
    recorded = load_network(path).state_dict()
    assert all(torch.equal(value, recorded[key]) for key, value in again.state_dict().items())
    # settings that choose the starting weights (BiT's init) or act in training only (the FC
    # networks' dropout) build the same loaded network in eval mode (helper-102)
    from changecam.training.checkpoint import STARTING_KEYS, config_changes

    stored, given = {"init": "pytorch", "dropout": 0.1}, {"init": "authors", "dropout": 0.2}
    assert config_changes(stored, given, ignore=STARTING_KEYS | {"dropout"}) == []
    assert config_changes(stored, given) == ["dropout: 0.1 in the checkpoint, 0.2 now"]  # resume


def test_plain_state_dict_needs_a_model_config_and_then_loads(tmp_path):
    torch.manual_seed(1)
    source = SiameseUNet(3, 4, 2, "absdiff", shared_encoder=False).eval()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(
        CheckpointError, match="without a network config; choose the network with model="
    ) as err:
        load_network(path)
    assert "model.base_channels=4 model.depth=2 model.fusion=diff" in str(err.value)
    net = load_network(path, model_cfg(fusion="absdiff", shared_encoder=False))
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x, y), source(x, y))


@pytest.mark.parametrize("wrap", ["state_dict", "model_state_dict", "module_prefix"])
def test_common_wrappers_of_a_state_dict(tmp_path, wrap):
    source = SiameseUNet(3, 4, 2)
    state = source.state_dict()
    obj = {
        "state_dict": {"state_dict": state, "epoch": 3},
        "model_state_dict": {"model_state_dict": state, "optimizer_state_dict": {}},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "w.pth")
    net = load_network(tmp_path / "w.pth", model_cfg())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_seed_layout_state_dict_loads_into_siamese_unet_seed(tmp_path):
    torch.manual_seed(2)
    seed = SeedSiameseUNet().eval()
    path = tmp_path / "seed_unet.pth"
    torch.save(seed.state_dict(), path)  # what the seed notebook saves
    with pytest.raises(CheckpointError, match="model=siamese_unet_seed"):
        load_network(path)  # no config: the message names the one that fits
    net = load_network(path, compose_model("siamese_unet_seed"))
    assert net.shared_encoder is False and net.base_channels == 64
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(net(a, b)), seed(a, b), rtol=0, atol=1e-6)


def test_pickled_code_is_refused_with_a_message(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(SiameseUNet(3, 4, 2), path)  # the whole module object: needs its class to unpickle
    with pytest.raises(CheckpointError) as err:
        load_network(path, model_cfg())
    message = str(err.value)
    assert "needs pickled Python code" in message and "weights_only=True" in message
    assert "torch.save(model.state_dict(), path)" in message
    assert "SiameseUNet" in message, "the detail names the refused class"
    assert "\x1b[" not in message


def test_architecture_mismatch_lists_keys_and_the_config_that_fits(tmp_path, tiny_synthetic):
    path = make_lightning_checkpoint(tmp_path / "tiny.ckpt", tiny_synthetic, steps=1)
    with pytest.raises(CheckpointError) as err:
        load_network(path, model_cfg(shared_encoder=False))
    message = str(err.value)
    assert "does not fit the network" in message
    assert "missing keys: encoder1a.conv1.conv.weight" in message
    assert "unexpected keys: encoder1.conv1.conv.weight" in message
    assert message.endswith(
        "a config that fits: model=siamese_unet model.in_channels=3 model.base_channels=4 "
        "model.depth=2 model.shared_encoder=true"
    )  # the recorded config's values that differ from conf/model/siamese_unet.yaml, widths,
    # and the value the failed config set otherwise (or the hint would keep shared_encoder=false)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys: encoder3.*model.depth=2$"):
        load_network(path, model_cfg(depth=3))


def test_the_hint_names_the_values_the_failed_config_set_otherwise(tmp_path):
    """A plain state dict of the preset's fusion (concat), loaded with model.fusion=diff: the
    hint must name model.fusion=concat, though it equals conf/model/siamese_unet.yaml's."""
    torch.save(SiameseUNet(3, 8, 2, fusion="concat").state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        load_network(tmp_path / "w.pth", model_cfg(base_channels=8, fusion="diff"))
    assert str(err.value).endswith(
        "a config that fits: model=siamese_unet model.in_channels=3 model.base_channels=8 "
        "model.depth=2 model.fusion=concat"
    )


def test_shape_mismatch_is_a_checkpoint_error_not_a_runtime_error(tmp_path):
    torch.save(SiameseUNet(3, 8, 2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        load_network(tmp_path / "w.pth", model_cfg())
    assert (
        "shape mismatches: encoder1.conv1.conv.weight: file (8, 3, 3, 3) vs model (4, 3, 3, 3)"
        in str(err.value)
    )
    assert "model.base_channels=8" in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        load_network(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt is not a readable PyTorch checkpoint"):
        load_network(tmp_path / "junk.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint"):
        load_network(tmp_path / "tensor.pt")
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no weight tensors"):
        load_network(tmp_path / "empty.pt", model_cfg())


def test_lightning_checkpoint_of_another_module_is_explained():
    obj = {"pytorch-lightning_version": "2.4", "state_dict": {"model.layer.weight": torch.zeros(1)}}
    with pytest.raises(
        CheckpointError, match=r"without network weights under 'net.' .*\['model'\]"
    ):
        split_checkpoint(obj, "other.ckpt")


def test_suggestions_from_state_dicts():
    assert suggest_siamese_unet(SiameseUNet(3, 4, 3, "absdiff").state_dict()) == {
        "in_channels": 3,
        "base_channels": 4,
        "depth": 3,
        "fusion": "diff",
        "shared_encoder": True,
    }
    hint = suggest_siamese_unet(SiameseUNet(3, 64, 4, "concat", shared_encoder=False).state_dict())
    assert format_suggestion(hint) == "model=siamese_unet_seed"
    assert "or model.fusion=absdiff" in format_suggestion(
        suggest_siamese_unet(SiameseUNet(3, 4, 2, "diff").state_dict())
    )
    assert suggest_siamese_unet({"fc.weight": torch.zeros(2, 2)}) is None


def test_resuming_as_another_network_with_the_same_shapes_is_refused(tmp_path, tiny_synthetic):
    """fusion=diff and absdiff have the same weights: a resume was accepted and went on
    training the checkpoint as the other network (helper-75)."""
    from changecam.training.checkpoint import check_resume_checkpoint

    ckpt = make_lightning_checkpoint(tmp_path / "last.ckpt", tiny_synthetic, steps=1, fusion="diff")
    check_resume_checkpoint(ckpt, SiameseUNet(base_channels=4, depth=2, fusion="diff"))
    with pytest.raises(CheckpointError, match=r"fusion: 'diff' in the checkpoint, 'absdiff' now"):
        check_resume_checkpoint(ckpt, SiameseUNet(base_channels=4, depth=2, fusion="absdiff"))

"""SNUNet-CD (model=snunet): published size, shapes, taps and HiResCAM, rebuild, a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from changecam.cli.train import train
from changecam.explain import explain_batch
from changecam.models import build_network, find_taps
from changecam.models.snunet import SNUNet
from helpers import compose_train, tiny_overrides

ENCODER_TAPS = [f"pre/enc{k}" for k in range(1, 5)] + [f"post/enc{k}" for k in range(1, 6)]
NESTED_TAPS = ["x0_1", "x1_1", "x0_2", "x2_1", "x1_2", "x0_3", "x3_1", "x2_2", "x1_3", "x0_4"]


def tiny_snunet(seed: int = 0) -> SNUNet:
    """Width 4, with BatchNorm statistics and affine terms that make eval mode matter."""
    torch.manual_seed(seed)
    net = SNUNet(3, 4)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def pair(b: int = 2, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    pre, post = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    roi = torch.rand(b, 1, size, size, generator=g) > 0.6
    return pre, post, roi


def test_published_parameter_count_at_width_32():
    """SNUNet-CD/32 has 12.03 M parameters (ours: the head has one output, not two)."""
    count = sum(p.numel() for p in SNUNet(3, 32).parameters())
    assert count == pytest.approx(12.0e6, rel=0.05)
    assert count == 12_034_849  # the reference's 12,034,978 less one 128->1 head channel + bias


def test_output_shape_and_input_errors():
    net = tiny_snunet()
    pre, post, _ = pair(size=32)
    assert net(pre, post).shape == (2, 1, 32, 32)
    assert net(pre[..., :16, :], post[..., :16, :]).shape == (2, 1, 16, 32)
    assert net.size_multiple == 16
    with pytest.raises(ValueError, match=r"must be divisible by 16 \(SNUNet pools 4 times\)"):
        net(pre[..., :24, :], post[..., :24, :])
    with pytest.raises(ValueError, match="same shape"):
        net(pre, post[..., :16])
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        net(pre[:, :2], post[:, :2])
    with pytest.raises(ValueError, match="model.base_channels=2 must be >= 4"):
        SNUNet(3, 2)


def test_every_tap_runs_once_with_the_documented_shapes():
    net = tiny_snunet()
    taps = find_taps(net)
    assert list(taps) == net.tap_names == [*ENCODER_TAPS, *NESTED_TAPS, "head_in"]
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = [
        t.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(o.shape))
        for n, t in taps.items()
    ]
    pre, post, _ = pair(size=32)
    net(pre, post)
    for h in handles:
        h.remove()
    assert {n: len(v) for n, v in seen.items()} == dict.fromkeys(taps, 1)
    assert seen["pre/enc1"] == seen["post/enc1"] == [(2, 4, 32, 32)]
    assert seen["post/enc5"] == [(2, 64, 2, 2)]
    assert seen["x3_1"] == [(2, 32, 4, 4)] and seen["x1_3"] == [(2, 8, 16, 16)]
    assert seen["x0_4"] == [(2, 4, 32, 32)]
    assert seen["head_in"] == [(2, 16, 32, 32)]  # ECAM over the four X_{0,j}


def hand_hirescam(net: nn.Module, tap: str, pre, post, roi) -> torch.Tensor:
    """HiResCAM by hand: ∂S/∂A ⊙ A summed over channels, S = Σ roi ⊙ logits per sample."""
    kept: list[torch.Tensor] = []

    def keep(module, inputs, output):
        output.retain_grad()
        kept.append(output)

    handle = find_taps(net)[tap].register_forward_hook(keep)
    logits = net(pre.clone(), post.clone())
    handle.remove()
    (roi.float() * logits).sum().backward()
    (activation,) = kept
    net.zero_grad(set_to_none=True)
    return (activation.grad * activation).sum(1).detach()


def test_hirescam_at_every_tap_and_post_shares():
    net = tiny_snunet()
    pre, post, roi = pair(size=32)
    exp = explain_batch(net, pre, post, target="roi", roi=roi)
    assert exp.taps == ("pre/input", "post/input", *net.tap_names)  # input: every model
    for tap in net.tap_names:
        assert exp.map(tap).shape[0] == 2 and exp.map(tap, upsampled=True).shape == (2, 32, 32)
        assert exp.map(tap).abs().max() > 1e-3, f"{tap}: a map of zeros explains nothing"
    assert exp.layers == ["input", "enc1", "enc2", "enc3", "enc4"]  # no pre/enc5: see docstring
    shares = exp.post_shares()
    assert set(shares) == set(exp.layers)
    assert all(((s > 0) & (s < 1)).all() for s in shares.values())
    for tap in ("pre/enc2", "post/enc5", "x1_2"):
        expected = hand_hirescam(net, tap, pre, post, roi)
        torch.testing.assert_close(exp.map(tap), expected, atol=1e-5, rtol=1e-5)


def test_config_rebuilds_the_network_and_loads_its_state_dict():
    net = tiny_snunet()
    config = net.config()
    assert config == {
        "_target_": "changecam.models.snunet.SNUNet",
        "in_channels": 3,
        "base_channels": 4,
    }
    rebuilt = build_network(config)
    assert isinstance(rebuilt, SNUNet)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    pre, post, _ = pair(b=1, size=16)
    torch.testing.assert_close(rebuilt.eval()(pre, post), net(pre, post))


def snunet_tiny_overrides(synthetic_root: Path) -> list[str]:
    """helpers.tiny_overrides without model.depth (SNUNet has none): 32 px tiles, width 4."""
    return tiny_overrides(synthetic_root, model=["model.base_channels=4"])


def test_quickstart_with_snunet_composes_and_runs_fast_dev_run(tmp_path, tiny_synthetic):
    quickstart = compose_train(tmp_path / "composed", ["experiment=quickstart", "model=snunet"])
    assert quickstart.model._target_ == "changecam.models.snunet.SNUNet"
    assert quickstart.model.base_channels == 8

    overrides = ["experiment=quickstart", "model=snunet", "debug=fdr", "logger=none"]
    cfg = compose_train(tmp_path, [*overrides, *snunet_tiny_overrides(tiny_synthetic)])
    metrics = train(cfg)
    assert {"val/f1", "val/iou", "test/f1", "test/precision", "test/recall"} <= set(metrics)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)

"""BIT (changecam.models.bit): published size, shapes, taps and HiResCAM, rebuild, quickstart fdr."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from changecam.cli.train import train
from changecam.explain.hirescam import explain_batch
from changecam.models import build_network, find_taps
from changecam.models.bit import BIT
from helpers import compose_train, tiny_overrides

PER_DATE = ["stem", "layer1", "layer2", "layer3", "features", "tokens", "decoded"]
TAPS = [f"{d}/{layer}" for layer in PER_DATE for d in ("pre", "post")] + ["diff", "head_in"]


def tiny_bit(seed: int = 0) -> BIT:
    """Width 8 with PyTorch's initialisation and non-trivial BN statistics, so that maps are of
    order 1 (the authors' N(0, 0.02) initialisation makes every logit nearly 0)."""
    torch.manual_seed(seed)
    net = BIT(base_channels=8, dec_depth=2, init="pytorch")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def pair(b: int = 2, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


def test_published_width_has_the_published_parameter_count():
    net = BIT()  # BIT_S4: in_channels 3, base 64, 4 tokens, encoder 1, decoder 8
    n_params = sum(p.numel() for p in net.parameters())
    assert abs(n_params - 3.55e6) / 3.55e6 < 0.05, n_params
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # the authors' module names and widths: trunk to layer3 (256), token width 32, 8 heads x 64
    assert shapes["resnet.layer3.1.conv2.weight"] == (256, 256, 3, 3)
    assert not any(k.startswith("resnet.layer4") for k in shapes)
    assert shapes["conv_pred.weight"] == (32, 256, 3, 3)
    assert shapes["conv_a.weight"] == (4, 32, 1, 1) and shapes["pos_embedding"] == (1, 8, 32)
    assert shapes["transformer.layers.0.0.fn.fn.to_qkv.weight"] == (3 * 512, 32)
    assert shapes["transformer_decoder.layers.7.0.fn.fn.to_q.weight"] == (512, 32)
    assert "transformer_decoder.layers.8.0.fn.norm.weight" not in shapes
    assert shapes["classifier.3.weight"] == (1, 32, 3, 3)  # one logit channel, not two classes


def test_output_shape_taps_and_size_multiple():
    net = tiny_bit()
    seen: dict[str, list[tuple[int, ...]]] = {}
    hooks = [
        t.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(o.shape))
        for n, t in find_taps(net).items()
    ]
    out = net(*pair(2, 32))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 1, 32, 32)
    assert net.tap_names == TAPS and sorted(seen) == sorted(TAPS)
    assert all(len(v) == 1 for v in seen.values()), "each tap runs exactly once per forward"
    assert seen["pre/stem"][0] == (2, 8, 16, 16)
    assert seen["post/layer1"][0] == (2, 8, 8, 8)
    assert seen["pre/layer3"][0] == (2, 32, 4, 4)  # output stride 8, widths base x (1, 2, 4)
    assert seen["pre/features"][0] == (2, 4, 8, 8) == seen["post/decoded"][0]
    assert seen["post/tokens"][0] == (2, 4 * 4, 8, 8)  # (token, channel) x h x w
    assert seen["diff"][0] == (2, 4, 8, 8) and seen["head_in"][0] == (2, 4, 32, 32)
    assert net.size_multiple == 8
    with pytest.raises(ValueError, match="divisible by the output stride 8"):
        net(*pair(1, 36))
    with pytest.raises(ValueError, match="same shape"):
        net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 40))
    with pytest.raises(ValueError, match="model.base_channels"):
        BIT(base_channels=1)


def test_which_pre_taps_the_post_image_reaches():
    """Up to the tokens a date's taps are its own pixels' alone; the decoder's queries are, but
    the tokens they read went through the encoder's attention over both dates."""
    net = tiny_bit()
    pre, post = pair(1, 32)
    outputs = []
    for other in (post, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))):
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            t.register_forward_hook(lambda m, i, o, n=n, s=seen: s.__setitem__(n, o.detach()))
            for n, t in find_taps(net).items()
            if n.startswith("pre/")
        ]
        with torch.no_grad():
            net(pre, other)
        for h in hooks:
            h.remove()
        outputs.append(seen)
    moved = [n for n in outputs[0] if not torch.equal(outputs[0][n], outputs[1][n])]
    assert moved == ["pre/decoded"]


def test_hirescam_maps_shares_and_autograd():
    net = tiny_bit()
    pre, post = pair(2, 32)
    exp = explain_batch(net, pre, post, target="all")
    assert list(exp.taps) == ["pre/input", "post/input", *TAPS]  # input: every model
    assert set(exp.raw["hirescam"]) == set(exp.raw["gradcam"]) == set(exp.taps)
    assert exp.layers == ["input", *PER_DATE]
    shares = exp.post_shares()
    assert set(shares) == set(exp.layers)
    assert all(((s >= 0) & (s <= 1)).all() for s in shares.values())

    # by hand: S = sum of all logits; grad of S w.r.t. each activation, times it, over channels
    acts: dict[str, torch.Tensor] = {}
    taps = find_taps(net)
    hooks = [
        taps[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
        for n in ("post/layer2", "pre/tokens")
    ]
    encoder_input: list[torch.Tensor] = []
    hooks.append(net.transformer.register_forward_pre_hook(lambda m, a: encoder_input.append(a[0])))
    logits = net(pre, post)
    for h in hooks:
        h.remove()
    tokens = encoder_input[0]
    grads = torch.autograd.grad(logits.sum(), [acts["post/layer2"], acts["pre/tokens"], tokens])
    hand = (grads[0] * acts["post/layer2"]).sum(1)
    assert hand.abs().max() > 1e-2  # a map of order 1, so the tolerance below means something
    torch.testing.assert_close(exp.map("post/layer2"), hand, rtol=1e-5, atol=1e-5)

    # the tokens tap: spreading each token over the pixels it pools is exact; its map sums to the
    # pre tokens' gradient x input, and its sum over space is the authors' einsum tokenizer
    length = net.token_len
    pre_tokens = (tokens - net.pos_embedding)[:, :length]
    token_attribution = (grads[2][:, :length] * pre_tokens).sum((1, 2))
    torch.testing.assert_close(
        exp.map("pre/tokens").sum((1, 2)), token_attribution, rtol=1e-4, atol=1e-5
    )
    with torch.no_grad():
        features = net._features(pre, "pre")
        attention = net.conv_a(features).flatten(2).softmax(-1)
        einsum = torch.einsum("bln,bcn->blc", attention, features.flatten(2))
    torch.testing.assert_close(pre_tokens.detach(), einsum, rtol=1e-5, atol=1e-6)


def test_config_rebuilds_the_network_and_loads_its_weights():
    net = tiny_bit()
    config = net.config()
    assert config["_target_"] == "changecam.models.bit.BIT"
    assert config["base_channels"] == 8 and config["dec_depth"] == 2
    rebuilt = build_network(config)
    assert isinstance(rebuilt, BIT)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    pre, post = pair(1, 32)
    torch.testing.assert_close(rebuilt.eval()(pre, post), net(pre, post))


def bit_tiny_overrides(synthetic_root) -> list[str]:
    """helpers.tiny_overrides without its U-Net key (model.depth): 32 px tiles, width 8."""
    return tiny_overrides(synthetic_root, model=["model.dec_depth=2"])


def test_quickstart_with_bit_runs_fast_dev_run(tmp_path, tiny_synthetic):
    overrides = ["experiment=quickstart", "model=bit", "debug=fdr", "logger=none"]
    cfg = compose_train(tmp_path, [*overrides, *bit_tiny_overrides(tiny_synthetic)])
    assert cfg.model._target_ == "changecam.models.bit.BIT" and cfg.model.base_channels == 8
    metrics = train(cfg)
    assert {"val/f1", "val/iou", "test/f1", "test/precision", "test/recall"} <= set(metrics)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)

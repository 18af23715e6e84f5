"""The input layer of every model (gradient × input) and Integrated Gradients through captum."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from changecam.data.transforms import image_to_tensor
from changecam.evaluation.per_image import whole_image_post_share
from changecam.explain import (
    ExplainSettings,
    FaithfulnessSettings,
    IntegratedGradientsSettings,
    TapError,
    choose_layer,
    explain_batch,
    explain_pair,
    explain_tensors,
    faithfulness,
    render_panel,
)
from changecam.explain.integrated import baselines
from changecam.explain.runner import pad_to_multiple
from changecam.models import SiameseUNet, Tap

IG = "integrated_gradients"


def tiny_net(fusion: str = "concat", seed: int = 0) -> SiameseUNet:
    torch.manual_seed(seed)
    net = SiameseUNet(3, 4, 2, fusion)  # type: ignore[arg-type]
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval()


class Smooth(nn.Module):
    """A smooth (tanh) detector without taps: the path integral converges fast."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        self.symmetric = symmetric
        torch.manual_seed(1)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        if self.symmetric:  # the same score for swapped dates
            pre, post = (pre - post).abs(), (pre - post).abs()
        return self.head(torch.tanh(self.conv(torch.cat([pre, post], 1)))) * 4


def pair(b: int = 2, size: int = 16, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


def test_input_maps_are_gradient_times_input():
    net = tiny_net()
    pre, post = pair()
    exp = explain_batch(net, pre, post, target="all")
    assert exp.taps[:2] == ("pre/input", "post/input") and exp.taps[2:] == tuple(net.tap_names)
    assert exp.layers[0] == "input" and choose_layer(exp.layers) == "enc2"  # deepest stays real
    x_pre, x_post = pre.clone().requires_grad_(True), post.clone().requires_grad_(True)
    g_pre, g_post = torch.autograd.grad(net(x_pre, x_post).sum(), [x_pre, x_post])
    for date, x, g in (("pre", pre, g_pre), ("post", post, g_post)):
        hires, gradcam = exp.raw["hirescam"][f"{date}/input"], exp.raw["gradcam"][f"{date}/input"]
        torch.testing.assert_close(hires, (g * x).sum(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            gradcam, (g.mean((2, 3), keepdim=True) * x).sum(1), atol=1e-5, rtol=1e-5
        )
        assert hires.abs().max() > 0.05
        assert exp.upsampled["hirescam"][f"{date}/input"].shape == (2, 16, 16)
    assert all(p.grad is None for p in net.parameters())


def test_every_model_has_the_input_layer():
    model = Smooth()
    pre, post = pair()
    exp = explain_batch(model, pre, post, target="all")  # no taps at all
    assert exp.taps == ("pre/input", "post/input") and exp.layers == ["input"]
    with pytest.raises(TapError, match="Smooth has no taps but the input.*LayerTaps"):
        explain_batch(model, pre, post, taps=["enc1"])

    class Reserved(Smooth):
        def __init__(self) -> None:
            super().__init__()
            self.tap = Tap("pre/input")

    with pytest.raises(TapError, match="reserved for the model's inputs"):
        explain_batch(Reserved(), pre, post)


def test_input_layer_through_the_runner_and_the_post_share():
    net = tiny_net(seed=3)
    g = np.random.default_rng(0)
    pre_u8, post_u8 = (g.integers(0, 255, (18, 14, 3), dtype=np.uint8) for _ in range(2))
    settings = ExplainSettings(
        taps=("input",),
        target="all",
        panel_layer="input",
        faithfulness=FaithfulnessSettings(steps=2, dates=("both",), layer="input"),
        dpi=20,
    )
    assert settings.layers(net) == ["input"]
    result = explain_pair(net, pre_u8, post_u8, settings=settings)  # padded 18×14 -> 20×16
    assert result.padded_size == (20, 16)
    assert result.explanation.taps == ("pre/input", "post/input")
    assert result.explanation.map("pre/input").shape == (1, 18, 14)
    assert result.faithfulness.layer == "input" and result.panel.ndim == 3
    summary = result.summary()
    assert list(summary["post_share"]) == ["input"] and 0 < summary["post_share"]["input"] < 1

    pre, post = pair(seed=4)
    batch = explain_tensors(net, pre, post, settings).explanation
    share = whole_image_post_share(net, pre, post, "input", threshold=0.0)  # eval's column
    assert share.shape == (2,) and torch.isfinite(share).all()
    torch.testing.assert_close(share, batch.post_share("input"))
    for key, what in (("label", "label"), ("roi", "region of interest")):
        wrong = {key: torch.ones(1, 1, 16, 14) if key == "label" else torch.ones(9, 9)}
        roi = dict(target="roi" if key == "roi" else "ground_truth")
        with pytest.raises(ValueError, match=f"{what} has shape .*expected 16 x 16 pixels"):
            explain_tensors(net, pre, post, replace(settings, **roi), **wrong)


def blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of each band written out in numpy: weights exp(-t²/2σ²) over
    |t| <= ceil(3σ), normalised, along rows then columns, borders replicated."""
    radius = int(np.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1)
    weights = np.exp(-(t**2) / (2 * sigma**2))
    weights /= weights.sum()
    out = x.double().numpy()
    for axis in (3, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        size = out.shape[axis]
        out = sum(
            w * np.take(padded, np.arange(k, k + size), axis=axis) for k, w in enumerate(weights)
        )
    return torch.from_numpy(out).to(x.dtype)


def expected_baselines(base: str, pre, post, sigma: float):
    """The baseline pairs of `explain.ig.baseline`, built apart from the code under test."""
    if base == "other_date":
        return post, pre
    if base == "midpoint":
        return (pre + post) / 2, (pre + post) / 2
    return blurred(pre, sigma), blurred(post, sigma)


def test_the_blur_of_the_test_is_a_blur():
    """The oracle itself: a constant image stays constant, a point spreads as the Gaussian."""
    flat = torch.full((1, 1, 9, 9), 0.25)
    torch.testing.assert_close(blurred(flat, 1.0), flat)
    point = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    point[0, 0, 10, 10] = 1
    spread = blurred(point, 1.5)[0, 0]
    assert spread.sum().item() == pytest.approx(1.0)
    assert spread[10, 10] == spread.max() and spread[10, 12].item() == pytest.approx(
        spread[10, 10].item() * np.exp(-4 / (2 * 1.5**2))
    )


@pytest.mark.parametrize("base", ["midpoint", "other_date", "blur"])
def test_integrated_gradients_completeness(base):
    model = Smooth()
    pre, post = pair(seed=5)
    ig = IntegratedGradientsSettings(steps=48, baseline=base, blur_sigma=2.0)
    exp = explain_batch(model, pre, post, target="all", methods=["hirescam", IG], ig=ig)
    b_pre, b_post = expected_baselines(base, pre, post, sigma=2.0)
    for ours, theirs in zip(baselines(pre, post, ig), (b_pre, b_post), strict=True):
        torch.testing.assert_close(ours, theirs)
    with torch.no_grad():
        s_base = model(b_pre, b_post).sum((1, 2, 3))
    total = sum(exp.raw[IG][t].flatten(1).sum(1) for t in ("pre/input", "post/input"))
    torch.testing.assert_close(total, exp.score - s_base, atol=1e-3, rtol=1e-3)
    assert (exp.score - s_base).abs().min() > 0.05, "a path with no change in S proves nothing"
    torch.testing.assert_close(exp.ig["baseline_score"], s_base, atol=1e-3, rtol=1e-3)
    assert exp.ig["delta"].abs().max() < 1e-3  # captum's convergence delta agrees
    assert not torch.allclose(exp.raw[IG]["pre/input"], exp.raw[IG]["post/input"])


def test_completeness_deltas_describe_the_maps_cropped_from_a_padded_pair():
    """The padding's attribution goes with the padding: the deltas a pair reports are those of
    the maps it returns."""
    torch.manual_seed(0)
    net = SiameseUNet(3, base_channels=4, depth=3).eval()
    g = np.random.default_rng(0)
    pre_u8, post_u8 = (g.integers(0, 255, (26, 22, 3), dtype=np.uint8) for _ in range(2))
    settings = ExplainSettings(
        taps=("input", "enc1"),
        methods=("hirescam", IG, "layer_ig"),
        target="all",
        faithfulness=FaithfulnessSettings(enabled=False),
    )
    result = explain_pair(net, pre_u8, post_u8, settings=settings)
    assert result.padded_size == (32, 24)
    exp = result.explanation
    kept = sum(exp.raw[IG][t].sum() for t in ("pre/input", "post/input"))
    torch.testing.assert_close(exp.ig["delta"][0], kept - (exp.score - exp.ig["baseline_score"])[0])
    assert exp.ig["delta"].abs().max() > 1e-3, "the padding held attribution: a real test"
    x_pre, x_post = (pad_to_multiple(image_to_tensor(x)[None], 8) for x in (pre_u8, post_u8))
    valid = torch.zeros(1, 32, 24, dtype=torch.bool)
    valid[:, :26, :22] = True
    padded = explain_batch(  # the same pass, uncropped
        net, x_pre, x_post, taps=settings.taps, target="all", methods=settings.methods, valid=valid
    )
    for tap in ("pre/input", "post/input", "pre/enc1", "post/enc1"):
        key = f"layer_ig_delta/{tap}"  # both tell the same S - S(swapped)
        torch.testing.assert_close(
            exp.raw["layer_ig"][tap].sum() - exp.ig[key][0],
            padded.raw["layer_ig"][tap].sum() - padded.ig[key][0],
            rtol=1e-4,
            atol=1e-4,
        )


def test_other_date_baseline_cancels_on_a_symmetric_model():
    """Why midpoint is the default: swapping the dates of a symmetric model changes nothing."""
    model = Smooth(symmetric=True)
    pre, post = pair(seed=6)
    maps = {}
    for base in ("other_date", "midpoint"):
        ig = IntegratedGradientsSettings(steps=32, baseline=base)
        exp = explain_batch(model, pre, post, target="all", methods=[IG], ig=ig)
        maps[base] = exp.raw[IG]["post/input"]
    assert maps["other_date"].abs().max() < 1e-4 * maps["midpoint"].abs().max() + 1e-6
    assert maps["midpoint"].abs().max() > 0.01


def test_other_date_maps_of_a_symmetric_siamese_model_are_exact_negatives():
    """Features compared after a nonlinear encoder: the path's second half is its first with
    the dates swapped, so the total cancels but each pixel's evidence does not."""

    class SiameseAbsDiff(Smooth):
        def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
            a, b = (torch.tanh(self.conv(torch.cat([x, x], 1))) for x in (pre, post))
            return self.head((a - b).abs()) * 4

    pre, post = pair(seed=6)
    ig = IntegratedGradientsSettings(steps=32, baseline="other_date")
    exp = explain_batch(SiameseAbsDiff(), pre, post, target="all", methods=[IG], ig=ig)
    pre_map, post_map = exp.raw[IG]["pre/input"], exp.raw[IG]["post/input"]
    assert pre_map.abs().max() > 0.01
    torch.testing.assert_close(post_map, -pre_map, atol=1e-5, rtol=1e-4)


def test_a_method_with_maps_at_the_input_only():
    net = tiny_net(seed=7)
    pre, post = pair(seed=8)
    only_ig = explain_batch(
        net, pre, post, target="all", methods=[IG], ig=IntegratedGradientsSettings(steps=4)
    )
    assert only_ig.taps == ("pre/input", "post/input") and list(only_ig.raw) == [IG]
    exp = explain_batch(
        net, pre, post, target="all", methods=["hirescam", IG], ig=IntegratedGradientsSettings(4)
    )
    assert exp.layers_of(IG) == ["input"] and list(exp.post_shares(IG)) == ["input"]
    assert exp.layers_of("hirescam") == ["input", "enc1", "enc2"]
    with pytest.raises(KeyError, match=r"integrated_gradients has maps at \['pre/input'"):
        exp.map("pre/enc2", IG)
    with pytest.raises(
        ValueError, match=r"faithfulness layer \(integrated_gradients\)='enc2'.*\['input'\]"
    ):
        faithfulness(net, pre, post, exp, layer="enc2", method=IG, steps=2)
    curves = faithfulness(net, pre, post, exp, method=IG, steps=2, dates=["both"])
    assert curves.layer == "input" and curves.method == IG
    pre_rgb, post_rgb = pre[0], post[0]
    assert render_panel(pre_rgb, post_rgb, exp, method=IG, dpi=20).ndim == 3
    with pytest.raises(ValueError, match="panel layer"):
        render_panel(pre_rgb, post_rgb, exp, method=IG, layer="enc2", dpi=20)
    with pytest.raises(ValueError, match="add `input` to the taps"):
        explain_batch(net, pre, post, taps=["enc2"], methods=["hirescam", IG])
    with pytest.raises(ValueError, match=r"explain.taps=\[input,enc2\]"):
        ExplainSettings(taps=("enc2",), methods=("hirescam", IG))
    assert all(p.grad is None for p in net.parameters())


def test_integrated_gradients_through_the_runner():
    net = tiny_net(seed=9)
    g = np.random.default_rng(1)
    pre_u8, post_u8 = (g.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(2))
    settings = ExplainSettings(
        methods=("hirescam", IG),
        target="all",
        faithfulness=FaithfulnessSettings(enabled=False),
        ig={"steps": 4, "baseline": "blur", "internal_batch_size": 2},
        dpi=20,
    )
    summary = explain_pair(net, pre_u8, post_u8, settings=settings).summary()
    assert list(summary["post_share_integrated_gradients"]) == ["input"]
    assert set(summary["post_share"]) == {"input", "enc1", "enc2"}
    assert set(summary["integrated_gradients"]) == {"baseline_score", "delta"}
    with pytest.raises(ValueError, match="explain.ig.baseline='zeros'"):
        IntegratedGradientsSettings(baseline="zeros")  # type: ignore[arg-type]

"""Date-contrastive HiResCAM and Layer Integrated Gradients from the other date: exact numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from changecam.explain import explain_batch
from changecam.explain.layer_ig import LayerIGSettings
from changecam.models import SiameseUNet, Tap


class LinearDiff(nn.Module):
    """``logit = w · tanh-free features``: a per-date 1×1 conv, tapped, then ``h(post) − h(pre)``
    weighted; linear after the taps, so every first-order method is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.enc.weight.copy_(
                torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]]).view(2, 3, 1, 1)
            )
        self.tap_pre, self.tap_post = Tap("pre/enc1"), Tap("post/enc1")
        self.w = torch.tensor([3.0, -0.5])

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        a, b = self.tap_pre(self.enc(pre)), self.tap_post(self.enc(post))
        return torch.einsum("c,bchw->bhw", self.w, b - 2 * a)[:, None]


def pair(b: int = 2, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


def test_contrastive_is_gradient_times_activation_difference():
    net = LinearDiff()
    pre, post = pair()
    exp = explain_batch(net, pre, post, taps=["enc1"], target="all", methods=["contrastive"])
    a, b = net.enc(pre), net.enc(post)
    w = net.w.view(1, 2, 1, 1)
    torch.testing.assert_close(exp.map("post/enc1", "contrastive"), (w * (b - a)).sum(1))
    torch.testing.assert_close(exp.map("pre/enc1", "contrastive"), (-2 * w * (a - b)).sum(1))
    # the input layer too: gradient × (own image − other image), summed over the bands
    exp = explain_batch(net, pre, post, taps=["input"], target="all", methods=["contrastive"])
    grad_post = torch.einsum("c,cd->d", net.w, net.enc.weight.view(2, 3)).view(1, 3, 1, 1)
    torch.testing.assert_close(
        exp.map("post/input", "contrastive"), (grad_post * (post - pre)).sum(1)
    )


def test_contrastive_with_hirescam_and_gradcam_is_one_pass_and_leaves_them_unchanged():
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2).eval()
    pre, post = pair(size=16)
    forwards = []
    net.register_forward_hook(lambda m, i, o: forwards.append(1))
    both = explain_batch(net, pre, post, methods=["hirescam", "gradcam", "contrastive"])
    with_contrastive, forwards[:] = len(forwards), []
    alone = explain_batch(net, pre, post, methods=["hirescam", "gradcam"])
    assert with_contrastive == len(forwards) == 1
    for tap in alone.taps:
        for method in ("hirescam", "gradcam"):
            torch.testing.assert_close(both.map(tap, method), alone.map(tap, method))
    assert both.layers_of("contrastive") == alone.layers  # input, enc1, enc2: per-date only
    assert "diff" not in " ".join(both.raw["contrastive"])  # no map at one-date taps


def test_layer_ig_equals_contrastive_when_the_network_is_linear_after_the_tap():
    net = LinearDiff()
    pre, post = pair()
    exp = explain_batch(
        net,
        pre,
        post,
        taps=["input", "enc1"],
        target="all",
        methods=["contrastive", "layer_ig"],
        layer_ig=LayerIGSettings(steps=3),
    )
    for tap in ("pre/enc1", "post/enc1", "pre/input", "post/input"):
        torch.testing.assert_close(exp.map(tap, "layer_ig"), exp.map(tap, "contrastive"))


def test_layer_ig_is_complete_against_the_date_swap_of_its_layer():
    """Σ LIG_post = S − S(post activation := pre activation), on a non-linear U-Net."""
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2).eval()
    pre, post = pair(size=16)
    exp = explain_batch(
        net,
        pre,
        post,
        taps=["enc1"],
        target="all",
        methods=["layer_ig"],
        layer_ig=LayerIGSettings(steps=64, internal_batch_size=None),
    )
    with torch.no_grad():
        s = exp.score
        pre_enc1 = {}
        handle = net.taps["pre_enc1"].register_forward_hook(
            lambda m, i, o: pre_enc1.setdefault("a", o)
        )
        net(pre, post)
        handle.remove()
        handle = net.taps["post_enc1"].register_forward_hook(lambda m, i, o: pre_enc1["a"])
        swapped = net(pre, post).sum((1, 2, 3))
        handle.remove()
    total = exp.map("post/enc1", "layer_ig").flatten(1).sum(1)
    torch.testing.assert_close(total, s - swapped, atol=2e-3 * s.abs().max(), rtol=0)
    assert exp.ig["layer_ig_delta/post/enc1"].abs().max() < 2e-3 * s.abs().max()


def test_layer_ig_agrees_with_captum_on_a_shared_encoder():
    """Shared encoder: the post tap's activation on the pre image is the pre activation, so
    captum's LayerIntegratedGradients with baseline pair (pre, pre) is the same path."""
    from captum.attr import LayerIntegratedGradients

    torch.manual_seed(1)
    net = SiameseUNet(3, 4, 2).eval()
    pre, post = pair(b=1, size=16)
    exp = explain_batch(
        net,
        pre,
        post,
        taps=["enc2"],
        target="all",
        methods=["layer_ig"],
        layer_ig=LayerIGSettings(steps=16, internal_batch_size=None),
    )
    lig = LayerIntegratedGradients(lambda a, b: net(a, b).sum((1, 2, 3)), net.taps["post_enc2"])
    ref = lig.attribute((pre, post), baselines=(pre, pre), n_steps=16)
    torch.testing.assert_close(exp.map("post/enc2", "layer_ig"), ref.sum(1), atol=1e-5, rtol=1e-4)


def test_contrastive_and_layer_ig_need_a_per_date_layer():
    net = LinearDiff()
    pre, post = pair()
    with pytest.raises(ValueError, match="layer_ig needs a layer tapped for both dates"):
        explain_batch(net, pre, post, taps=["pre/enc1"], methods=["layer_ig"])
    with pytest.raises(ValueError, match="steps=0"):
        LayerIGSettings(steps=0)

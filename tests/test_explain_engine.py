"""The one-pass HiResCAM / Grad-CAM engine against hand-computed autograd and captum."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from captum.attr import LayerGradCam, LayerGradientXActivation
from torch import nn
from torch.utils.data import DataLoader

from changecam.explain import TapError, Target, explain_batch, target_mask, target_score
from changecam.explain.hirescam import upsample_maps
from changecam.models import SiameseUNet, Tap, find_taps
from changecam.training.module import ChangeDetectionModule


def tiny_net(fusion: str = "concat", shared: bool = True, seed: int = 0) -> SiameseUNet:
    torch.manual_seed(seed)
    net = SiameseUNet(3, 4, 2, fusion, shared)  # type: ignore[arg-type]
    for m in net.modules():  # maps of order 1, and BN statistics that make eval mode matter
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def inputs(
    b: int = 2, size: int = 16, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pre, post = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    roi = torch.rand(b, 1, size, size, generator=g) > 0.6
    return pre, post, roi


def autograd_reference(net: nn.Module, pre, post, roi) -> tuple[dict, dict, torch.Tensor]:
    """HiResCAM and Grad-CAM by hand: retain every tap's gradient, backward S, combine."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inp, out):
            out.retain_grad()
            acts[name] = out

        return hook

    handles = [t.register_forward_hook(keep(n)) for n, t in find_taps(net).items()]
    logits = net(pre.clone().requires_grad_(True), post.clone().requires_grad_(True))
    for h in handles:
        h.remove()
    score = (roi.float() * logits).sum((1, 2, 3))
    score.sum().backward()
    hires = {n: (a.grad * a).sum(1).detach() for n, a in acts.items()}
    grad = {n: (a.grad.mean((2, 3), keepdim=True) * a).sum(1).detach() for n, a in acts.items()}
    net.zero_grad(set_to_none=True)
    return hires, grad, score.detach()


@pytest.mark.parametrize(
    "fusion,shared", [("concat", True), ("diff", True), ("absdiff", True), ("concat", False)]
)
def test_maps_equal_hand_computed_autograd_at_every_tap(fusion, shared):
    net = tiny_net(fusion, shared)
    pre, post, roi = inputs()
    exp = explain_batch(net, pre, post, target="roi", roi=roi)
    hires, grad, score = autograd_reference(net, pre, post, roi)
    assert exp.taps == ("pre/input", "post/input", *net.tap_names)  # the input layer first
    torch.testing.assert_close(exp.score, score, atol=1e-5, rtol=1e-5)
    for tap in net.tap_names:
        torch.testing.assert_close(exp.raw["hirescam"][tap], hires[tap], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exp.raw["gradcam"][tap], grad[tap], atol=1e-5, rtol=1e-5)
        assert exp.raw["hirescam"][tap].abs().max() > 0.1, f"{tap}: near-zero map proves nothing"
    # the two dates really differ (one map per date, not one copied twice)
    assert not torch.allclose(exp.raw["hirescam"]["pre/enc1"], exp.raw["hirescam"]["post/enc1"])


def captum_forward(net: nn.Module, mask: torch.Tensor):
    return lambda pre, post: (net(pre, post) * mask).sum((1, 2, 3))


def test_captum_oracle_agrees_at_every_tap():
    net = tiny_net("concat", True, seed=3)
    pre, post, _ = inputs(seed=4)
    exp = explain_batch(net, pre, post, target=Target("predicted", threshold=0.3))
    assert not exp.empty.any()
    forward = captum_forward(net, exp.mask)
    for tap, module in find_taps(net).items():
        gxa = LayerGradientXActivation(forward, module).attribute((pre, post))
        gcam = LayerGradCam(forward, module).attribute((pre, post), relu_attributions=False)
        torch.testing.assert_close(exp.raw["hirescam"][tap], gxa.sum(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exp.raw["gradcam"][tap], gcam[:, 0], atol=1e-5, rtol=1e-5)


def test_hooking_the_shared_encoder_itself_returns_one_date_only():
    """Why taps exist: captum on the shared module silently keeps its last call (the post date)."""
    net = tiny_net("concat", True, seed=5)
    pre, post, roi = inputs(seed=6)
    exp = explain_batch(net, pre, post, target="roi", roi=roi, taps=["enc1"])
    on_module = LayerGradientXActivation(captum_forward(net, roi.float()), net.encoder1)
    single = on_module.attribute((pre, post)).sum(1)
    assert single.shape == exp.raw["hirescam"]["post/enc1"].shape  # one map, not two
    torch.testing.assert_close(single, exp.raw["hirescam"]["post/enc1"], atol=1e-5, rtol=1e-5)
    assert (single - exp.raw["hirescam"]["pre/enc1"]).abs().max() > 1e-3  # pre date is lost


def test_completeness_at_head_input():
    net = tiny_net("diff", True, seed=7)
    pre, post, roi = inputs(seed=8)
    for target, kw in (("roi", {"roi": roi}), ("all", {})):
        exp = explain_batch(
            net, pre, post, target=target, taps=["head_in"], methods=["hirescam"], **kw
        )
        bias = net.final_conv.bias.detach()
        expected = exp.score - bias * exp.mask.flatten(1).sum(1)
        total = exp.raw["hirescam"]["head_in"].flatten(1).sum(1)
        torch.testing.assert_close(total, expected, rtol=1e-4, atol=0)
        assert exp.methods == ("hirescam",) and list(exp.upsampled) == ["hirescam"]


def test_targets_and_empty_target():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-2.0, -1.0], [-0.5, -3.0]]]])
    label = torch.tensor([[1, 0], [0, 1]])  # H×W, broadcast to the batch
    pred = target_mask(logits)
    assert pred[:, 0].tolist() == [[[1, 0], [1, 0]], [[0, 0], [0, 0]]]
    assert target_mask(logits, Target("predicted", 0.3))[1, 0].tolist() == [[0, 0], [1, 0]]
    assert target_mask(logits, "ground_truth", label=label)[1, 0].tolist() == [[1, 0], [0, 1]]
    assert target_mask(logits, "all").sum() == 8
    torch.testing.assert_close(target_score(logits, pred), torch.tensor([2.5, 0.0]))
    valid = torch.tensor([[1, 1], [0, 0]])
    assert target_mask(logits, "all", valid=valid)[0, 0].tolist() == [[1, 1], [0, 0]]
    with pytest.raises(ValueError, match="needs the ground-truth"):
        target_mask(logits, "ground_truth")
    with pytest.raises(ValueError, match="needs a region of interest"):
        target_mask(logits, "roi")
    with pytest.raises(ValueError, match="region of interest has shape"):
        target_mask(logits, "roi", roi=torch.ones(3, 3))
    with pytest.raises(ValueError, match="expected one of"):
        Target("everything")  # type: ignore[arg-type]

    net = tiny_net(seed=9)
    pre, post, _ = inputs(seed=10)
    roi = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    roi[0, 0, 4:8, 4:8] = True  # sample 1 has an empty target
    exp = explain_batch(net, pre, post, target="roi", roi=roi)
    assert exp.empty.tolist() == [False, True]
    assert exp.score[1] == 0
    assert all(exp.raw[m][t][1].abs().max() == 0 for m in exp.methods for t in exp.taps)
    shares = exp.post_shares()
    assert set(shares) == {"input", "enc1", "enc2"}
    assert all(torch.isnan(v[1]) and 0 <= v[0] <= 1 for v in shares.values())


def test_post_share_definition_on_raw_maps():
    net = tiny_net(seed=11)
    pre, post, roi = inputs(seed=12)
    exp = explain_batch(net, pre, post, target="roi", roi=roi)
    p_pre = exp.raw["hirescam"]["pre/enc2"].clamp(min=0).sum((1, 2))
    p_post = exp.raw["hirescam"]["post/enc2"].clamp(min=0).sum((1, 2))
    torch.testing.assert_close(exp.post_share("enc2"), p_post / (p_pre + p_post))
    torch.testing.assert_close(exp.positive_mass("post/enc2"), p_post)


def test_upsampled_maps_read_per_input_pixel():
    raw = {"hirescam": {"a": torch.ones(1, 4, 4), "b": torch.arange(64.0).reshape(1, 8, 8)}}
    up = upsample_maps(raw, (8, 8))
    torch.testing.assert_close(up["hirescam"]["a"], torch.full((1, 8, 8), 0.25))
    assert up["hirescam"]["b"] is raw["hirescam"]["b"] or torch.equal(
        up["hirescam"]["b"], raw["hirescam"]["b"]
    )
    net = tiny_net(seed=13)
    pre, post, roi = inputs(seed=14)
    exp = explain_batch(net, pre, post, target="roi", roi=roi, taps=["bottleneck", "head_in"])
    assert exp.map("bottleneck", upsampled=True).shape == (2, 16, 16)
    torch.testing.assert_close(exp.map("head_in", upsampled=True), exp.map("head_in"))
    one = exp.select(1)
    assert len(one) == 1 and torch.equal(one.map("bottleneck"), exp.map("bottleneck")[1:])
    cropped = exp.crop(11, 16)
    assert cropped.map("bottleneck").shape == (2, 3, 4)  # ceil(4 * 11 / 16) rows of 4x4 cells
    assert cropped.map("head_in", upsampled=True).shape == (2, 11, 16)
    with pytest.raises(KeyError, match="explained taps"):
        exp.map("fuse1")


def test_modes_flags_and_hooks_are_left_as_found():
    net = tiny_net(seed=15).train()
    net.encoder1.conv1.bn.eval()  # a mixed-mode model comes back mixed
    net.encoder2.requires_grad_(False)
    modes = {n: m.training for n, m in net.named_modules()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    pre, post, roi = inputs(seed=16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    explain_batch(net, pre, post, target="roi", roi=roi)
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "BN stats changed"
    with pytest.raises(ValueError, match="expected inputs B x 3"):
        explain_batch(net, pre[:, :2], post[:, :2])  # the forward itself fails
    assert all(not t._forward_hooks for t in find_taps(net).values())
    assert {n: m.training for n, m in net.named_modules()} == modes


def test_bad_input_messages():
    net = tiny_net(seed=17)
    pre, post, _ = inputs()
    with pytest.raises(
        TapError,
        match=r"unknown tap name\(s\) \['enc9'\].*available: \['pre/input', 'post/input', 'pre/enc1'",
    ):
        explain_batch(net, pre, post, taps=["enc9"])
    with pytest.raises(ValueError, match="same shape"):
        explain_batch(net, pre, post[..., :8])
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain_batch(net, pre, post, methods=["lime"])  # type: ignore[list-item]

    class NoTaps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 1, 1)

        def forward(self, a, b):
            return self.conv(torch.cat([a, b], 1))

    assert explain_batch(NoTaps(), pre, post).layers == ["input"]  # every model has its input
    with pytest.raises(TapError, match="NoTaps has no taps but the input.*Tap\\('pre/enc1'\\)"):
        explain_batch(NoTaps(), pre, post, taps=["enc1"])

    class TwiceTapped(NoTaps):
        def __init__(self):
            super().__init__()
            self.tap = Tap("enc")

        def forward(self, a, b):
            return self.conv(torch.cat([self.tap(a), self.tap(b)], 1))

    with pytest.raises(TapError, match="exactly once.*'enc': 2"):
        explain_batch(TwiceTapped(), pre, post)

    class SameNameTwice(NoTaps):
        """A copy-paste slip: the post date's tap named as the pre date's."""

        def __init__(self):
            super().__init__()
            self.pre_tap, self.post_tap = Tap("pre/enc1"), Tap("pre/enc1")

        def forward(self, a, b):
            return self.conv(torch.cat([self.pre_tap(a), self.post_tap(b)], 1))

    with pytest.raises(TapError, match="share a name: 'pre/enc1' at pre_tap, post_tap"):
        explain_batch(SameNameTwice(), pre, post)

    class ChangedAfterTap(NoTaps):
        """ResNet's `out += identity` on a tapped activation: the recorded map would be wrong."""

        def __init__(self):
            super().__init__()
            self.taps = nn.ModuleList([Tap("pre/enc"), Tap("post/enc")])

        def forward(self, a, b):
            a, b = self.taps[0](a * 2), self.taps[1](b * 2)
            b += 1
            return self.conv(torch.cat([a, b], 1))

    with pytest.raises(TapError, match=r"tap\(s\) \['post/enc'\] was modified in place"):
        explain_batch(ChangedAfterTap(), pre, post)

    class ViewTaps(NoTaps):
        """Taps on views of one tensor (a channel split), used before and after a part of it
        gets an in-place op: the shared version counter moves and the views' gradient functions
        are rebuilt."""

        def __init__(self, touch_tapped: bool = False, in_place: bool = True):
            super().__init__()
            self.touch_tapped, self.in_place = touch_tapped, in_place
            self.enc = nn.Conv2d(3, 4, 3, padding=1)
            self.mix = nn.Conv2d(3, 3, 1)
            self.taps = nn.ModuleList([Tap("pre/enc"), Tap("post/enc")])

        def forward(self, a, b):
            f = self.enc(torch.cat([a, b]))
            n = len(a)
            pa, pb = self.taps[0](f[:n, :3]), self.taps[1](f[n:, :3])
            mixed = self.mix(torch.cat([pa, pb]))  # used before the in-place op
            if not self.in_place:
                f = f.clone()
            f[:, 2 if self.touch_tapped else 3].relu_()
            return self.conv(torch.cat([pa + mixed[:n], pb + mixed[n:]], 1))

    exp = explain_batch(ViewTaps(in_place=False), pre, post, taps=["enc"])
    assert all(exp.raw["hirescam"][tap].abs().sum() > 0 for tap in ("pre/enc", "post/enc"))
    # an in-place op on the base, on the tapped slice or beside it: the gradient of the
    # recorded view would miss its uses before the op (all-zero maps here), so refused
    for touch_tapped in (False, True):
        with pytest.raises(TapError, match="or is a view of a tensor that was"):
            explain_batch(ViewTaps(touch_tapped=touch_tapped), pre, post, taps=["enc"])


def test_taps_by_per_date_layer_name():
    net = tiny_net(seed=18)
    pre, post, _ = inputs()
    exp = explain_batch(net, pre, post, taps=["enc2", "fuse1"], target="all")
    assert exp.taps == ("pre/enc2", "post/enc2", "fuse1") and exp.layers == ["enc2"]


class ExplainDuringValidation(L.Callback):
    """Calls the engine from inside Trainer.validate, where inference mode is on."""

    def __init__(self) -> None:
        self.results: list = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        assert torch.is_inference_mode_enabled()
        exp = explain_batch(pl_module, batch["pre"], batch["post"], target="all")
        self.results.append((exp, pl_module.training, outputs.is_inference()))


def test_inside_trainer_validate():
    net = tiny_net(seed=19)
    module = ChangeDetectionModule(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    pre, post, roi = inputs(b=4, seed=20)
    data = [
        {"pre": pre[i], "post": post[i], "mask": roi[i].float(), "name": str(i)} for i in range(4)
    ]
    callback = ExplainDuringValidation()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, DataLoader(data, batch_size=2), verbose=False)
    assert len(callback.results) == 2
    for exp, training, outputs_were_inference in callback.results:
        assert outputs_were_inference and not training
        for method in exp.methods:
            for tap in exp.taps:
                cam = exp.raw[method][tap]
                assert torch.isfinite(cam).all() and cam.abs().max() > 0, (method, tap)
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("inference", [False, True], ids=["grad mode", "inference mode"])
def test_explaining_in_training_mode_leaves_the_running_statistics_as_found(inference):
    """eval_mode=False runs BatchNorm on the batch's own statistics: the explanation's
    forwards (Integrated Gradients' interpolations, the curves' counterfactuals) must not move
    the model's running statistics (helper-68's case)."""
    from changecam.explain import faithfulness
    from changecam.explain.integrated import IntegratedGradientsSettings

    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pre, post = torch.rand(2, 2, 3, 16, 16)
    with torch.inference_mode(inference):
        exp = explain_batch(
            net,
            pre,
            post,
            target="all",
            eval_mode=False,
            methods=["hirescam", "integrated_gradients"],
            taps=["input", "enc2"],
            ig=IntegratedGradientsSettings(steps=4),
        )
        faithfulness(net, pre, post, exp, eval_mode=False, steps=2)
    assert net.training
    after = net.state_dict()
    assert any("running_mean" in k for k in after), "the network has BatchNorm"
    for key, value in before.items():
        assert torch.equal(after[key], value), key

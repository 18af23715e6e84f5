"""Known-answer models: the explanation and the deletion curves must find the date a model uses."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import Tensor, nn

from changecam.explain import explain_batch, faithfulness
from changecam.explain.faithfulness import perturbation_curve
from changecam.models import SiameseUNet, Tap


class OneDateModel(nn.Module):
    """Sees one date only: ``logit = 4·(2·m1 − 1) + c·4·(2·m2 − 1)``, ``m`` = mean brightness.

    ``m1`` is the pixel's own brightness (stage 1), ``m2`` its 2×2 average (stage 2, upsampled).
    Both dates go through the same (shared) encoder and their own taps; the head's weights on
    the other date are exactly zero.
    """

    def __init__(self, date: Literal["pre", "post"], coarse: float = 1.0) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 2, 1)  # channel 0: brightness, channel 1: darkness
        self.enc.weight.data = torch.tensor([[1 / 3] * 3, [-1 / 3] * 3]).reshape(2, 3, 1, 1)
        self.enc.bias.data = torch.tensor([0.0, 1.0])
        self.pool, self.up = nn.AvgPool2d(2), nn.Upsample(scale_factor=2, mode="nearest")
        names = ["pre/enc1", "post/enc1", "pre/enc2", "post/enc2", "fuse1", "fuse2", "head_in"]
        self.taps = nn.ModuleDict({n.replace("/", "_"): Tap(n) for n in names})
        self.head = nn.Conv2d(8, 1, 1)  # head_in = [pre1, post1, pre2, post2] (2 channels each)
        weights = torch.zeros(8)
        first = 0 if date == "pre" else 2
        weights[first : first + 2] = torch.tensor([4.0, -4.0])
        weights[first + 4 : first + 6] = torch.tensor([4.0 * coarse, -4.0 * coarse])
        self.head.weight.data = weights.reshape(1, 8, 1, 1)
        self.head.bias.data.zero_()
        self.calls = 0

    def tap(self, name: str, x: Tensor) -> Tensor:
        return self.taps[name.replace("/", "_")](x)

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        self.calls += 1
        s1 = {
            d: self.tap(f"{d}/enc1", torch.relu(self.enc(x)))
            for d, x in (("pre", pre), ("post", post))
        }
        s2 = {d: self.tap(f"{d}/enc2", self.pool(s1[d])) for d in s1}
        f1 = self.tap("fuse1", torch.cat([s1["pre"], s1["post"]], 1))
        f2 = self.tap("fuse2", torch.cat([s2["pre"], s2["post"]], 1))
        return self.head(self.tap("head_in", torch.cat([f1, self.up(f2)], 1)))


def scene(size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Dark textured ground; a bright square appears in post (rows 2-7) and one vanishes from
    pre (rows 9-14), each with texture so that pixels differ in evidence."""
    g = torch.Generator().manual_seed(seed)
    pre = 0.1 + 0.1 * torch.rand(1, 3, size, size, generator=g)
    post = 0.1 + 0.1 * torch.rand(1, 3, size, size, generator=g)
    post[..., 2:8, 2:8] = 0.6 + 0.4 * torch.rand(1, 3, 6, 6, generator=g)
    pre[..., 9:15, 8:14] = 0.6 + 0.4 * torch.rand(1, 3, 6, 6, generator=g)
    return pre, post


@pytest.mark.parametrize("date,other", [("post", "pre"), ("pre", "post")])
def test_one_date_model_gets_all_the_share_and_the_falling_curve(date, other):
    model = OneDateModel(date).eval()
    pre, post = scene()
    exp = explain_batch(model, pre, post)
    assert not exp.empty.any()
    changed = (slice(2, 8), slice(2, 8)) if date == "post" else (slice(9, 15), slice(8, 14))
    assert exp.mask[0, 0][changed].all() and exp.mask.sum() == 36  # the model finds its square
    assert list(exp.post_shares()) == ["input", "enc1", "enc2"]
    for layer, share in exp.post_shares().items():
        expected = 1.0 if date == "post" else 0.0
        assert abs(share.item() - expected) <= 0.01, layer  # >= 0.99 (or <= 0.01 for the mirror)
        assert exp.raw["hirescam"][f"{other}/{layer}"].abs().max() == 0
    faith = faithfulness(model, pre, post, exp, layer="enc2", steps=8, random_repeats=4)
    s0 = exp.score.item()
    torch.testing.assert_close(faith.score0, exp.score)
    flat = faith.curve("deletion", other, "cam")
    torch.testing.assert_close(flat, torch.full_like(flat, s0))  # the unused date does not matter
    assert faith.gap(other).abs().max() < 1e-6
    falling = faith.curve("deletion", date, "cam")[0]
    assert (falling.diff() <= 1e-4).all() and falling[-1] < -0.5 * s0
    assert falling[2] < 0  # 25 % of the pixels hold all the evidence: gone after 2 of 8 steps
    assert faith.gap(date).item() > 0.3 and faith.gap("both").item() > 0.3
    ends = [faith.curve("deletion", "both", o)[0, -1] for o in ("cam", "random")]
    assert ends[0] == pytest.approx(ends[1].item(), rel=1e-5)  # both orders end at the same pair
    assert faith.gap(date, "insertion").item() > 0.3
    rising = faith.curve("insertion", date, "cam")[0]
    assert rising[0] < 0 and rising[-1] == pytest.approx(s0, rel=1e-5)


def test_exact_deletion_curve_of_a_pixelwise_model():
    model = OneDateModel("post", coarse=0.0).eval()
    pre, post = torch.full((1, 3, 8, 8), 0.1), torch.full((1, 3, 8, 8), 0.1)
    post[..., :4, :4] = 0.9  # 16 of 64 pixels: logit 4·(1.8 − 1) = 3.2 each, −3.2 elsewhere
    exp = explain_batch(model, pre, post, taps=["enc1"])
    assert exp.score.item() == pytest.approx(16 * 3.2)
    faith = faithfulness(model, pre, post, exp, dates=["post"], steps=4, insertion=False)
    # CAM order deletes exactly the 16 changed pixels first: 51.2 -> -51.2 at k = 25 %, then flat
    expected = torch.tensor([[51.2, -51.2, -51.2, -51.2, -51.2]])
    torch.testing.assert_close(faith.curve("deletion", "post", "cam"), expected)
    auc_cam = (51.2 - 51.2) / 2 * 0.25 - 51.2 * 0.75
    assert faith.auc("deletion", "post", "cam").item() == pytest.approx(auc_cam)
    # random order: the same end points, a slower fall in between
    rand = faith.curve("deletion", "post", "random")[0]
    assert rand[0] == pytest.approx(51.2) and rand[-1] == pytest.approx(-51.2)
    assert (rand[1:4] > -51.2).all()
    assert faith.gap("post").item() == pytest.approx(
        (faith.auc("deletion", "post", "random").item() - auc_cam) / 51.2
    )


@pytest.mark.parametrize("cut", ["pre", "post"])
def test_siamese_unet_with_one_dates_path_cut_explains_the_other_only(cut):
    """Every weight that reads one date's features zeroed: all the evidence is the other
    date's, at every layer (the mirror keeps a map dropped for one date from passing)."""
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2, "concat", shared_encoder=True).eval()
    kept = "post" if cut == "pre" else "pre"
    pre, post = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    whole = explain_batch(net, pre, post, target="all")
    assert all(whole.raw["hirescam"][f"{d}/enc2"].abs().max() > 0 for d in ("pre", "post"))
    with torch.no_grad():  # concat: [pre, post] in the bottleneck, [up, pre, post] in a decoder
        first = 0 if cut == "pre" else 1
        net.bottleneck.conv.weight[:, 8 * first : 8 * (first + 1)] = 0
        for k, width in ((1, 4), (2, 8)):
            weight = getattr(net, f"decoder{k}").conv1.conv.weight
            weight[:, width * (first + 1) : width * (first + 2)] = 0
    exp = explain_batch(net, pre, post, target="all")
    shares = exp.post_shares()
    assert list(shares) == ["input", "enc1", "enc2"]
    for layer, share in shares.items():
        assert ((share >= 0.99) if kept == "post" else (share <= 0.01)).all(), layer
        assert exp.raw["hirescam"][f"{kept}/{layer}"].abs().max() > 0
    exp_g = explain_batch(net, pre, post, target="all", methods=["gradcam"])
    assert exp_g.raw["gradcam"][f"{cut}/enc2"].abs().max() == 0


def test_curves_are_batched_and_batch_size_does_not_change_them():
    model = OneDateModel("post").eval()
    pre, post = scene(seed=1)
    pre2, post2 = scene(seed=2)
    pre, post = torch.cat([pre, pre2]), torch.cat([post, post2])
    exp = explain_batch(model, pre, post)
    model.calls = 0
    big = faithfulness(
        model, pre, post, exp, dates=["post"], steps=4, insertion=False, random_repeats=1
    )
    # S0, the all-deleted end, then 2 samples × 3 inner steps in one forward per order
    assert model.calls == 4
    small = faithfulness(
        model,
        pre,
        post,
        exp,
        dates=["post"],
        steps=4,
        insertion=False,
        random_repeats=1,
        batch_size=3,
    )
    for order in ("cam", "random"):
        torch.testing.assert_close(
            small.curve("deletion", "post", order), big.curve("deletion", "post", order)
        )
    one = big.select(1)
    torch.testing.assert_close(one.gap("post"), big.gap("post")[1:])
    # a sample scored alone gets the curves it gets in the batch, the random baseline included
    alone = faithfulness(
        model, pre[1:], post[1:], exp.select(slice(1, 2)), dates=["post"], steps=4, insertion=False
    )
    for order in ("cam", "random"):
        torch.testing.assert_close(
            alone.curve("deletion", "post", order), big.curve("deletion", "post", order)[1:]
        )


def test_a_dates_random_baseline_depends_on_the_seed_not_on_the_other_dates_asked_for():
    """The same seed gives each date the same random curve whether it is asked for alone or
    with other dates, in any order (helper-109: one generator shared by the dates drew a date's
    order after the others')."""
    torch.manual_seed(0)
    net = SiameseUNet(3, 4, 2, "concat", shared_encoder=True).eval()
    pre, post = scene(seed=3)
    exp = explain_batch(net, pre, post, target="all")

    def random_curve(dates: list, date: str, seed: int = 0) -> Tensor:
        kwargs = dict(steps=4, insertion=False, random_repeats=2, seed=seed)
        return faithfulness(net, pre, post, exp, dates=dates, **kwargs).curve(
            "deletion", date, "random"
        )

    for date in ("pre", "post", "both"):
        alone = random_curve([date], date)
        for dates in (["pre", "post", "both"], ["both", "post", "pre"], ["post", date]):
            torch.testing.assert_close(random_curve(dates, date), alone, rtol=0, atol=0)
    assert not torch.equal(random_curve(["post"], "post", seed=1), random_curve(["post"], "post"))


def test_valid_region_is_never_modified_and_empty_target_gives_nan():
    model = OneDateModel("post").eval()
    pre, post = scene()
    mask = torch.ones(1, 1, 16, 16)
    valid = torch.zeros(1, 16, 16, dtype=torch.bool)
    valid[:, :, :4] = True  # only the left 4 columns may change: the square's columns 2-3
    ranking = torch.rand(1, 16, 16)
    modify_post = torch.ones(1, 16, 16, dtype=torch.bool)
    fractions = torch.tensor([0.0, 1.0])
    curve = perturbation_curve(
        model, pre, post, mask, ranking, modify_post, fractions, "deletion", valid
    )
    post_cut = post.clone()
    post_cut[..., :4] = pre[..., :4]
    expected_end = (model(pre, post_cut)).sum()
    torch.testing.assert_close(curve[0, 1], expected_end)

    empty_pre = torch.full((1, 3, 16, 16), 0.1)
    exp = explain_batch(model, empty_pre, empty_pre.clone())  # nothing changes, nothing predicted
    assert exp.empty.all()
    faith = faithfulness(model, empty_pre, empty_pre.clone(), exp, steps=2, random_repeats=1)
    assert torch.isnan(faith.gap()).all() and torch.isnan(faith.gap("post", "insertion")).all()
    with pytest.raises(ValueError, match="layer explained for both dates"):
        faithfulness(model, pre, post, exp, layer="fuse1")
    with pytest.raises(ValueError, match="must match the explanation"):
        faithfulness(model, pre[..., :8, :8], post[..., :8, :8], exp)


@pytest.mark.parametrize("cap", [0, -5, 1.5, True])
def test_a_pixel_cap_below_one_is_refused(cap):
    """max_batch_pixels=0 or -5 ran the curves one counterfactual per pass, unannounced, where
    every other size of the block below 1 is refused (helper-100)."""
    from changecam.explain import FaithfulnessSettings

    with pytest.raises(ValueError, match="explain.faithfulness.max_batch_pixels=.* must be >= 1"):
        FaithfulnessSettings(max_batch_pixels=cap)
    assert FaithfulnessSettings(max_batch_pixels=64 * 64 * 4).batch_size_for(64 * 64) == 4

"""Sliding-window inference: exact patch equality, exact output sizes, blending, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from changecam.models import SiameseUNet
from changecam.models.sliding_window import (
    SlidingWindow,
    SlidingWindowNet,
    blend_weight,
    num_windows,
    pad_to,
    sliding_window_logits,
    window_starts,
)


def tiny_unet(seed: int = 0) -> SiameseUNet:
    torch.manual_seed(seed)
    net = SiameseUNet(in_channels=3, base_channels=4, depth=2, fusion="concat")
    # non-trivial BatchNorm statistics, so eval mode is not the identity
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def pair(h: int, w: int, batch: int = 1, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g), torch.rand(batch, 3, h, w, generator=g)


class PixelDiff(nn.Module):
    """Pointwise, translation-equivariant: logits = sum over bands of (post - pre)."""

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        return (post - pre).sum(1, keepdim=True)


class WindowCounter(nn.Module):
    """Each window gets a constant logit: the running index of the window."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        out = torch.empty(pre.shape[0], 1, *pre.shape[-2:])
        for i in range(pre.shape[0]):
            out[i] = float(self.calls)
            self.calls += 1
        return out


def test_window_starts_cover_and_end_at_border():
    assert window_starts(100, 32, 24) == [0, 24, 48, 68]
    assert window_starts(64, 32, 32) == [0, 32]
    assert window_starts(32, 32, 8) == [0]
    assert window_starts(33, 32, 32) == [0, 1]
    with pytest.raises(ValueError, match="smaller than the window"):
        window_starts(20, 32, 16)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_overlap_zero_equals_patchwise_prediction_exactly(batch_size):
    net = tiny_unet()
    pre, post = pair(64, 64)
    spec = SlidingWindow(window=32, overlap=0.0, batch_size=batch_size)
    out = sliding_window_logits(net, pre, post, spec)
    tiles = [(r, c) for r in (0, 32) for c in (0, 32)]
    with torch.no_grad():
        if batch_size == 1:
            expected = [
                net(pre[..., r : r + 32, c : c + 32], post[..., r : r + 32, c : c + 32])
                for r, c in tiles
            ]
        else:  # the same grouping of tiles into one forward pass
            both = net(
                torch.cat([pre[..., r : r + 32, c : c + 32] for r, c in tiles]),
                torch.cat([post[..., r : r + 32, c : c + 32] for r, c in tiles]),
            )
            expected = list(both.split(1))
    for (r, c), tile in zip(tiles, expected, strict=True):
        assert torch.equal(out[..., r : r + 32, c : c + 32], tile)


def test_overlap_zero_on_a_batch_of_images_is_exact_per_image():
    net = tiny_unet()
    pre, post = pair(32, 64, batch=2)
    out = sliding_window_logits(net, pre, post, SlidingWindow(window=32, overlap=0.0, batch_size=1))
    with torch.no_grad():
        right = net(pre[..., 32:], post[..., 32:])
    assert torch.equal(out[..., 32:], right)


@pytest.mark.parametrize(
    "size", [(64, 64), (37, 53), (70, 45), (20, 13), (1, 40), (32, 1)], ids=str
)
@pytest.mark.parametrize("pad_mode", ["reflect", "replicate", "constant"])
def test_output_has_exactly_the_input_size(size, pad_mode):
    net = tiny_unet()
    pre, post = pair(*size)
    out = sliding_window_logits(
        net, pre, post, SlidingWindow(window=32, overlap=0.25, pad_mode=pad_mode)
    )
    assert out.shape == (1, 1, *size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("size", [(50, 77), (16, 40), (96, 96)], ids=str)
def test_blending_reproduces_a_translation_equivariant_model(blend, size):
    pre, post = pair(*size)
    spec = SlidingWindow(window=32, overlap=0.5, batch_size=3, blend=blend)
    out = sliding_window_logits(PixelDiff(), pre, post, spec)
    torch.testing.assert_close(out, PixelDiff()(pre, post), rtol=0, atol=1e-6)


def test_uniform_blend_averages_overlapping_windows():
    # width 48, window 32, stride 16: columns 0-15 see window 0, 16-31 both, 32-47 window 1
    pre, post = pair(32, 48)
    out = sliding_window_logits(
        WindowCounter(),
        pre,
        post,
        SlidingWindow(window=32, overlap=0.5, batch_size=1, blend="uniform"),
    )[0, 0]
    assert torch.equal(out[:, :16], torch.zeros(32, 16))
    assert torch.equal(out[:, 16:32], torch.full((32, 16), 0.5))
    assert torch.equal(out[:, 32:], torch.ones(32, 16))


def test_gaussian_blend_moves_smoothly_from_one_window_to_the_next():
    pre, post = pair(32, 48)
    out = sliding_window_logits(
        WindowCounter(), pre, post, SlidingWindow(window=32, overlap=0.5, batch_size=1)
    )[0, 0]
    row = out[0]
    assert torch.equal(row[:16], torch.zeros(16)) and torch.equal(row[32:], torch.ones(16))
    seam = row[16:32]
    assert (seam.diff() > 0).all(), "weights shift monotonically towards the second window"
    torch.testing.assert_close(seam + seam.flip(0), torch.ones(16))  # symmetric windows
    assert seam.diff().abs().max() < 0.25, "no hard seam"


def test_blend_weight_is_positive_centred_and_symmetric():
    w = blend_weight(32)
    assert w.shape == (32, 32) and w.dtype == torch.float32
    assert (w > 0).all() and w.max() == pytest.approx(math.exp(-2 * 0.5**2 / 128))
    assert w[0, 15] / w[15, 15] == pytest.approx(math.exp(-(15.5**2 - 0.5**2) / 128))
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.T)
    assert w[15, 15] == w.max()
    assert torch.equal(blend_weight(8, "uniform"), torch.ones(8, 8))


def test_reflect_padding_repeats_for_tiny_images():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    assert pad_to(x, 1, 8).flatten().tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    assert pad_to(torch.ones(1, 1, 1, 1), 4, 4).shape == (1, 1, 4, 4)


def test_num_windows_matches_the_run():
    spec = SlidingWindow(window=256, overlap=0.25)
    assert num_windows(1024, 1024, spec) == 25  # starts 0, 192, 384, 576, 768
    assert num_windows(100, 700, spec) == 4  # one row (padded), starts 0, 192, 384, 444


def test_wrapper_forward_is_the_sliding_window():
    net = tiny_unet()
    pre, post = pair(40, 40)
    spec = SlidingWindow(window=32, overlap=0.25)
    wrapped = SlidingWindowNet(net, spec)
    assert torch.equal(wrapped(pre, post), sliding_window_logits(net, pre, post, spec))
    assert wrapped.net is net


def test_bad_input_is_refused_with_the_config_key():
    net = tiny_unet()
    pre, post = pair(32, 32)
    with pytest.raises(ValueError, match="same shape"):
        sliding_window_logits(net, pre, post[..., :16], SlidingWindow(window=32))
    with pytest.raises(
        ValueError, match=r"sliding_window.window=30 must be divisible by 2\*\*depth = 4"
    ):
        sliding_window_logits(net, pre, post, SlidingWindow(window=30))
    with pytest.raises(ValueError, match="sliding_window.overlap=1.0"):
        SlidingWindow(overlap=1.0)
    with pytest.raises(ValueError, match="sliding_window.blend='cosine'"):
        SlidingWindow(blend="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sliding_window.batch_size=0"):
        SlidingWindow(batch_size=0)
    # a float passed these checks and failed in the run, naming no key (helper-108)
    for key, value in (("window", 32.0), ("window", True), ("batch_size", 2.5)):
        with pytest.raises(
            ValueError, match=rf"sliding_window.{key}={value!r} must be a (positive )?whole"
        ):
            SlidingWindow(**{key: value})

"""Date-swap occlusion on tiny hand-built models with exact expected maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from changecam.explain import ExplainSettings, explain_batch
from changecam.explain.occlusion import OcclusionSettings
from changecam.models import Tap


class Difference(nn.Module):
    """``logit = 2·post_0 − 3·pre_0`` per pixel (band 0 only), with per-date taps."""

    def __init__(self) -> None:
        super().__init__()
        self.tap_pre, self.tap_post = Tap("pre/enc1"), Tap("post/enc1")

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        return 2 * self.tap_post(post)[:, :1] - 3 * self.tap_pre(pre)[:, :1]


class Product(nn.Module):
    """``logit = pre_0 · post_0``: not additive, so a square's drop depends on the other date."""

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        return pre[:, :1] * post[:, :1]


def pair(seed: int = 0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)


def occlusion_maps(model, pre, post, settings, roi=None):
    exp = explain_batch(
        model,
        pre,
        post,
        taps=["input"],
        target="all" if roi is None else "roi",
        roi=roi,
        methods=["occlusion"],
        occlusion=settings,
    )
    return exp.map("pre/input", "occlusion"), exp.map("post/input", "occlusion")


def test_one_pixel_squares_give_each_pixels_own_swap_drop():
    """Window 1: the post map is ``2·(post_0 − pre_0)`` (the post pixel becomes the pre one),
    the pre map ``3·(post_0 − pre_0)`` (−3·pre_0 becomes −3·post_0), at every pixel."""
    pre, post = pair()
    m_pre, m_post = occlusion_maps(Difference(), pre, post, OcclusionSettings(1, 1, 3))
    diff = post[:, 0] - pre[:, 0]
    torch.testing.assert_close(m_post, 2 * diff)
    torch.testing.assert_close(m_pre, 3 * diff)


def test_each_pixel_holds_the_mean_drop_of_the_squares_covering_it():
    """Window 2, stride 2 on 4×4: every pixel gets its own square's summed drop; the target
    region leaves the pixels outside it out of ``S`` (their squares' drops only count inside)."""
    pre, post = pair()
    roi = torch.zeros(2, 1, 4, 4)
    roi[:, :, :3, :3] = 1
    _, m_post = occlusion_maps(Difference(), pre, post, OcclusionSettings(2, 2, 1), roi)
    drop = 2 * (post[:, 0] - pre[:, 0]) * roi[:, 0]  # per pixel, inside S only
    squares = drop.unflatten(1, (2, 2)).unflatten(3, (2, 2)).sum((2, 4))  # 2×2 squares
    expected = squares.repeat_interleave(2, 1).repeat_interleave(2, 2)
    torch.testing.assert_close(m_post, expected)
    # stride 1: the interior pixels are covered by four squares, the corners by one
    _, m_post1 = occlusion_maps(Difference(), pre, post, OcclusionSettings(2, 1, 4), roi)
    corner = drop[:, :2, :2].sum((1, 2))
    torch.testing.assert_close(m_post1[:, 0, 0], corner)
    centre = torch.stack(
        [drop[:, r : r + 2, c : c + 2].sum((1, 2)) for r in range(3) for c in range(3)]
    )
    torch.testing.assert_close(m_post1[:, 1, 1], centre[[0, 1, 3, 4]].mean(0))


def test_the_other_dates_pixels_are_the_baseline_not_zero():
    """``pre·post``: swapping a post pixel for the pre one drops ``pre·(post − pre)``."""
    pre, post = pair(1)
    m_pre, m_post = occlusion_maps(Product(), pre, post, OcclusionSettings(1, 1, 16))
    torch.testing.assert_close(m_post, pre[:, 0] * (post[:, 0] - pre[:, 0]))
    torch.testing.assert_close(m_pre, post[:, 0] * (pre[:, 0] - post[:, 0]))


def test_identical_dates_give_zero_maps_and_the_settings_refuse_bad_values():
    pre, _ = pair()
    m_pre, m_post = occlusion_maps(Difference(), pre, pre.clone(), OcclusionSettings(2, 1))
    assert m_pre.abs().max() == 0 and m_post.abs().max() == 0
    with pytest.raises(ValueError, match="stride=3 must be between 1 and the window"):
        OcclusionSettings(window=2, stride=3)
    with pytest.raises(ValueError, match="window=0"):
        OcclusionSettings(window=0)
    with pytest.raises(ValueError, match="occlusion, whose maps are at the input only"):
        ExplainSettings(methods=["hirescam", "occlusion"], taps=["enc1"])
    with pytest.raises(ValueError, match="occlusion has maps at the input only"):
        explain_batch(Difference(), pre, pre, taps=["enc1"], target="all", methods=["occlusion"])

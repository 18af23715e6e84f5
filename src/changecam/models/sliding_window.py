"""Sliding-window inference: change logits for image pairs of any size (a wrapper network).

A pair of any height and width (1024², 1000x700, or smaller than one window) is cut into
``window x window`` crops whose starts advance by ``stride = window - round(overlap * window)``;
along each axis the last window is moved back to end exactly at the border, and an image
narrower than a window is padded (reflection by default) up to one window. The logits of every
window are blended with a smooth weight (a Gaussian bump, highest at the window centre) and
divided by the summed weight, then cropped back to the input's size.

Blending accumulates in float64 from float32 logits and weights, so a pixel that only one
window covers gets that window's logit *exactly*: with ``overlap=0`` and a size that is a
multiple of the window, the result equals patch-wise prediction bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from changecam.models.protocol import size_multiple
from changecam.values import is_count

Blend = Literal["gaussian", "uniform"]
PadMode = Literal["reflect", "replicate", "constant"]
BLENDS: tuple[str, ...] = get_args(Blend)
PAD_MODES: tuple[str, ...] = get_args(PadMode)


@dataclass(frozen=True)
class SlidingWindow:
    """How to cut an image pair into windows and blend them back.

    Args:
        window: side of the square windows in pixels; must be divisible by the network's
            ``size_multiple`` (``2**depth`` for a U-Net).
        overlap: fraction of a window shared by neighbouring windows, in ``[0, 1)``.
        batch_size: windows per forward pass (per image of the batch).
        blend: ``gaussian`` (separable smooth weight, sigma = window / 4: a window's edge
            counts 0.14 of its centre) or ``uniform`` (plain average of overlapping windows).
        pad_mode: how an image smaller than one window is padded (``reflect`` mirrors it,
            repeatedly if needed).
    """

    window: int = 256
    overlap: float = 0.25
    batch_size: int = 4
    blend: Blend = "gaussian"
    pad_mode: PadMode = "reflect"

    def __post_init__(self) -> None:
        if not is_count(self.window):
            raise ValueError(
                f"sliding_window.window={self.window!r} must be a positive whole number of pixels"
            )
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"sliding_window.overlap={self.overlap} must be in [0, 1)")
        if not is_count(self.batch_size):
            raise ValueError(
                f"sliding_window.batch_size={self.batch_size!r} must be a whole number >= 1"
            )
        if self.blend not in BLENDS:
            raise ValueError(
                f"sliding_window.blend={self.blend!r} is not allowed; expected one of {BLENDS}"
            )
        if self.pad_mode not in PAD_MODES:
            raise ValueError(
                f"sliding_window.pad_mode={self.pad_mode!r} is not allowed; expected one of {PAD_MODES}"
            )

    @property
    def stride(self) -> int:
        """Distance between the starts of neighbouring windows (at least 1)."""
        return max(1, self.window - round(self.overlap * self.window))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of the windows covering ``[0, length)``; the last one ends exactly at ``length``.

    ``length`` must be at least ``window`` (pad smaller images first).
    """
    if length < window:
        raise ValueError(f"length {length} is smaller than the window {window}; pad first")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def blend_weight(window: int, blend: Blend = "gaussian") -> Tensor:
    """The ``window x window`` float32 weight of one window's logits (strictly positive)."""
    if blend == "uniform":
        return torch.ones(window, window)
    if blend != "gaussian":
        raise ValueError(f"blend={blend!r} is not allowed; expected one of {BLENDS}")
    centre = (window - 1) / 2
    sigma = window / 4  # the edge weighs exp(-2) = 0.14 of the centre, a corner 0.018
    axis = torch.exp(-((torch.arange(window, dtype=torch.float64) - centre) ** 2) / (2 * sigma**2))
    return torch.outer(axis, axis).float()


def pad_to(x: Tensor, height: int, width: int, mode: PadMode = "reflect") -> Tensor:
    """Pad ``B x C x h x w`` at the bottom and right to at least ``height x width``.

    ``reflect`` mirrors repeatedly when the pad is wider than the image (like ``numpy.pad``),
    so even a tiny image can fill a window.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad_mode={mode!r} is not allowed; expected one of {PAD_MODES}")
    while x.shape[-2] < height or x.shape[-1] < width:
        h, w = x.shape[-2:]
        bottom, right = max(0, height - h), max(0, width - w)
        if mode == "reflect":  # one mirror may add at most size - 1 pixels
            bottom, right = min(bottom, h - 1), min(right, w - 1)
            if bottom == right == 0:  # a 1-pixel side cannot be mirrored: repeat it
                return pad_to(x, height, width, "replicate")
        x = F.pad(x, (0, right, 0, bottom), mode=mode)
    return x


def check_window(net: nn.Module, window: int) -> None:
    """Refuse a window the network cannot take (side not divisible by its ``size_multiple``)."""
    multiple = size_multiple(net)
    if window % multiple:
        raise ValueError(
            f"sliding_window.window={window} must be divisible by 2**depth = {multiple} of the "
            f"network ({type(net).__name__}.size_multiple)"
        )


WindowForward = Callable[..., Tensor]


@torch.no_grad()
def sliding_window_logits(net: nn.Module, pre: Tensor, post: Tensor, spec: SlidingWindow) -> Tensor:
    """Change logits ``B x 1 x H x W`` of ``net(pre, post)`` computed window by window.

    Args:
        net: a network ``net(pre, post) -> logits`` (in eval mode for inference).
        pre: ``B x C x H x W`` pre-change images, any ``H`` and ``W``.
        post: the post-change images, the same shape as ``pre``.
        spec: window size, overlap, windows per forward, blending and padding.

    Returns:
        Logits of exactly the input's height and width, float32, on the inputs' device.
    """
    if pre.shape != post.shape:
        raise ValueError(
            f"pre and post must have the same shape, got {tuple(pre.shape)} and {tuple(post.shape)}"
        )
    if pre.ndim != 4:
        raise ValueError(f"expected B x C x H x W inputs, got shape {tuple(pre.shape)}")
    check_window(net, spec.window)
    height, width = pre.shape[-2:]
    size = spec.window
    pre_p = pad_to(pre, size, size, spec.pad_mode)
    post_p = pad_to(post, size, size, spec.pad_mode)
    padded_h, padded_w = pre_p.shape[-2:]
    rows = window_starts(padded_h, size, spec.stride)
    cols = window_starts(padded_w, size, spec.stride)
    blended = blend_windows(lambda a, b: net(a, b).float(), (pre_p, post_p), rows, cols, spec)
    return blended[..., :height, :width]


def blend_windows(
    forward: WindowForward,
    inputs: Sequence[Tensor],
    rows: Sequence[int],
    cols: Sequence[int],
    spec: SlidingWindow,
    *,
    reuse: MutableMapping[tuple[int, int], Tensor] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> Tensor:
    """The one sliding-window blend: ``forward`` on every ``window x window`` crop starting at
    ``(r, c)`` for ``r`` in ``rows`` and ``c`` in ``cols`` (``spec.batch_size`` windows per
    call), each output weighted by :func:`blend_weight` and divided by the summed weight.

    :func:`sliding_window_logits` calls it with the windows of a whole image; the scene runner
    (:mod:`changecam.geo`) with the windows of the whole scene that fall into one block and its
    halo, so a scene blended block by block equals the whole-image blend. The windows are
    added in row-major order either way, so each pixel sums the same terms in the same order.

    Args:
        forward: the crops of every input (``N x C_i x w x w`` each) -> ``N x K x w x w``
            float32 outputs (the logits, or logits and maps); ``N = B * windows``
            (window-major).
        inputs: ``B x C_i x H x W`` tensors of one height and width (pre, post, and e.g. a
            valid mask), already padded to at least one window.
        rows: window start rows (every ``r + window <= H``).
        cols: window start columns.
        spec: window size, windows per call and blend.
        reuse: window outputs by start ``(origin + (r, c))`` shared between calls: a window
            found there is not computed again, and every computed one is stored (the caller
            removes those it no longer needs). Neighbouring scene blocks share the windows
            across their common edge this way.
        origin: where ``inputs`` start in the coordinates of ``reuse``'s keys.

    Returns:
        ``B x K x H x W`` float32; pixels no window covers are NaN.
    """
    first_input = inputs[0]
    batch, _, height, width = first_input.shape
    device = first_input.device
    size = spec.window
    positions = [(r, c) for r in rows for c in cols]
    if not positions:
        raise ValueError("blend_windows needs at least one window")
    weight64 = blend_weight(size, spec.blend).to(device).double()
    sums: list[Tensor] = []  # the output sum, allocated once the number of channels is known
    weight_sum = torch.zeros(height, width, dtype=torch.float64, device=device)

    def add(r: int, c: int, window_out: Tensor) -> None:
        if not sums:
            sums.append(
                torch.zeros(
                    batch, window_out.shape[1], height, width, dtype=torch.float64, device=device
                )
            )
        sums[0][..., r : r + size, c : c + size] += window_out.double() * weight64
        weight_sum[r : r + size, c : c + size] += weight64

    def key(r: int, c: int) -> tuple[int, int]:
        return origin[0] + r, origin[1] + c

    missing = positions if reuse is None else [p for p in positions if key(*p) not in reuse]
    for first in range(0, len(missing), spec.batch_size):
        chunk = missing[first : first + spec.batch_size]
        crops = [torch.cat([x[..., r : r + size, c : c + size] for r, c in chunk]) for x in inputs]
        outputs = forward(*crops)
        for i, (r, c) in enumerate(chunk):
            window_out = outputs[i * batch : (i + 1) * batch]
            if reuse is None:  # streaming: every window is added once, in order
                add(r, c, window_out)
            else:
                reuse[key(r, c)] = window_out
    if reuse is not None:
        for r, c in positions:
            add(r, c, reuse[key(r, c)])
    return (sums[0] / weight_sum).float()


class SlidingWindowNet(nn.Module):
    """A network wrapper whose forward is :func:`sliding_window_logits`: it takes pairs of any
    size (``size_multiple`` 1), so whole images go through the same test loop as tiles.

    Args:
        net: the wrapped network (kept as ``self.net``).
        spec: the sliding-window settings.
    """

    size_multiple = 1

    def __init__(self, net: nn.Module, spec: SlidingWindow) -> None:
        super().__init__()
        check_window(net, spec.window)
        self.net = net
        self.spec = spec

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        return sliding_window_logits(self.net, pre, post, self.spec)


def num_windows(height: int, width: int, spec: SlidingWindow) -> int:
    """How many windows :func:`sliding_window_logits` runs for one ``height x width`` image."""
    rows = len(window_starts(max(height, spec.window), spec.window, spec.stride))
    cols = len(window_starts(max(width, spec.window), spec.window, spec.stride))
    return rows * cols


__all__ = [
    "BLENDS",
    "PAD_MODES",
    "SlidingWindow",
    "SlidingWindowNet",
    "WindowForward",
    "blend_weight",
    "blend_windows",
    "check_window",
    "num_windows",
    "pad_to",
    "sliding_window_logits",
    "window_starts",
]

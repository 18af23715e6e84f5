"""The fully convolutional change-detection networks of Daudt, Le Saux and Boulch (ICIP 2018).

"Fully convolutional siamese networks for change detection" introduced three U-Nets:

* :class:`FCEF` (FC-EF, early fusion): the two dates concatenated on channels at the input,
  one encoder;
* :class:`FCSiamConc` (FC-Siam-conc): one encoder shared by both dates (run once per date),
  each skip the concatenation of the two dates' features;
* :class:`FCSiamDiff` (FC-Siam-diff): the same shared encoder, each skip the absolute
  difference ``|pre - post|`` of the two dates' features.

The layout follows the paper and the authors' code (``unet.py``, ``siamunet_conc.py``,
``siamunet_diff.py`` of rcdaudt/fully_convolutional_change_detection):

* four encoder stages of width ``base``, ``2 base``, ``4 base``, ``8 base`` (16/32/64/128
  published) with 2/2/3/3 units of 3×3 convolution + batch norm + ReLU + channel dropout
  (``Dropout2d``, p = 0.2), 2×2 max pooling after every stage, including the fourth; there is
  no bottleneck convolution;
* each decoder stage upsamples with a 3×3 transposed convolution (stride 2, padding 1, output
  padding 1: exactly twice the size), concatenates the skip and runs 3/3/2/1 units (deep to
  shallow) whose 3×3 convolutions are stride-1 transposed convolutions, as in the authors'
  code; the last unit of stages 4, 3, 2 halves the width; the head is one more 3×3 transposed
  convolution, without normalisation;
* in the Siamese networks the deepest path (pooled stage-4 features into the first
  upsampling) carries the **post** date's features only: the authors' forward pools stage 4 of
  both dates and upsamples the second date's result, so the pre date reaches the decoder
  through the skips alone. This is kept; it makes ``post/enc4`` explanations differ in kind
  from ``pre/enc4`` ones.

Differences from the authors' code, on purpose:

* the output is **one logit channel** (B×1×H×W, no sigmoid), changecam's convention, instead
  of two classes through ``LogSoftmax``; the head has 16·9 + 1 instead of 16·2·9 + 2
  parameters;
* input sides must be multiples of 16 (:attr:`~FCEF.size_multiple`). The authors
  replication-pad each upsampled map to its skip's size, so their networks accept any side of
  at least 16; for multiples of 16 that padding is a no-op, so on the inputs accepted here the
  forward is theirs. changecam pads other sizes before the network (sliding window, explain
  runner), which keeps every tap cell aligned with one 2^k-pixel block.

Taps (:mod:`changecam.models.taps`): the Siamese networks have ``pre/enc{k}`` and
``post/enc{k}`` (each date's stage k before pooling; the shared encoder runs twice, so each
date's output passes its own tap), ``fuse{k}`` (the fused skip), ``dec{k}`` (decoder stage k,
deep to shallow) and ``head_in``; FC-EF, whose dates meet at the input, has ``enc{k}`` instead
of the per-date and fused encoder taps.
"""

from __future__ import annotations

from itertools import pairwise
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from changecam.models.protocol import ChangeNetwork
from changecam.models.taps import Tap

STAGE_UNITS: tuple[int, ...] = (2, 2, 3, 3)
"""Convolution units per encoder stage, shallow to deep (the published 2/2/3/3)."""
DEPTH = len(STAGE_UNITS)
SiamFusion = Literal["concat", "absdiff"]


class ConvUnit(nn.Module):
    """3×3 convolution, batch norm, ReLU, channel dropout: the authors' repeated unit.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dropout: ``Dropout2d`` probability.
        transposed: use a stride-1 transposed convolution (the authors' decoder layers; the
            same function class as a convolution, with their weight layout and initialisation).
    """

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float, transposed: bool = False
    ) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.relu(self.bn(self.conv(x))))


class DecoderStage(nn.Module):
    """Double the size (3×3 transposed convolution), concatenate the skip, run the units.

    Args:
        in_channels: channels of the deeper input (and of the upsampled map).
        skip_channels: channels of the skip.
        out_channels: channels of the last unit.
        units: number of units.
        dropout: ``Dropout2d`` probability.
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, units: int, dropout: float
    ) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, output_padding=1
        )
        widths = [in_channels + skip_channels, *[in_channels] * (units - 1), out_channels]
        self.units = nn.Sequential(
            *(ConvUnit(a, b, dropout, transposed=True) for a, b in pairwise(widths))
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.units(torch.cat([self.upconv(x), skip], dim=1))


def encoder_stages(in_channels: int, widths: list[int], dropout: float) -> nn.ModuleList:
    """The four encoder stages (units only; pooling is the network's, after each stage's tap)."""
    stages = []
    for width, units in zip(widths, STAGE_UNITS, strict=True):
        stages.append(
            nn.Sequential(
                ConvUnit(in_channels, width, dropout),
                *(ConvUnit(width, width, dropout) for _ in range(units - 1)),
            )
        )
        in_channels = width
    return nn.ModuleList(stages)


def decoder_stages(widths: list[int], skip_factor: int, dropout: float) -> nn.ModuleList:
    """Decoder stages indexed like the encoder's (element ``k - 1`` is stage k).

    Stage k upsamples ``widths[k-1]`` channels and ends at ``widths[k-2]`` (stage 1 at
    ``widths[0]``); stage 1 has one unit fewer than encoder stage 1, its last convolution being
    the head.
    """
    stages = []
    for k, width in enumerate(widths, start=1):
        units = STAGE_UNITS[k - 1] - (1 if k == 1 else 0)
        out = widths[k - 2] if k > 1 else width
        stages.append(DecoderStage(width, skip_factor * width, out, units, dropout))
    return nn.ModuleList(stages)


class _FullyConvolutional(ChangeNetwork):
    """What the three networks share: input checks, taps, pooling, decoder and head."""

    size_multiple: int = 2**DEPTH

    def _build(
        self,
        in_channels: int,
        base_channels: int,
        dropout: float,
        encoder_in: int,
        skip_factor: int,
        tap_names: list[str],
    ) -> None:
        if in_channels < 1 or base_channels < 1:
            raise ValueError(
                f"model.in_channels={in_channels} and model.base_channels={base_channels} "
                "must be positive"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.dropout = dropout
        widths = [base_channels * 2**k for k in range(DEPTH)]
        self.encoder = encoder_stages(encoder_in, widths, dropout)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.decoder = decoder_stages(widths, skip_factor, dropout)
        self.head = nn.ConvTranspose2d(widths[0], 1, kernel_size=3, padding=1)
        names = [*tap_names, *(f"dec{k}" for k in range(DEPTH, 0, -1)), "head_in"]
        # ModuleDict keys may not contain "/", so the public name lives on the Tap itself.
        self.taps = nn.ModuleDict({n.replace("/", "_"): Tap(n) for n in names})

    @property
    def tap_names(self) -> list[str]:
        """Public tap names."""
        return [tap.tap_name for tap in self.taps.values()]

    def _tap(self, name: str, x: Tensor) -> Tensor:
        return self.taps[name.replace("/", "_")](x)

    def _encode(self, x: Tensor, prefix: str) -> list[Tensor]:
        """Each stage's output (before pooling), through the tap ``{prefix}enc{k}``."""
        skips = []
        for k, stage in enumerate(self.encoder, start=1):
            x = self._tap(f"{prefix}enc{k}", stage(x if k == 1 else self.pool(x)))
            skips.append(x)
        return skips

    def _decode(self, deepest: Tensor, skips: list[Tensor]) -> Tensor:
        """Logits from the pooled stage-4 features and the four skips (shallow first)."""
        y = self.pool(deepest)
        for k in range(DEPTH, 0, -1):
            y = self._tap(f"dec{k}", self.decoder[k - 1](y, skips[k - 1]))
        return self.head(self._tap("head_in", y))


class FCEF(_FullyConvolutional):
    """FC-EF: early fusion, the two dates concatenated on channels into one U-Net.

    Returns change logits B×1×H×W (one channel, no sigmoid; the authors' network ends in two
    classes and ``LogSoftmax``). About 1.35 M parameters at the published width (3 bands per
    date); see the module docstring for the layout.

    Taps: ``enc1`` ... ``enc4`` (stage outputs before pooling, both dates fused), ``dec4`` ...
    ``dec1``, ``head_in``.

    Args:
        in_channels: bands per date (the first convolution takes twice as many).
        base_channels: width of stage 1; stage k has ``base_channels * 2**(k-1)`` (16 published).
        dropout: ``Dropout2d`` probability after every unit but the head (0.2 published).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        names = [f"enc{k}" for k in range(1, DEPTH + 1)]
        self._build(in_channels, base_channels, dropout, 2 * in_channels, 1, names)

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        self.check_inputs(pre, post, f"2**depth = {self.size_multiple} ({type(self).__name__})")
        skips = self._encode(torch.cat([pre, post], dim=1), "")
        return self._decode(skips[-1], skips)


class _FCSiam(_FullyConvolutional):
    """A shared (Siamese) encoder whose two dates' features meet at the skips."""

    fusion: ClassVar[SiamFusion]

    def __init__(self, in_channels: int = 3, base_channels: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        names = [f"{d}/enc{k}" for k in range(1, DEPTH + 1) for d in ("pre", "post")]
        names += [f"fuse{k}" for k in range(1, DEPTH + 1)]
        factor = 2 if self.fusion == "concat" else 1
        self._build(in_channels, base_channels, dropout, in_channels, factor, names)

    def _fuse(self, pre: Tensor, post: Tensor) -> Tensor:
        if self.fusion == "concat":
            return torch.cat([pre, post], dim=1)
        return (pre - post).abs()

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        self.check_inputs(pre, post, f"2**depth = {self.size_multiple} ({type(self).__name__})")
        pre_skips, post_skips = self._encode(pre, "pre/"), self._encode(post, "post/")
        skips = [
            self._tap(f"fuse{k}", self._fuse(a, b))
            for k, (a, b) in enumerate(zip(pre_skips, post_skips, strict=True), start=1)
        ]
        # As in the authors' code: only the post date's pooled stage 4 enters the upsampling.
        return self._decode(post_skips[-1], skips)


class FCSiamConc(_FCSiam):
    """FC-Siam-conc: shared encoder, each skip ``cat(pre_k, post_k)`` on channels.

    Returns change logits B×1×H×W (one channel, no sigmoid; the authors' network ends in two
    classes and ``LogSoftmax``). About 1.55 M parameters at the published width (3 bands per
    date); see the module docstring for the layout, including that only the post date's
    pooled stage-4 features enter the first upsampling.

    Taps: ``pre/enc{k}``, ``post/enc{k}``, ``fuse{k}`` (k = 1..4), ``dec4`` ... ``dec1``,
    ``head_in``.

    Args:
        in_channels: bands per date.
        base_channels: width of stage 1; stage k has ``base_channels * 2**(k-1)`` (16 published).
        dropout: ``Dropout2d`` probability after every unit but the head (0.2 published).
    """

    fusion: ClassVar[SiamFusion] = "concat"


class FCSiamDiff(_FCSiam):
    """FC-Siam-diff: shared encoder, each skip ``|pre_k - post_k|``.

    Returns change logits B×1×H×W (one channel, no sigmoid; the authors' network ends in two
    classes and ``LogSoftmax``). About 1.35 M parameters at the published width (3 bands per
    date); see the module docstring for the layout, including that only the post date's
    pooled stage-4 features enter the first upsampling.

    Taps: ``pre/enc{k}``, ``post/enc{k}``, ``fuse{k}`` (k = 1..4), ``dec4`` ... ``dec1``,
    ``head_in``.

    Args:
        in_channels: bands per date.
        base_channels: width of stage 1; stage k has ``base_channels * 2**(k-1)`` (16 published).
        dropout: ``Dropout2d`` probability after every unit but the head (0.2 published).
    """

    fusion: ClassVar[SiamFusion] = "absdiff"


__all__ = ["FCEF", "FCSiamConc", "FCSiamDiff"]

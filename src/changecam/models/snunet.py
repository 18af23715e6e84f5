"""SNUNet-CD: a densely connected Siamese network for change detection, with named taps.

Fang, Li, Shao, Li, "SNUNet-CD: A Densely Connected Siamese Network for Change Detection of VHR
Images", IEEE GRSL 2021 (doi:10.1109/LGRS.2021.3056416); the layout follows the authors' public
code (likyoo/Siam-NestedUNet, ``models/Models.py``: ``SNUNet_ECAM``). A shared five-stage
encoder runs once per date; a UNet++ grid of nested decoder nodes ``X_{i,j}`` (``j >= 1``) each
takes both dates' encoder features of its level, every earlier node of its level and the
upsampled node below; the four full-resolution nodes ``X_{0,1..4}`` (deep supervision) are
fused by the Ensemble Channel Attention Module (ECAM) before a 1x1 head.

Module and parameter names match the reference (``conv0_0`` ... ``conv0_4``, ``Up1_0`` ...,
``ca``, ``ca1``, ``conv_final``), so a reference ``state_dict`` loads except ``conv_final``,
which here has one output channel instead of two.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from changecam.models.protocol import ChangeNetwork
from changecam.models.taps import Tap

LEVELS = 5  # encoder levels X_{0,0} .. X_{4,0}; four poolings
ECAM_RATIO = 16  # channel reduction of the ensemble attention; the intra attention uses 16 // 4


class NestedBlock(nn.Module):
    """The reference ``conv_block_nested``: conv-BN-ReLU, conv-BN, a residual from the first
    convolution's output (taken before its BN), ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.activation = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        identity = self.conv1(x)
        x = self.activation(self.bn1(identity))
        return self.activation(self.bn2(self.conv2(x)) + identity)


class Up(nn.Module):
    """2x upsampling by a transposed convolution that keeps the channel count (reference ``up``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(x)


class ChannelAttention(nn.Module):
    """CBAM-style channel attention: a shared two-layer 1x1 MLP on the average- and max-pooled
    features, summed, sigmoid; returns weights ``B x C x 1 x 1``."""

    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        hidden = channels // ratio
        if hidden < 1:
            raise ValueError(
                f"channel attention over {channels} channels with ratio {ratio} "
                "has no hidden channel"
            )
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu1(self.fc1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self._mlp(self.avg_pool(x)) + self._mlp(self.max_pool(x)))


def nested_nodes() -> list[tuple[int, int]]:
    """Decoder nodes ``(i, j)``, ``j >= 1``, in the reference's forward order: for each new
    depth ``d`` the column of nodes ``X_{d-j, j}`` that it completes, ``j = 1 .. d``."""
    return [(depth - j, j) for depth in range(1, LEVELS) for j in range(1, depth + 1)]


class SNUNet(ChangeNetwork):
    """SNUNet-CD with ECAM, returning change logits ``B x 1 x H x W`` (no sigmoid).

    The reference outputs two class scores; this network outputs one logit channel (its 1x1
    head ``conv_final`` has one output), as every changecam network does. Inputs must be
    divisible by 16 (``size_multiple``). Widths per level: ``base_channels * (1, 2, 4, 8, 16)``.

    As in the reference, node ``X_{i,j}`` is ``conv{i}_{j}`` applied to
    ``cat(X^pre_{i,0}, X^post_{i,0}, X_{i,1}, ..., X_{i,j-1}, Up(X_{i+1,j-1}))``, where the
    upsampled ``X_{i+1,0}`` is the *post* date's encoder node: the reference computes the pre
    date's encoder only down to ``X_{3,0}`` (its ``x4_0A`` is commented out), so the pre date
    reaches the decoder only through the skip concatenations.

    Taps (identity modules, see :mod:`changecam.models.taps`), in forward order:

    * ``pre/enc1`` .. ``pre/enc4``: the pre date's encoder nodes ``X_{0,0}`` .. ``X_{3,0}``;
    * ``post/enc1`` .. ``post/enc5``: the post date's ``X_{0,0}`` .. ``X_{4,0}``. There is no
      ``pre/enc5`` because the reference never computes that node (a tap on it would hold
      all-zero maps and a post share of 1), so the per-date layers are ``enc1`` .. ``enc4``;
    * ``x0_1``, ``x1_1``, ``x0_2``, ``x2_1``, ``x1_2``, ``x0_3``, ``x3_1``, ``x2_2``, ``x1_3``,
      ``x0_4``: the fused nested decoder nodes ``X_{i,j}`` (``x0_1`` .. ``x0_4`` are the four
      full-resolution outputs that ECAM ensembles);
    * ``head_in``: the ECAM output ``M_ens * (cat(X_{0,1..4}) + repeat4(M_intra))``, input of
      the 1x1 head.

    Args:
        in_channels: bands per date.
        base_channels: width of the first level (32 is the published SNUNet-CD/32, about
            12.0 M parameters); at least 4, so ECAM's reduced widths are not zero.
    """

    size_multiple = 2 ** (LEVELS - 1)

    def __init__(self, in_channels: int = 3, base_channels: int = 32) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"model.in_channels={in_channels} must be positive")
        if base_channels < 4:
            raise ValueError(
                f"model.base_channels={base_channels} must be >= 4: ECAM reduces "
                f"4*base_channels channels by {ECAM_RATIO} and base_channels by {ECAM_RATIO // 4}"
            )
        self.in_channels = in_channels
        self.base_channels = base_channels
        widths = [base_channels * 2**i for i in range(LEVELS)]

        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        for i, width in enumerate(widths):
            setattr(
                self, f"conv{i}_0", NestedBlock(in_channels if i == 0 else widths[i - 1], width)
            )
        for i, j in nested_nodes():
            # both dates' X_{i,0}, the j-1 earlier decoder nodes of level i, the upsampled node
            setattr(
                self, f"conv{i}_{j}", NestedBlock(widths[i] * (j + 1) + widths[i + 1], widths[i])
            )
            setattr(self, f"Up{i + 1}_{j - 1}", Up(widths[i + 1]))
        self.ca = ChannelAttention(widths[0] * 4, ratio=ECAM_RATIO)
        self.ca1 = ChannelAttention(widths[0], ratio=ECAM_RATIO // 4)
        self.conv_final = nn.Conv2d(widths[0] * 4, 1, kernel_size=1)
        self._init_weights()

        names = [f"pre/enc{i + 1}" for i in range(LEVELS - 1)]
        names += [f"post/enc{i + 1}" for i in range(LEVELS)]
        names += [f"x{i}_{j}" for i, j in nested_nodes()] + ["head_in"]
        # ModuleDict keys may not contain "/", so the public name lives on the Tap itself.
        self.taps = nn.ModuleDict({n.replace("/", "_"): Tap(n) for n in names})

    def _init_weights(self) -> None:
        """The reference's initialisation: Kaiming-normal (fan-out) convolutions, unit BN.

        Transposed convolutions keep PyTorch's default, as in the reference."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @property
    def tap_names(self) -> list[str]:
        """Public tap names in forward order."""
        return [tap.tap_name for tap in self.taps.values()]

    def _tap(self, name: str, x: Tensor) -> Tensor:
        return self.taps[name.replace("/", "_")](x)

    def _encode(self, x: Tensor, date: Literal["pre", "post"], levels: int) -> list[Tensor]:
        """The shared encoder's nodes ``X_{0,0}`` .. ``X_{levels-1,0}`` of one date, tapped."""
        nodes: list[Tensor] = []
        for i in range(levels):
            x = getattr(self, f"conv{i}_0")(x if i == 0 else self.pool(nodes[-1]))
            nodes.append(self._tap(f"{date}/enc{i + 1}", x))
        return nodes

    def _ecam(self, outputs: list[Tensor]) -> Tensor:
        """Ensemble channel attention over the four full-resolution nodes ``X_{0,1..4}``."""
        ensemble = torch.cat(outputs, dim=1)
        intra = self.ca1(torch.stack(outputs).sum(0))
        return self.ca(ensemble) * (ensemble + intra.repeat(1, len(outputs), 1, 1))

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        self.check_inputs(pre, post, f"{self.size_multiple} (SNUNet pools {LEVELS - 1} times)")
        enc_pre = self._encode(pre, "pre", LEVELS - 1)
        enc_post = self._encode(post, "post", LEVELS)
        # grid[i][j] = X_{i,j}; column 0 holds the post date's encoder nodes (the upsampled input)
        grid: list[list[Tensor]] = [[node] for node in enc_post]
        for i, j in nested_nodes():
            upsampled = getattr(self, f"Up{i + 1}_{j - 1}")(grid[i + 1][j - 1])
            inputs = [enc_pre[i], enc_post[i], *grid[i][1:j], upsampled]
            node = getattr(self, f"conv{i}_{j}")(torch.cat(inputs, dim=1))
            grid[i].append(self._tap(f"x{i}_{j}", node))
        head_in = self._tap("head_in", self._ecam(grid[0][1:]))
        return self.conv_final(head_in)


__all__ = ["SNUNet"]

"""Siamese U-Net for bi-temporal change detection, with named per-date taps.

The layout follows the seed notebook (ConvBlock = 3x3 conv + BN + ReLU, EncoderBlock =
two ConvBlocks, max-pooling between stages, ConvTranspose decoder, 1x1 head) and keeps its
state-dict key names, so ``SiameseUNet(3, 64, 4, "concat", shared_encoder=False)`` loads a
``state_dict`` saved by the notebook as it is.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from changecam.models.protocol import ChangeNetwork
from changecam.models.taps import Tap

Fusion = Literal["concat", "diff", "absdiff"]
FUSIONS: tuple[str, ...] = get_args(Fusion)


class ConvBlock(nn.Module):
    """3x3 convolution, batch norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class EncoderBlock(nn.Module):
    """Two ConvBlocks; pooling happens in the U-Net, after the stage's tap."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_channels, out_channels)
        self.conv2 = ConvBlock(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class DecoderBlock(nn.Module):
    """2x transposed-conv upsampling, concatenation with the fused skip, two ConvBlocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv1 = ConvBlock(out_channels + skip_channels, out_channels)
        self.conv2 = ConvBlock(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = torch.cat([self.upconv(x), skip], dim=1)
        return self.conv2(self.conv1(x))


def fuse(pre: Tensor, post: Tensor, fusion: Fusion) -> Tensor:
    """Combine the two dates' features of one stage."""
    if fusion == "concat":
        return torch.cat([pre, post], dim=1)
    if fusion == "diff":
        return post - pre
    if fusion == "absdiff":
        return (post - pre).abs()
    raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")


class SiameseUNet(ChangeNetwork):
    """Siamese U-Net returning change logits ``B x 1 x H x W`` (no sigmoid).

    Taps (identity modules, see :mod:`changecam.models.taps`), in forward order:
    ``pre/enc{k}`` and ``post/enc{k}`` (each date's encoder stage k, before pooling),
    ``fuse{k}`` (the fused skip of stage k), ``bottleneck``, ``dec{k}`` (decoder stage k, from
    deep to shallow) and ``head_in`` (input of the final 1x1 convolution).

    Args:
        in_channels: bands per date.
        base_channels: width of the first stage; stage k has ``base_channels * 2**(k-1)``.
        depth: number of encoder stages (inputs must be divisible by ``2**depth``: the
            network's ``size_multiple``).
        fusion: how the two dates' features are combined at each skip and the bottleneck.
        shared_encoder: one encoder for both dates (true Siamese) or one per date (the seed's
            "two unshared encoders", state-dict keys ``encoder{k}a``/``encoder{k}b``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 16,
        depth: int = 4,
        fusion: Fusion = "concat",
        shared_encoder: bool = True,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"model.fusion={fusion!r} is not allowed; expected one of {FUSIONS}")
        if depth < 1:
            raise ValueError(f"model.depth={depth} must be >= 1")
        if base_channels < 1 or in_channels < 1:
            raise ValueError("model.base_channels and in_channels must be positive")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.depth = depth
        self.fusion: Fusion = fusion
        self.shared_encoder = shared_encoder
        self.size_multiple = 2**depth

        widths = [base_channels * 2**k for k in range(depth)]
        mult = 2 if fusion == "concat" else 1
        in_ch = in_channels
        for k, width in enumerate(widths, start=1):
            if shared_encoder:
                setattr(self, f"encoder{k}", EncoderBlock(in_ch, width))
            else:
                setattr(self, f"encoder{k}a", EncoderBlock(in_ch, width))
                setattr(self, f"encoder{k}b", EncoderBlock(in_ch, width))
            in_ch = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(mult * widths[-1], 2 * widths[-1])
        up_in = 2 * widths[-1]
        for k in range(depth, 0, -1):
            width = widths[k - 1]
            setattr(self, f"decoder{k}", DecoderBlock(up_in, mult * width, width))
            up_in = width
        self.final_conv = nn.Conv2d(widths[0], 1, kernel_size=1)

        names = [f"{date}/enc{k}" for k in range(1, depth + 1) for date in ("pre", "post")]
        names += [f"fuse{k}" for k in range(1, depth + 1)] + ["bottleneck"]
        names += [f"dec{k}" for k in range(depth, 0, -1)] + ["head_in"]
        # ModuleDict keys may not contain "/", so the public name lives on the Tap itself.
        self.taps = nn.ModuleDict({n.replace("/", "_"): Tap(n) for n in names})

    @property
    def tap_names(self) -> list[str]:
        """Public tap names in forward order."""
        return [tap.tap_name for tap in self.taps.values()]

    def _tap(self, name: str, x: Tensor) -> Tensor:
        return self.taps[name.replace("/", "_")](x)

    def _encoder(self, k: int, date: Literal["pre", "post"]) -> nn.Module:
        if self.shared_encoder:
            return getattr(self, f"encoder{k}")
        return getattr(self, f"encoder{k}{'a' if date == 'pre' else 'b'}")

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        self.check_inputs(pre, post, f"2**depth = {self.size_multiple}")
        x = {"pre": pre, "post": post}
        skips: list[Tensor] = []
        for k in range(1, self.depth + 1):
            feats = {
                d: self._tap(f"{d}/enc{k}", self._encoder(k, d)(x[d])) for d in ("pre", "post")
            }
            skips.append(self._tap(f"fuse{k}", fuse(feats["pre"], feats["post"], self.fusion)))
            x = {d: self.pool(f) for d, f in feats.items()}
        y = self._tap("bottleneck", self.bottleneck(fuse(x["pre"], x["post"], self.fusion)))
        for k in range(self.depth, 0, -1):
            y = self._tap(f"dec{k}", getattr(self, f"decoder{k}")(y, skips[k - 1]))
        return self.final_conv(self._tap("head_in", y))


def seed_siamese_unet(
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 4,
    fusion: Fusion = "concat",
    shared_encoder: bool = False,
) -> SiameseUNet:
    """The seed notebook's architecture (``model=siamese_unet_seed``): two unshared encoders
    64/128/256/512, concat fusion, a 1024->1024 bottleneck; about 34 M parameters.

    The defaults here are the one definition of that architecture (:data:`SEED_ARCHITECTURE`).
    """
    return SiameseUNet(in_channels, base_channels, depth, fusion, shared_encoder)


SEED_ARCHITECTURE: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(seed_siamese_unet).parameters.items()
}

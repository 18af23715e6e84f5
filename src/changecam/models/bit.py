"""BIT: the bitemporal image transformer (Chen, Qi, Shi, IEEE TGRS 2021, "Remote sensing image
change detection with transformers"), with named per-date taps.

The network follows the authors' public code (justchenhao/BIT_CD, ``models/networks.py``
``ResNet``/``BASE_Transformer`` and ``models/help_funcs.py``), variant ``BIT_S4`` (their
``base_transformer_pos_s4_dd8``, 3.55 M parameters): a ResNet-18 trunk cut after its fourth
stage (stem, layer1, layer2, layer3; output stride 8), a 2x nearest upsampling and a 3x3
projection to ``dim`` channels, a tokenizer (``token_len`` spatial-attention tokens per date),
a transformer encoder over both dates' tokens together (with a learned positional embedding), a
transformer decoder per date (pixels query that date's tokens), the absolute difference, a 4x
bilinear upsampling and a two-layer convolutional head. The ResNet trunk is written here (no
torchvision, no pretrained weights). State-dict keys follow the authors' module names
(``resnet.layer1.0.conv1.weight``, ``transformer_decoder.layers.0.0.fn.fn.to_q.weight`` ...).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from changecam.models.protocol import ChangeNetwork
from changecam.models.taps import Tap

Init = Literal["authors", "pytorch"]
INITS: tuple[str, ...] = get_args(Init)
Date = Literal["pre", "post"]
DATES: tuple[Date, Date] = ("pre", "post")

OUTPUT_STRIDE = 8  # stem conv (2) x max-pool (2) x layer2 (2); layer3 and layer4 keep stride 1


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, a residual connection (1x1 conv + BN when the
    shape changes) and ReLU.

    The authors ask for dilation in layer3/layer4 (``replace_stride_with_dilation``), but their
    ``BasicBlock`` resets any dilation to 1, so those stages are plain stride-1 stages; so here.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Trunk(nn.Module):
    """The first ``stages`` stages of ResNet-18 (the stem counts as stage 1), stride 8 at most.

    Stage widths are ``base_channels * (1, 1, 2, 4, 8)`` (stem, layer1 ... layer4); strides are
    2 (stem conv) and 2 (max-pool), then 1, 2, 1, 1 for layer1 ... layer4, as in the authors'
    ``resnet18(replace_stride_with_dilation=[False, True, True])``.
    """

    def __init__(self, in_channels: int, base_channels: int, stages: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        width = base_channels
        for k in range(1, stages):
            out, stride = base_channels * 2 ** (k - 1), 2 if k == 2 else 1
            blocks = nn.Sequential(BasicBlock(width, out, stride), BasicBlock(out, out))
            setattr(self, f"layer{k}", blocks)
            width = out
        self.out_channels = width
        self.layer_names = [f"layer{k}" for k in range(1, stages)]

    def stem(self, x: Tensor) -> Tensor:
        """conv1, BN, ReLU (stride 2; the max-pool follows in :meth:`layer`)."""
        return self.relu(self.bn1(self.conv1(x)))

    def layer(self, name: str, x: Tensor) -> Tensor:
        """One residual stage (``layer1`` pools the stem output first)."""
        if name == "layer1":
            x = self.maxpool(x)
        return getattr(self, name)(x)


class PreNorm(nn.Module):
    """LayerNorm, then ``fn``; with a memory, the same LayerNorm normalises it too (the
    authors' ``PreNorm``/``PreNorm2``)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        if memory is None:
            return self.fn(self.norm(x))
        return self.fn(self.norm(x), self.norm(memory))


class Residual(nn.Module):
    """``fn(x, ...) + x``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        return self.fn(x, memory) + x


class FeedForward(nn.Module):
    """Linear, GELU, Linear; the authors' dropout (p=0) is an identity that keeps their
    state-dict indices (``net.0``, ``net.3``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), nn.Identity(), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention as the authors write it: the logits are scaled by
    ``dim ** -0.5`` (the token width, not the head width); self-attention projects q, k, v with
    one ``to_qkv``, cross-attention with ``to_q`` on the queries and ``to_k``/``to_v`` on the
    memory; no biases in the projections, a biased output projection.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim**-0.5
        self.cross = cross
        if cross:
            self.to_q = nn.Linear(dim, inner, bias=False)
            self.to_k = nn.Linear(dim, inner, bias=False)
            self.to_v = nn.Linear(dim, inner, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # b h n d

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        if self.cross:
            if memory is None:
                raise ValueError("cross-attention needs a memory (the tokens)")
            q, k, v = self.to_q(x), self.to_k(memory), self.to_v(memory)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        # softmax(q k^T * scale) v, fused: 6x faster than written out on the CPU (4 keys)
        out = F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v), scale=self.scale
        )
        return self.to_out(out.transpose(1, 2).flatten(2))  # b n (h d)


class Transformer(nn.Module):
    """Pre-norm transformer: ``depth`` x (self-attention or cross-attention to a memory, then a
    feed-forward block), each with a residual connection. ``cross=False`` is the authors'
    ``Transformer`` (encoder), ``cross=True`` their ``TransformerDecoder``."""

    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, cross: bool
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(PreNorm(dim, Attention(dim, heads, dim_head, cross))),
                    Residual(PreNorm(dim, FeedForward(dim, mlp_dim))),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        for attn, ff in self.layers:
            x = ff(attn(x, memory))
        return x


class TwoLayerConv2d(nn.Sequential):
    """The authors' head: 3x3 conv (no bias), BN, ReLU, 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )


def authors_init(module: nn.Module) -> None:
    """The authors' ``init_weights(init_type='normal', init_gain=0.02)``, which ``define_G``
    applies to the whole network (trunk included): conv and linear weights ~ N(0, 0.02), their
    biases 0, BatchNorm2d weights ~ N(1, 0.02) and biases 0; LayerNorm keeps its default."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class BIT(ChangeNetwork):
    """BIT (bitemporal image transformer) returning change logits ``B x 1 x H x W``.

    Unlike the authors' two-class output (softmax / cross-entropy), the head ends in **one logit
    channel** (no sigmoid), as every changecam network does. Input sides must be multiples of
    8 (:attr:`size_multiple`). With the defaults this is the authors' ``BIT_S4``
    (``base_transformer_pos_s4_dd8``): 3,495,489 parameters (the paper gives 3.55 M; the
    authors' code, counting the modules its forward uses, 3,495,778: 289 more for the two-class
    head).

    Per date ``d`` (the trunk, projection, tokenizer and decoder are shared by both dates):
    ``features = conv_pred(up2(layer3(layer2(layer1(pool(stem(x)))))))`` (B×dim×H/4×W/4);
    tokens ``T[l] = Σ_n softmax_n(conv_a(features))[l, n] · features[:, n]`` (B×L×dim); the
    encoder runs once on ``[T_pre + pos[:L], T_post + pos[L:]]`` (B×2L×dim) and its two halves
    are the dates' encoded tokens; the decoder lets each pixel of ``features_d`` attend to the
    encoded tokens of date ``d``; the head sees ``up4(|decoded_pre - decoded_post|)``.

    Taps (:class:`~changecam.models.taps.Tap`, each runs once per forward), in order:

    * ``pre/stem``, ``post/stem``: conv1-BN-ReLU, ``base`` × H/2 × W/2;
    * ``pre/layer{k}``, ``post/layer{k}`` for the trunk's residual stages (``layer1`` ...
      ``layer3`` for ``resnet_stages=4``): ``base·(1, 2, 4, 8)[k-1]`` × H/4 (layer1) or H/8;
    * ``pre/features``, ``post/features``: the projection (authors' ``conv_pred``), dim × H/4;
      the tokenizer's input and the decoder's queries;
    * ``pre/tokens``, ``post/tokens``: the tokenizer's output laid out spatially,
      ``Z[(l, c), n] = a[l, n] · features[c, n]`` (B × (L·dim) × H/4 × W/4, ``a`` the
      softmaxed spatial attention), whose sum over ``n`` is the token ``T[l, c]`` itself, so
      the network runs through it. Since tokens reach the score only through that sum, its
      HiResCAM map is exactly ``Σ_l a[l, n] ⟨∂S/∂T_l, features[:, n]⟩``: each token's
      gradient-times-input attribution ``⟨∂S/∂T_l, T_l⟩`` spread over the pixels it pooled,
      i.e. the date's evidence that flows through its tokens (Grad-CAM equals HiResCAM here,
      the gradient being constant over space);
    * ``pre/decoded``, ``post/decoded``: the decoder's output per date, dim × H/4 × W/4: that
      date's pixels query tokens that the encoder computed from both dates, so this tap is the
      date's branch but not strictly a function of its pixels alone (on the zoo's trained BiT,
      measured by hand on six of the 256² LEVIR-CD samples, replacing the post image moves
      ``pre/decoded`` by 0.02 % of its norm and ``post/decoded`` by 70 %);
    * ``diff``: ``|decoded_pre - decoded_post|``, dim × H/4 × W/4;
    * ``head_in``: its 4x bilinear upsampling, the head's input, dim × H × W.

    The encoder's output tokens have no tap: self-attention mixes both dates' tokens, so they
    are no longer a function of one date's pixels that could be spread back over the image.

    Args:
        in_channels: bands per date.
        base_channels: width of the ResNet stem (published 64); stage widths are
            ``base·(1, 2, 4, 8)`` and the token width ``dim = base // 2`` (the authors' 32).
        resnet_stages: trunk depth counting the stem: 3, 4 (published, ``_s4``) or 5.
        token_len: tokens per date (published 4).
        enc_depth: transformer encoder layers (published 1).
        dec_depth: transformer decoder layers (published 8, ``_dd8``).
        heads: attention heads in encoder and decoder (published 8).
        dim_head: encoder head width (published 64).
        decoder_dim_head: decoder head width (published 64; the authors' ``_dedim8`` uses 8).
        with_pos: add the learned positional embedding to the tokens (published true).
        init: ``authors``: their N(0, 0.02) initialisation of every conv/linear layer;
            ``pytorch``: PyTorch's defaults.
    """

    size_multiple = OUTPUT_STRIDE

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        resnet_stages: int = 4,
        token_len: int = 4,
        enc_depth: int = 1,
        dec_depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        decoder_dim_head: int = 64,
        with_pos: bool = True,
        init: Init = "authors",
    ) -> None:
        super().__init__()
        self._check_arguments(
            in_channels, base_channels, resnet_stages, token_len, enc_depth, dec_depth, init
        )
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.token_len = token_len
        dim = base_channels // 2
        self.dim = dim

        self.resnet = ResNet18Trunk(in_channels, base_channels, resnet_stages)
        self.conv_pred = nn.Conv2d(self.resnet.out_channels, dim, 3, padding=1)
        self.conv_a = nn.Conv2d(dim, token_len, 1, bias=False)
        self.pos_embedding = nn.Parameter(torch.randn(1, 2 * token_len, dim)) if with_pos else None
        self.transformer = Transformer(dim, enc_depth, heads, dim_head, 2 * dim, cross=False)
        self.transformer_decoder = Transformer(
            dim, dec_depth, heads, decoder_dim_head, 2 * dim, cross=True
        )
        self.classifier = TwoLayerConv2d(dim, 1)
        if init == "authors":
            self.apply(authors_init)

        layers = ["stem", *self.resnet.layer_names, "features", "tokens", "decoded"]
        names = [f"{d}/{layer}" for layer in layers for d in DATES] + ["diff", "head_in"]
        # ModuleDict keys may not contain "/", so the public name lives on the Tap itself.
        self.taps = nn.ModuleDict({n.replace("/", "_"): Tap(n) for n in names})

    @staticmethod
    def _check_arguments(
        in_channels: int,
        base_channels: int,
        resnet_stages: int,
        token_len: int,
        enc_depth: int,
        dec_depth: int,
        init: str,
    ) -> None:
        if in_channels < 1:
            raise ValueError(f"model.in_channels={in_channels} must be >= 1")
        if base_channels < 2:
            raise ValueError(
                f"model.base_channels={base_channels} must be >= 2 (the token width is half of it)"
            )
        if resnet_stages not in (3, 4, 5):
            raise ValueError(f"model.resnet_stages={resnet_stages} must be 3, 4 or 5")
        if token_len < 1:
            raise ValueError(f"model.token_len={token_len} must be >= 1")
        if enc_depth < 0 or dec_depth < 0:
            raise ValueError(
                f"model.enc_depth={enc_depth} and model.dec_depth={dec_depth} must be >= 0"
            )
        if init not in INITS:
            raise ValueError(f"model.init={init!r} is not allowed; expected one of {INITS}")

    @property
    def tap_names(self) -> list[str]:
        """Public tap names in order."""
        return [tap.tap_name for tap in self.taps.values()]

    def _tap(self, name: str, x: Tensor) -> Tensor:
        return self.taps[name.replace("/", "_")](x)

    def _features(self, x: Tensor, date: Date) -> Tensor:
        """Trunk, 2x nearest upsampling and projection of one date (the authors'
        ``forward_single``): B×dim×H/4×W/4."""
        x = self._tap(f"{date}/stem", self.resnet.stem(x))
        for name in self.resnet.layer_names:
            x = self._tap(f"{date}/{name}", self.resnet.layer(name, x))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self._tap(f"{date}/features", self.conv_pred(x))

    def _tokens(self, features: Tensor, date: Date) -> Tensor:
        """The tokenizer, B×L×dim, computed through the spatial ``tokens`` tap (see the class
        docstring): ``Σ_n a[l, n] features[c, n]``, the authors' einsum written as a sum."""
        b, c, h, w = features.shape
        attention = self.conv_a(features).flatten(2).softmax(dim=-1).view(b, -1, 1, h, w)
        spread = (attention * features.unsqueeze(1)).reshape(b, -1, h, w)  # b (l c) h w
        return self._tap(f"{date}/tokens", spread).sum((2, 3)).view(b, -1, c)

    def _decode(self, features: Tensor, tokens: Tensor, date: Date) -> Tensor:
        """Each pixel of ``features`` queries ``tokens`` through the decoder: B×dim×h×w."""
        b, c, h, w = features.shape
        queries = features.flatten(2).transpose(1, 2)  # b (h w) c
        decoded = self.transformer_decoder(queries, tokens).transpose(1, 2).reshape(b, c, h, w)
        return self._tap(f"{date}/decoded", decoded)

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        self.check_inputs(
            pre, post, f"the output stride {self.size_multiple} of BIT's ResNet trunk"
        )
        features = {d: self._features(x, d) for d, x in zip(DATES, (pre, post), strict=True)}
        tokens = torch.cat([self._tokens(features[d], d) for d in DATES], dim=1)
        if self.pos_embedding is not None:
            tokens = tokens + self.pos_embedding
        encoded = dict(zip(DATES, self.transformer(tokens).chunk(2, dim=1), strict=True))
        decoded = [self._decode(features[d], encoded[d], d) for d in DATES]
        diff = self._tap("diff", (decoded[0] - decoded[1]).abs())
        x = F.interpolate(diff, scale_factor=4, mode="bilinear", align_corners=False)
        return self.classifier(self._tap("head_in", x))

"""The 2×4 explanation panel.

Top row: pre, post, ground truth, prediction. Bottom row: pre and post HiResCAM overlays of
one layer on **one** diverging colour scale (numeric colour bar, logit contribution per input
pixel), the combined map ``pre + post``, and the post share per layer; a text line below
gives the shares, the target score and the faithfulness gap.

matplotlib (Agg) draws what every panel of a layout shares once: frames, fixed titles, the
colour bars' gradients and labels, the bar chart's axes. Each sample's images, numbers and
bars are then put on a copy of that picture with numpy and Pillow, at the places matplotlib
laid out. Redrawing them with matplotlib cost about 0.11 s per panel, most of it laying out
and rasterising text; this costs a few milliseconds.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps, font_manager, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from changecam.data.io import write_png
from changecam.explain.faithfulness import Faithfulness
from changecam.explain.hirescam import Explanation, Method, choose_layer
from changecam.explain.targets import TargetKind
from changecam.metrics import confusion_counts, scores_from_counts

CMAP = "RdBu_r"  # blue: evidence against the target, red: evidence for it
# one instance: the registry hands out a copy per lookup, which builds its colour table again
COLOURS = colormaps[CMAP]
METHOD_TITLES = {
    "hirescam": "HiResCAM",
    "gradcam": "Grad-CAM",
    "contrastive": "Date-contrastive HiResCAM",
    "integrated_gradients": "Integrated Gradients",
    "layer_ig": "Layer IG (other date)",
    "occlusion": "Date-swap occlusion",
}

# what a map's pixel holds, where it is not a share of the logit (HiResCAM, IG: the maps sum
# to the target score): occlusion's pixel is the mean drop of the score over the swapped
# squares covering it, so its maps sum to about 2 x window² times the score's change
MAP_UNITS = {"occlusion": "mean score drop, square swapped"}
# over the maps of a sample whose target selects no pixel: why, per target kind
EMPTY_TARGET = {
    "predicted": "no change predicted",
    "ground_truth": "no change in the label",
    "roi": "empty region of interest",
    "all": "no pixel to explain",
}


def to_rgb(image: np.ndarray | Tensor) -> np.ndarray:
    """uint8 H×W×3 from a uint8 H×W×3 array or a float C×H×W tensor in [0, 1]."""
    if isinstance(image, Tensor):
        array = image.detach().float().cpu().clamp(0, 1).mul(255).round().byte().numpy()
        image = array.transpose(1, 2, 0)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 H×W×3 image or a float 3×H×W tensor, got {image.shape} {image.dtype}"
        )
    return image


def to_mask(mask: np.ndarray | Tensor) -> np.ndarray:
    """bool H×W from an H×W, 1×H×W array or tensor."""
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    while mask.ndim > 2 and mask.shape[0] == 1:  # not squeeze(): a 1-pixel side is a side
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask.shape}")
    return mask > 0.5 if mask.dtype.kind == "f" else mask != 0


def overlay(image: np.ndarray, cam: np.ndarray, vmax: float, alpha: float = 0.85) -> np.ndarray:
    """Float RGB: the image in gray, the signed map on top with opacity growing with ``|cam|``."""
    gray = image.astype(np.float32).mean(2, keepdims=True) / 255.0
    base = np.repeat(0.25 + 0.5 * gray, 3, axis=2)
    if vmax <= 0:
        return base
    rgba = COLOURS(Normalize(-vmax, vmax)(cam))
    weight = alpha * np.clip(np.abs(cam) / vmax, 0, 1)[..., None]
    return (1 - weight) * base + weight * rgba[..., :3]


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def render_panel(
    pre: np.ndarray | Tensor,
    post: np.ndarray | Tensor,
    explanation: Explanation,
    *,
    index: int = 0,
    label: np.ndarray | Tensor | None = None,
    layer: str | None = None,
    method: Method = "hirescam",
    faithfulness: Faithfulness | None = None,
    threshold: float = 0.5,
    title: str | None = None,
    dpi: int = 72,
    probability: np.ndarray | None = None,
    target: TargetKind = "predicted",
) -> np.ndarray:
    """Draw one sample's panel and return it as uint8 RGB (H×W×3).

    Args:
        pre: the sample's first-date image (uint8 H×W×3 or float 3×H×W in [0, 1]).
        post: the second-date image.
        explanation: an explanation holding the sample at ``index`` (with upsampled maps).
        index: which sample of the explanation (and of ``faithfulness``).
        label: ground-truth change mask (H×W), if known.
        layer: per-date layer drawn (default: the deepest with maps of ``method``).
        method: ``hirescam`` (default), ``gradcam`` or ``integrated_gradients`` (whose maps,
            and post shares, are at the input only).
        faithfulness: curves of the same batch; adds the gap of ``both`` dates to the text line.
        threshold: probability threshold of the drawn prediction.
        title: heading (e.g. the pair's name).
        dpi: resolution of the returned image (the figure is 13.5 × 7 inches).
        probability: H×W change probability drawn as the prediction (predict.py's sliding
            window, whose mask it explains); default the explanation's own logits'.
        target: what the explanation's target mask holds, for the notice over maps of an
            empty one (the prediction may show change while the label or ROI holds none).
    """
    exp = explanation.select(index)
    layer = choose_layer(exp.layers_of(method), layer, f"panel layer ({method})")
    pre_rgb, post_rgb = to_rgb(pre), to_rgb(post)
    size = exp.input_size
    if pre_rgb.shape[:2] != size or post_rgb.shape[:2] != size:
        raise ValueError(
            f"images {pre_rgb.shape[:2]}/{post_rgb.shape[:2]} do not match the explanation {size}"
        )
    shares = {k: float(v[0]) for k, v in exp.post_shares(method).items()}
    layout = _panel_layout(
        tuple(size), tuple(shares), layer, method, label is not None, bool(title), dpi
    )
    canvas = _Canvas(layout)
    probs = (
        torch.sigmoid(exp.logits[0, 0]).float().cpu()
        if probability is None
        else torch.as_tensor(np.asarray(probability, np.float32))
    )
    if tuple(probs.shape) != tuple(size):
        raise ValueError(f"probability {tuple(probs.shape)} does not match the explanation {size}")
    _draw_top_row(canvas, pre_rgb, post_rgb, label, probs, threshold)
    _draw_maps(canvas, pre_rgb, post_rgb, exp, layer, method, target)
    canvas.bars(list(shares.values()))
    canvas.text("line", _caption(shares, exp, faithfulness, index))
    if title:
        canvas.text("title", title)
    return canvas.finish()


def _draw_top_row(
    canvas: _Canvas,
    pre_rgb: np.ndarray,
    post_rgb: np.ndarray,
    label: np.ndarray | Tensor | None,
    probs: Tensor,
    threshold: float,
) -> None:
    """Pre, post, ground truth (with its change fraction) and prediction (with its F1)."""
    canvas.image("pre", pre_rgb)
    canvas.image("post", post_rgb)
    predicted = (probs > threshold).numpy()
    if label is not None:
        truth = to_mask(label)
        canvas.image("truth", truth)
        canvas.text("truth_title", f"ground truth ({truth.mean():.1%} change)")
        counts = confusion_counts(
            probs[None, None], torch.from_numpy(truth)[None, None].float(), threshold
        )
        f1 = float(scores_from_counts(*counts[0])["f1"])
        canvas.text("pred_title", f"prediction (p > {threshold:g}), F1 {f1:.2f}")
    else:
        canvas.text("pred_title", f"prediction (p > {threshold:g})")
    canvas.image("pred", predicted)


def _draw_maps(
    canvas: _Canvas,
    pre_rgb: np.ndarray,
    post_rgb: np.ndarray,
    exp: Explanation,
    layer: str,
    method: Method,
    target: TargetKind = "predicted",
) -> None:
    """Pre and post maps on one symmetric scale, their sum on its own, and the empty flag.

    The maps are overlaid at the size they are shown (resized first), so large pairs cost
    no more than small ones.
    """
    cams = {
        d: exp.map(f"{d}/{layer}", method, upsampled=True)[0].float().cpu().numpy()
        for d in ("pre", "post")
    }
    combined = cams["pre"] + cams["post"]
    vmax = float(max(np.abs(cams["pre"]).max(), np.abs(cams["post"]).max()))
    vmax_combined = float(np.abs(combined).max())
    for key, image, cam, scale in (
        ("pre_cam", pre_rgb, cams["pre"], vmax),
        ("post_cam", post_rgb, cams["post"], vmax),
        ("combined", post_rgb, combined, vmax_combined),
    ):
        shown = canvas.fit(key, image).round().clip(0, 255).astype(np.uint8)
        canvas.image(key, overlay(shown, canvas.fit(key, cam), scale), fitted=True)
    if bool(exp.empty[0]):
        canvas.notice(
            ("pre_cam", "post_cam", "combined"), f"{EMPTY_TARGET[target]}\n(empty target)"
        )
    canvas.colour_scale("scale", vmax or 1.0)
    canvas.colour_scale("scale_combined", vmax_combined or 1.0)


def _caption(
    shares: dict[str, float],
    exp: Explanation,
    faithfulness: Faithfulness | None,
    index: int,
) -> str:
    """The text line under the panel: shares, target score and (of sample ``index`` of the
    curves) the faithfulness gap."""
    line = "post share P_post/(P_pre+P_post): " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in shares.items()
    )
    line += f"  |  S = {float(exp.score[0]):.1f} over {int(exp.mask[0].sum())} px"
    if faithfulness is not None:
        gap = float(faithfulness.gap("both")[index])
        line += f"  |  faithfulness gap ({faithfulness.method} {faithfulness.layer}): {_fmt(gap)}"
    return line


Box = tuple[int, int, int, int]  # pixel rows y0:y1 and columns x0:x1 of the picture


@dataclass(frozen=True)
class _TextSpot:
    """Where a per-sample text goes: Pillow anchor point (pixels from the top left), anchor
    (``ms``: centre of the baseline, ...), size in pixels and colour."""

    xy: tuple[float, float]
    anchor: str
    size: float
    fill: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class _PanelLayout:
    """What every panel of one layout shares: the static picture and where each sample's
    parts go (see the module docstring)."""

    background: np.ndarray  # uint8 H×W×3
    boxes: dict[str, Box]  # image axes
    texts: dict[str, _TextSpot]
    bars: list[tuple[int, int]]  # x0, x1 of each layer's bar
    bar_rows: tuple[int, int, int]  # rows of post share 0, 1 and of the dashed 0.5 line
    bar_box: Box
    scales: dict[str, tuple[Box, int]]  # colour bar gradients, most tick intervals
    scale_labels: dict[str, tuple[str, _TextSpot]]  # each bar's unit line, drawn per sample
    tick: tuple[int, float, float]  # tick length, label gap (pixels), label size
    dpi: int


BAR_COLOUR = (214, 39, 40)  # matplotlib's tab:red
LINE_COLOUR = (128, 128, 128)


class _Canvas:
    """One panel being drawn on a copy of its layout's background."""

    def __init__(self, layout: _PanelLayout) -> None:
        self.layout = layout
        self.pixels = layout.background.copy()
        self._texts: list[tuple[str, _TextSpot, str]] = []  # drawn last, over the images

    def fit(self, key: str, array: np.ndarray) -> np.ndarray:
        """``array`` (H×W or H×W×C) resized to the box ``key``, as float32: antialiased
        bilinear when shrinking, nearest when enlarging (as matplotlib shows small images)."""
        y0, y1, x0, x1 = self.layout.boxes[key]
        size = (y1 - y0, x1 - x0)
        if min(size) < 1:  # a strip's box can round to no pixel across (a 2000 x 10 pair)
            return np.zeros((*(max(n, 0) for n in size), *array.shape[2:]), np.float32)
        data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        data = data.permute(2, 0, 1)[None] if data.ndim == 3 else data[None, None]
        if tuple(data.shape[-2:]) != size:
            if data.shape[-2] < size[0] or data.shape[-1] < size[1]:
                data = torch.nn.functional.interpolate(data, size=size, mode="nearest-exact")
            else:
                data = torch.nn.functional.interpolate(
                    data, size=size, mode="bilinear", antialias=True, align_corners=False
                )
        out = data[0].permute(1, 2, 0) if array.ndim == 3 else data[0, 0]
        return out.numpy()

    def image(self, key: str, array: np.ndarray, fitted: bool = False) -> None:
        """Put an image in the box ``key``: uint8 RGB, a bool mask (white = true) or, with
        ``fitted``, float RGB in [0, 1] already of the box's size. The box's one-pixel
        frame stays."""
        if not fitted:
            array = self.fit(key, array.astype(np.float32) if array.dtype == bool else array)
            array = array / 255.0 if array.ndim == 3 else array
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        y0, y1, x0, x1 = self.layout.boxes[key]
        rgb = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        self.pixels[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = rgb[1:-1, 1:-1]

    def text(self, key: str, value: str) -> None:
        self._texts.append((value, self.layout.texts[key], "plain"))

    def notice(self, keys: Sequence[str], value: str) -> None:
        """White text on a dimmed box in the middle of each box of ``keys``."""
        for key in keys:
            y0, y1, x0, x1 = self.layout.boxes[key]
            size = 11 * self.layout.dpi / 72
            spot = _TextSpot(((x0 + x1) / 2, (y0 + y1) / 2), "mm", size, (255, 255, 255))
            self._texts.append((value, spot, "notice"))

    def bars(self, shares: Sequence[float]) -> None:
        """The post share of each layer as a bar (none for NaN), under the dashed 0.5 line."""
        zero, one, half = self.layout.bar_rows
        for (x0, x1), share in zip(self.layout.bars, shares, strict=True):
            if not math.isnan(share):
                top = round(zero + (one - zero) * min(max(share, 0.0), 1.0))
                self.pixels[top:zero, x0:x1] = BAR_COLOUR
        y0, y1, x0, x1 = self.layout.bar_box
        dash = max(2, round(3.7 * 0.8 * self.layout.dpi / 72))
        gap = max(1, round(1.6 * 0.8 * self.layout.dpi / 72))
        for start in range(x0 + 1, x1 - 1, dash + gap):
            self.pixels[half, start : min(start + dash, x1 - 1)] = LINE_COLOUR

    def colour_scale(self, key: str, vmax: float) -> None:
        """Ticks and numbers under the colour bar ``key``, whose gradient spans ±``vmax``."""
        (y0, y1, x0, x1), bins = self.layout.scales[key]
        length, gap, size = self.layout.tick
        values = _ticks(vmax, bins)
        labels, offset = _tick_labels(values)
        for value, label in zip(values, labels, strict=True):
            x = round(x0 + (value + vmax) / (2 * vmax) * (x1 - 1 - x0))
            self.pixels[y1 : y1 + length, x] = 0
            self._texts.append((label, _TextSpot((x, y1 + length + gap), "ma", size), "plain"))
        # the power of ten joins the unit's line, within the bar's width (a smaller font where
        # it would be wider): beside the bar it ran into the next scale's numbers or the bar
        # chart, on its own row into the unit's line
        text, spot = self.layout.scale_labels[key]
        if offset:
            text = f"{text} (×{offset})"
        points = min(spot.size, spot.size * (x1 - x0) / _font(spot.size).getlength(text))
        points = max(points, 6 * self.layout.dpi / 72)
        self._texts.append((text, _TextSpot(spot.xy, spot.anchor, points), "plain"))

    def finish(self) -> np.ndarray:
        """The picture with its texts, uint8 H×W×3."""
        picture = Image.fromarray(self.pixels)
        draw = ImageDraw.Draw(picture)
        for value, spot, kind in self._texts:
            font = _font(spot.size)
            if kind == "notice":
                pad = 4 * self.layout.dpi / 72  # matplotlib's text box
                left, top, right, bottom = (
                    round(v + d * pad)
                    for v, d in zip(
                        draw.multiline_textbbox(
                            spot.xy, value, font=font, anchor=spot.anchor, align="center"
                        ),
                        (-1, -1, 1, 1),
                        strict=True,
                    )
                )
                region = np.asarray(picture)[top:bottom, left:right]
                picture.paste(Image.fromarray((region * 0.4).astype(np.uint8)), (left, top))
                draw.multiline_text(
                    spot.xy, value, font=font, anchor=spot.anchor, align="center", fill=spot.fill
                )
            else:
                draw.text(spot.xy, value, font=font, anchor=spot.anchor, fill=spot.fill)
        return np.asarray(picture).copy()


def _ticks(vmax: float, bins: int) -> list[float]:
    """Tick values of a colour scale from -``vmax`` to ``vmax``, as matplotlib's colour bar
    chooses them (at most ``bins`` intervals)."""
    values = MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10]).tick_values(-vmax, vmax)
    return [float(v) for v in values if abs(v) <= vmax * (1 + 1e-9)]


def _tick_labels(values: Sequence[float]) -> tuple[list[str], str]:
    """The ticks' numbers with the fewest decimals that tell them apart exactly, and, as
    matplotlib does outside 1e-5 .. 1e6, a common power of ten (``1e−9``) to read them by;
    with a true minus sign."""
    largest = max((abs(v) for v in values), default=0.0)
    power = math.floor(math.log10(largest)) if largest else 0
    offset = ""
    if power <= -5 or power >= 6:
        values = [v / 10.0**power for v in values]
        offset = f"1e{power}"
    step = min((abs(b - a) for a, b in zip(values, values[1:], strict=False)), default=1.0)
    digits = next(
        (d for d in range(7) if all(abs(round(v, d) - v) <= step * 1e-6 for v in values)), 6
    )
    texts = [f"{0.0 if abs(v) <= step * 1e-9 else v:.{digits}f}" for v in values]
    return [t.replace("-", "\N{MINUS SIGN}") for t in texts], offset.replace("-", "\N{MINUS SIGN}")


def _font(size: float) -> ImageFont.FreeTypeFont:
    """matplotlib's default font (DejaVu Sans) at ``size`` pixels, one per thread (a FreeType
    face is not safe to render from two threads at once)."""
    return _thread_font(size, threading.get_ident())


@functools.lru_cache(maxsize=32)
def _thread_font(size: float, thread: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties()), size)


@functools.lru_cache(maxsize=4)
def _panel_layout(
    size: tuple[int, int],
    layers: tuple[str, ...],
    layer: str,
    method: Method,
    has_label: bool,
    has_title: bool,
    dpi: int,
) -> _PanelLayout:
    """Lay the panel out with matplotlib once per layout and draw what it shares."""
    name = METHOD_TITLES[method]
    blank = np.ones((*size, 3), dtype=np.uint8) * 255
    fig = Figure(figsize=(13.5, 7.0), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    keys = {
        "pre": axes[0, 0],
        "post": axes[0, 1],
        "truth": axes[0, 2],
        "pred": axes[0, 3],
        "pre_cam": axes[1, 0],
        "post_cam": axes[1, 1],
        "combined": axes[1, 2],
    }
    for key, ax in keys.items():
        if key != "truth" or has_label:
            ax.imshow(blank)
    axes[0, 0].set_title("pre")
    axes[0, 1].set_title("post")
    if not has_label:
        axes[0, 2].text(
            0.5, 0.5, "no label", ha="center", va="center", transform=axes[0, 2].transAxes
        )
        axes[0, 2].set_title("ground truth")
    fig.subplots_adjust(
        left=0.02, right=0.98, top=0.9 if has_title else 0.94, bottom=0.15, wspace=0.1, hspace=0.2
    )
    renderer = fig.canvas.get_renderer()
    for ax, d in ((axes[1, 0], "pre"), (axes[1, 1], "post"), (axes[1, 2], "pre + post")):
        _fit_title(ax, f"{d} {name} {layer}", renderer)

    bar_ax = axes[1, 3]
    bar_patches = bar_ax.bar(range(len(layers)), [1.0] * len(layers), color="none")
    bar_ax.set_ylim(0, 1)
    bar_ax.set_yticks([0, 0.5, 1])
    bar_ax.set_xticks(range(len(layers)), layers)
    bar_ax.set_title("post share per layer")
    line = fig.text(0.5, 0.012, "", ha="center", va="bottom", fontsize=10)
    title = fig.suptitle("") if has_title else None
    fig.subplots_adjust(
        left=0.02, right=0.98, top=0.9 if has_title else 0.94, bottom=0.15, wspace=0.1, hspace=0.2
    )
    unit = MAP_UNITS.get(method, "logit contribution / px")
    scales = {
        "scale": _colorbar(fig, axes[1, 0], axes[1, 1], f"pre and post: {unit}"),
        "scale_combined": _colorbar(fig, axes[1, 2], axes[1, 2], f"pre + post: {unit}"),
    }
    fig.canvas.draw()
    background = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    height = background.shape[0]

    def box(artist: Any) -> Box:
        extent = artist.get_window_extent()
        return (
            height - round(extent.y1),
            height - round(extent.y0),
            round(extent.x0),
            round(extent.x1),
        )

    def spot(text: Any, anchor: str, points: float) -> _TextSpot:
        x, y = text.get_transform().transform(text.get_position())
        return _TextSpot((float(x), float(height - y)), anchor, points * dpi / 72)

    title_points = font_manager.FontProperties(size=rcParams["axes.titlesize"]).get_size_in_points()
    texts = {
        "pred_title": spot(axes[0, 3].title, "ms", title_points),
        "line": spot(line, "md", 10),
    }
    if has_label:
        texts["truth_title"] = spot(axes[0, 2].title, "ms", title_points)
    if title is not None:
        suptitle_points = font_manager.FontProperties(
            size=rcParams["figure.titlesize"]
        ).get_size_in_points()
        texts["title"] = spot(title, "ma", suptitle_points)
    to_pixels = bar_ax.transData.transform
    bars = []
    for patch in bar_patches:
        left, right = patch.get_x(), patch.get_x() + patch.get_width()
        bars.append((round(to_pixels((left, 0))[0]), round(to_pixels((right, 0))[0])))
    zero, half, one = (round(height - to_pixels((0, v))[1]) for v in (0.0, 0.5, 1.0))
    tick_points = rcParams["xtick.major.size"], rcParams["xtick.major.pad"]
    return _PanelLayout(
        background=background,
        boxes={key: box(ax) for key, ax in keys.items()},
        texts=texts,
        bars=bars,
        bar_rows=(zero, one, half),
        bar_box=box(bar_ax),
        scales={key: (box(cax), _tick_bins(box(cax), dpi)) for key, cax in scales.items()},
        scale_labels={
            key: (cax.xaxis.label.get_text(), _label_spot(cax.xaxis.label, height, dpi))
            for key, cax in scales.items()
        },
        tick=(
            max(1, round(tick_points[0] * dpi / 72)),
            tick_points[1] * dpi / 72,
            8 * dpi / 72,
        ),
        dpi=dpi,
    )


def _label_spot(label: Any, height: int, dpi: int) -> _TextSpot:
    """Where a laid-out colour bar label is: the middle of its top edge (Pillow's ``ma``)."""
    extent = label.get_window_extent()
    return _TextSpot(((extent.x0 + extent.x1) / 2, height - extent.y1), "ma", 9 * dpi / 72)


def _fit_title(ax: Any, text: str, renderer: Any, smallest: float = 7.0) -> Any:
    """Set ``ax``'s title, in a smaller font where it would be wider than the axes (and run
    into its neighbour's: "pre + post Date-contrastive HiResCAM enc4"). Returns the title."""
    title = ax.set_title(text)
    width = ax.get_window_extent(renderer).width
    size = title.get_fontsize()
    while title.get_window_extent(renderer).width > width and size > smallest:
        size -= 0.5
        title.set_fontsize(size)
    return title


def _tick_bins(box: Box, dpi: int) -> int:
    """How many tick intervals matplotlib fits on a horizontal axis as wide as ``box`` with
    8-point numbers (``XAxis.get_tick_space``: three font sizes per tick)."""
    width_points = (box[3] - box[2]) / dpi * 72
    return int(min(max(width_points // (8 * 3), 1), 9))


def _colorbar(fig: Figure, first: Any, last: Any, label: str) -> Any:
    """A horizontal colour bar under the axes ``first`` .. ``last``, from -1 to 1; its ticks
    and numbers are drawn per sample (they are laid out here, invisible, to place the label
    below them). Returns its axes."""
    left, right = first.get_position(), last.get_position()
    cax = fig.add_axes((left.x0, left.y0 - 0.035, right.x1 - left.x0, 0.018))
    mappable = ScalarMappable(norm=Normalize(-1.0, 1.0), cmap=CMAP)
    mappable.set_array([])
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    bar.set_ticks([-1.0, 0.0, 1.0], labels=["\N{MINUS SIGN}0.00"] * 3)
    # laid out here to place it below the numbers, drawn per sample (it may take a power of ten)
    bar.set_label(label, fontsize=9, labelpad=1, color=(0, 0, 0, 0))
    bar.ax.tick_params(labelsize=8, color=(0, 0, 0, 0), labelcolor=(0, 0, 0, 0))
    return cax


def save_panel(panel: np.ndarray, path) -> None:
    """Write a panel (uint8 RGB) to a PNG file atomically."""
    write_png(path, panel)

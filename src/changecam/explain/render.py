"""The 2×4 explanation panel (matplotlib Agg, no display).

Top row: pre, post, ground truth, prediction. Bottom row: pre and post HiResCAM overlays of
one layer on **one** diverging colour scale (numeric colour bar, logit contribution per input
pixel), the combined map ``pre + post``, and the post share per layer; a text line below
gives the shares, the target score and the faithfulness gap.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from changecam.data.io import write_png
from changecam.explain.faithfulness import Faithfulness
from changecam.explain.hirescam import Explanation, Method, choose_layer
from changecam.metrics import confusion_counts, scores_from_counts

CMAP = "RdBu_r"  # blue: evidence against the target, red: evidence for it
METHOD_TITLES = {
    "hirescam": "HiResCAM",
    "gradcam": "Grad-CAM",
    "contrastive": "Date-contrastive HiResCAM",
    "integrated_gradients": "Integrated Gradients",
    "layer_ig": "Layer IG (other date)",
    "occlusion": "Date-swap occlusion",
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
    mask = np.asarray(mask).squeeze()
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask.shape}")
    return mask > 0.5 if mask.dtype.kind == "f" else mask != 0


def overlay(image: np.ndarray, cam: np.ndarray, vmax: float, alpha: float = 0.85) -> np.ndarray:
    """Float RGB: the image in gray, the signed map on top with opacity growing with ``|cam|``."""
    gray = image.astype(np.float32).mean(2, keepdims=True) / 255.0
    base = np.repeat(0.25 + 0.5 * gray, 3, axis=2)
    if vmax <= 0:
        return base
    rgba = colormaps[CMAP](Normalize(-vmax, vmax)(cam))
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
    figure = _panel_figure(
        tuple(size), tuple(shares), layer, method, label is not None, bool(title), dpi
    )
    with figure.lock:
        art = figure.artists
        probs = torch.sigmoid(exp.logits[0, 0]).cpu()
        _draw_top_row(art, pre_rgb, post_rgb, label, probs, threshold)
        _draw_maps(art, pre_rgb, post_rgb, exp, layer, method)
        for bar, value in zip(art["bars"], shares.values(), strict=True):
            bar.set_height(0.0 if math.isnan(value) else value)
        art["line"].set_text(_caption(shares, exp, faithfulness, index))
        if title:
            art["title"].set_text(title)
        return figure.draw()


def _draw_top_row(
    art: dict[str, Any],
    pre_rgb: np.ndarray,
    post_rgb: np.ndarray,
    label: np.ndarray | Tensor | None,
    probs: Tensor,
    threshold: float,
) -> None:
    """Pre, post, ground truth (with its change fraction) and prediction (with its F1)."""
    art["pre"].set_data(pre_rgb)
    art["post"].set_data(post_rgb)
    if label is not None:
        truth = to_mask(label)
        art["truth"].set_data(truth)
        art["truth_title"].set_text(f"ground truth ({truth.mean():.1%} change)")
        counts = confusion_counts(
            probs[None, None], torch.from_numpy(truth)[None, None].float(), threshold
        )
        f1 = float(scores_from_counts(*counts[0])["f1"])
        art["pred_title"].set_text(f"prediction (p > {threshold:g}), F1 {f1:.2f}")
    else:
        art["pred_title"].set_text(f"prediction (p > {threshold:g})")
    art["pred"].set_data((probs > threshold).numpy())


def _draw_maps(
    art: dict[str, Any],
    pre_rgb: np.ndarray,
    post_rgb: np.ndarray,
    exp: Explanation,
    layer: str,
    method: Method,
) -> None:
    """Pre and post maps on one symmetric scale, their sum on its own, and the empty flag."""
    cams = {
        d: exp.map(f"{d}/{layer}", method, upsampled=True)[0].cpu().numpy() for d in ("pre", "post")
    }
    combined = cams["pre"] + cams["post"]
    vmax = float(max(np.abs(cams["pre"]).max(), np.abs(cams["post"]).max()))
    vmax_combined = float(np.abs(combined).max())
    art["pre_cam"].set_data(overlay(pre_rgb, cams["pre"], vmax))
    art["post_cam"].set_data(overlay(post_rgb, cams["post"], vmax))
    art["combined"].set_data(overlay(post_rgb, combined, vmax_combined))
    for text in art["empty"]:
        text.set_visible(bool(exp.empty[0]))
    art["scale"].set_clim(-vmax or -1.0, vmax or 1.0)
    art["scale_combined"].set_clim(-vmax_combined or -1.0, vmax_combined or 1.0)


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


@dataclass
class _PanelFigure:
    """A panel figure whose per-sample artists are ``animated``: the rest (axes, fixed titles,
    tick labels) is drawn once and restored before drawing them (matplotlib blitting)."""

    fig: Figure
    artists: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    _static: Any = None

    def __post_init__(self) -> None:
        for artist in self._dynamic():
            artist.set_animated(True)

    def _dynamic(self) -> list[Any]:
        """The per-sample artists in drawing order, with what must stay on top of them."""
        art, out = self.artists, []
        for key in ("pre", "post", "truth", "pred", "pre_cam", "post_cam", "combined"):
            if key in art:
                out += [art[key], *art[key].axes.spines.values()]
        out += [art["truth_title"]] if "truth_title" in art else []
        out += [art["pred_title"], *art["empty"]]
        bar_axes = art["bars"][0].axes if len(art["bars"]) else None
        out += list(art["bars"])
        if bar_axes is not None:
            out += [*bar_axes.lines, *bar_axes.spines.values()]
        out += [art["line"], *([art["title"]] if "title" in art else []), *art["colorbars"]]
        return out

    def draw(self) -> np.ndarray:
        canvas = self.fig.canvas
        if self._static is None:
            canvas.draw()
            self._static = canvas.copy_from_bbox(self.fig.bbox)
        canvas.restore_region(self._static)
        for artist in self._dynamic():
            self.fig.draw_artist(artist)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@functools.lru_cache(maxsize=4)
def _panel_figure(
    size: tuple[int, int],
    layers: tuple[str, ...],
    layer: str,
    method: Method,
    has_label: bool,
    has_title: bool,
    dpi: int,
) -> _PanelFigure:
    """The panel's figure for one layout, built once and redrawn with each sample's data
    (building the axes costs about twice as much as drawing them)."""
    name = METHOD_TITLES[method]
    blank_rgb = np.zeros((*size, 3), dtype=np.uint8)
    blank_mask = np.zeros(size, dtype=bool)
    art: dict[str, Any] = {}

    fig = Figure(figsize=(13.5, 7.0), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    art["pre"] = axes[0, 0].imshow(blank_rgb)
    axes[0, 0].set_title("pre")
    art["post"] = axes[0, 1].imshow(blank_rgb)
    axes[0, 1].set_title("post")
    if has_label:
        art["truth"] = axes[0, 2].imshow(
            blank_mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest"
        )
        art["truth_title"] = axes[0, 2].set_title("ground truth")
    else:
        axes[0, 2].text(
            0.5, 0.5, "no label", ha="center", va="center", transform=axes[0, 2].transAxes
        )
        axes[0, 2].set_title("ground truth")
    art["pred"] = axes[0, 3].imshow(
        blank_mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest"
    )
    art["pred_title"] = axes[0, 3].set_title("prediction")

    for ax, d in ((axes[1, 0], "pre"), (axes[1, 1], "post")):
        art[f"{d}_cam"] = ax.imshow(blank_rgb)
        ax.set_title(f"{d} {name} {layer}")
    art["combined"] = axes[1, 2].imshow(blank_rgb)
    axes[1, 2].set_title(f"pre + post {name} {layer}")
    art["empty"] = [
        ax.text(
            0.5,
            0.5,
            "no change predicted\n(empty target)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="white",
            fontsize=11,
            bbox={"facecolor": "black", "alpha": 0.6},
            visible=False,
        )
        for ax in axes[1, :3]
    ]

    ax = axes[1, 3]
    art["bars"] = ax.bar(range(len(layers)), [0.0] * len(layers), color="tab:red")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_yticks([0, 0.5, 1])
    ax.set_xticks(range(len(layers)), layers)
    ax.set_title("post share per layer")

    art["line"] = fig.text(0.5, 0.012, "", ha="center", va="bottom", fontsize=10)
    if has_title:
        art["title"] = fig.suptitle("")
    fig.subplots_adjust(
        left=0.02, right=0.98, top=0.9 if has_title else 0.94, bottom=0.15, wspace=0.1, hspace=0.2
    )
    art["scale"] = _colorbar(fig, axes[1, 0], axes[1, 1], "pre and post: logit contribution / px")
    art["scale_combined"] = _colorbar(
        fig, axes[1, 2], axes[1, 2], "pre + post: logit contribution / px"
    )
    art["colorbars"] = [m.colorbar.ax for m in (art["scale"], art["scale_combined"])]
    return _PanelFigure(fig, art)


def _colorbar(fig: Figure, first, last, label: str) -> ScalarMappable:
    """A horizontal numeric colour bar under the axes ``first`` .. ``last``; returns its source,
    whose ``set_clim(-vmax, vmax)`` sets the symmetric scale."""
    left, right = first.get_position(), last.get_position()
    cax = fig.add_axes((left.x0, left.y0 - 0.035, right.x1 - left.x0, 0.018))
    mappable = ScalarMappable(norm=Normalize(-1.0, 1.0), cmap=CMAP)
    mappable.set_array([])
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    bar.set_label(label, fontsize=9, labelpad=1)
    bar.ax.tick_params(labelsize=8)
    return mappable


def save_panel(panel: np.ndarray, path) -> None:
    """Write a panel (uint8 RGB) to a PNG file atomically."""
    write_png(path, panel)

"""The 2×4 explanation panel (matplotlib Agg, no display).

Top row: pre, post, ground truth, prediction. Bottom row: pre and post HiResCAM overlays of
one layer on **one** diverging colour scale (numeric colour bar, logit contribution per input
pixel), the combined map ``pre + post``, and the post share per layer; a text line below
gives the shares, the target score and the faithfulness gap.
"""

from __future__ import annotations

import math

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
from changecam.explain.hirescam import Explanation, Method
from changecam.metrics import confusion_counts, scores_from_counts

CMAP = "RdBu_r"  # blue: evidence against the target, red: evidence for it
METHOD_TITLES = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM"}


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
        layer: per-date layer drawn (default: the deepest explained).
        method: ``hirescam`` (default) or ``gradcam``.
        faithfulness: curves of the same batch; adds the gap of ``both`` dates to the text line.
        threshold: probability threshold of the drawn prediction.
        title: heading (e.g. the pair's name).
        dpi: resolution of the returned image (the figure is 13.5 × 7 inches).
    """
    exp = explanation.select(index)
    layers = exp.layers
    layer = layer if layer is not None else (layers[-1] if layers else None)
    if layer not in layers:
        raise ValueError(
            f"panel layer {layer!r} is not explained for both dates; available: {layers}"
        )
    pre_rgb, post_rgb = to_rgb(pre), to_rgb(post)
    size = exp.input_size
    if pre_rgb.shape[:2] != size or post_rgb.shape[:2] != size:
        raise ValueError(
            f"images {pre_rgb.shape[:2]}/{post_rgb.shape[:2]} do not match the explanation {size}"
        )
    cams = {
        d: exp.map(f"{d}/{layer}", method, upsampled=True)[0].cpu().numpy() for d in ("pre", "post")
    }
    combined = cams["pre"] + cams["post"]
    vmax = float(max(np.abs(cams["pre"]).max(), np.abs(cams["post"]).max()))
    vmax_combined = float(np.abs(combined).max())
    probs = torch.sigmoid(exp.logits[0, 0]).cpu()
    pred = (probs > threshold).numpy()
    name = METHOD_TITLES[method]
    empty = bool(exp.empty[0])

    fig = Figure(figsize=(13.5, 7.0), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(pre_rgb)
    axes[0, 0].set_title("pre")
    axes[0, 1].imshow(post_rgb)
    axes[0, 1].set_title("post")
    if label is not None:
        truth = to_mask(label)
        axes[0, 2].imshow(truth, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, 2].set_title(f"ground truth ({truth.mean():.1%} change)")
        counts = confusion_counts(
            probs[None, None], torch.from_numpy(truth)[None, None].float(), threshold
        )
        f1 = float(scores_from_counts(*counts[0])["f1"])
        pred_title = f"prediction (p > {threshold:g}), F1 {f1:.2f}"
    else:
        axes[0, 2].text(
            0.5, 0.5, "no label", ha="center", va="center", transform=axes[0, 2].transAxes
        )
        axes[0, 2].set_title("ground truth")
        pred_title = f"prediction (p > {threshold:g})"
    axes[0, 3].imshow(pred, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0, 3].set_title(pred_title)

    for ax, d, rgb in ((axes[1, 0], "pre", pre_rgb), (axes[1, 1], "post", post_rgb)):
        ax.imshow(overlay(rgb, cams[d], vmax))
        ax.set_title(f"{d} {name} {layer}")
    axes[1, 2].imshow(overlay(post_rgb, combined, vmax_combined))
    axes[1, 2].set_title(f"pre + post {name} {layer}")
    if empty:
        for ax in axes[1, :3]:
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
            )

    shares = {k: float(v[0]) for k, v in exp.post_shares(method).items()}
    ax = axes[1, 3]
    names = list(shares)
    values = [0.0 if math.isnan(v) else v for v in shares.values()]
    ax.bar(range(len(names)), values, color="tab:red")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_yticks([0, 0.5, 1])
    ax.set_xticks(range(len(names)), names)
    ax.set_title("post share per layer")

    line = "post share P_post/(P_pre+P_post): " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in shares.items()
    )
    line += f"  |  S = {float(exp.score[0]):.1f} over {int(exp.mask[0].sum())} px"
    if faithfulness is not None:
        gap = float(faithfulness.gap("both")[index])
        line += f"  |  faithfulness gap ({faithfulness.method} {faithfulness.layer}): {_fmt(gap)}"
    fig.text(0.5, 0.012, line, ha="center", va="bottom", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(
        left=0.02, right=0.98, top=0.9 if title else 0.94, bottom=0.15, wspace=0.1, hspace=0.2
    )
    _colorbar(fig, axes[1, 0], axes[1, 1], vmax, "pre and post: logit contribution / px")
    _colorbar(fig, axes[1, 2], axes[1, 2], vmax_combined, "pre + post: logit contribution / px")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _colorbar(fig: Figure, first, last, vmax: float, label: str) -> None:
    """A horizontal numeric colour bar under the axes ``first`` .. ``last``."""
    left, right = first.get_position(), last.get_position()
    cax = fig.add_axes((left.x0, left.y0 - 0.035, right.x1 - left.x0, 0.018))
    bar = fig.colorbar(_mappable(vmax), cax=cax, orientation="horizontal")
    bar.set_label(label, fontsize=9, labelpad=1)
    bar.ax.tick_params(labelsize=8)


def _mappable(vmax: float) -> ScalarMappable:
    """A colour-bar source for the symmetric scale ``[-vmax, vmax]`` (``[-1, 1]`` if all zero)."""
    mappable = ScalarMappable(norm=Normalize(-vmax or -1.0, vmax or 1.0), cmap=CMAP)
    mappable.set_array([])
    return mappable


def save_panel(panel: np.ndarray, path) -> None:
    """Write a panel (uint8 RGB) to a PNG file atomically."""
    write_png(path, panel)

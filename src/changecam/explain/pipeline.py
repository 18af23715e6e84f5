"""One image pair end to end: explanation, faithfulness, panel, files.

:func:`explain_pair` is what ``explain.py`` (and ``predict.py``) run for each pair: it pads
sides that are not a multiple of the model's ``2**depth`` (reflection at the bottom/right, the
padding excluded from the target and never modified by the curves), explains, measures
faithfulness, crops the maps back to the input (raw maps keep the tap cells that cover it;
shares are computed on those) and renders the panel.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from changecam.data.transforms import image_to_tensor
from changecam.explain.faithfulness import CURVE_DATES, CurveDate, Faithfulness, faithfulness
from changecam.explain.hirescam import METHODS, Explanation, Method, explain_batch
from changecam.explain.render import render_panel, save_panel
from changecam.explain.targets import Target, TargetKind


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain and how (the ``explain`` block of ``conf/explain.yaml``).

    Args:
        taps: tap names or per-date layers (``enc3``); ``None``: every tap.
        methods: ``hirescam`` and/or ``gradcam``.
        target: ``predicted``, ``ground_truth``, ``all`` or ``roi``.
        threshold: probability threshold of the predicted-change target and of the panel.
        panel_layer: per-date layer drawn in the panel; ``None``: the deepest explained.
        faithfulness_layer: layer ranking the pixels of the curves; ``None``: the deepest.
        steps: curve resolution (``steps + 1`` points); 0 skips faithfulness.
        dates: curves computed (``both`` is always included: it gives the headline gap).
        random_repeats: random orders averaged for the baseline.
        insertion: also compute insertion curves.
        seed: seed of the random order.
        batch_size: counterfactual pairs per forward pass.
        dpi: panel resolution.
    """

    taps: tuple[str, ...] | None = None
    methods: tuple[Method, ...] = METHODS
    target: TargetKind = "predicted"
    threshold: float = 0.5
    panel_layer: str | None = None
    faithfulness_layer: str | None = None
    steps: int = 10
    dates: tuple[CurveDate, ...] = CURVE_DATES
    random_repeats: int = 1
    insertion: bool = False
    seed: int = 0
    batch_size: int = 32
    dpi: int = 72

    def __post_init__(self) -> None:
        Target(self.target, self.threshold)  # validates kind and threshold
        if self.steps < 0 or self.random_repeats < 1:
            raise ValueError(
                f"explain.faithfulness.steps={self.steps} must be >= 0 and random_repeats="
                f"{self.random_repeats} >= 1"
            )
        bad = [d for d in self.dates if d not in CURVE_DATES]
        if bad:
            raise ValueError(
                f"explain.faithfulness.dates has {bad}; expected some of {CURVE_DATES}"
            )
        if "hirescam" not in self.methods:
            raise ValueError(
                f"explain.methods={list(self.methods)} must include hirescam (panels and shares use it)"
            )


@dataclass(frozen=True)
class PairExplanation:
    """Everything explained about one pair (tensors on the CPU, cropped to the input size)."""

    name: str
    explanation: Explanation
    faithfulness: Faithfulness | None
    panel: np.ndarray
    padded_size: tuple[int, int] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers: target score, post share per layer (and per method), gaps."""
        exp = self.explanation
        out: dict[str, Any] = {
            "name": self.name,
            "size": list(exp.input_size),
            "padded_to": list(self.padded_size) if self.padded_size else None,
            "target_score": _num(exp.score[0]),
            "target_pixels": int(exp.mask[0].sum()),
            "empty_target": bool(exp.empty[0]),
        }
        for method in exp.methods:
            key = "post_share" if method == "hirescam" else f"post_share_{method}"
            out[key] = {k: _num(v[0]) for k, v in exp.post_shares(method).items()}
        faith = self.faithfulness
        out["faithfulness_gap"] = _num(faith.gap("both")[0]) if faith else None
        if faith is not None:
            dates = list(faith.curves["deletion"])
            out["faithfulness"] = {
                "layer": faith.layer,
                "method": faith.method,
                "fractions": [round(float(k), 6) for k in faith.fractions],
                "gap": {d: _num(faith.gap(d)[0]) for d in dates},
                "insertion_gap": (
                    {d: _num(faith.gap(d, "insertion")[0]) for d in dates}
                    if "insertion" in faith.curves
                    else None
                ),
                "curves": {
                    kind: {
                        d: {o: [_num(v) for v in c[0]] for o, c in per.items()}
                        for d, per in dd.items()
                    }
                    for kind, dd in faith.curves.items()
                },
            }
        return out

    def save(self, run_dir: str | Path, maps: bool = True) -> dict[str, str]:
        """Write ``panels/<name>.png`` and (if ``maps``) ``maps/<name>.npz``; return their paths."""
        run_dir = Path(run_dir)
        written = {"panel": str(run_dir / "panels" / f"{self.name}.png")}
        save_panel(self.panel, written["panel"])
        if maps:
            written["maps"] = str(run_dir / "maps" / f"{self.name}.npz")
            save_maps(self.explanation, written["maps"])
        return written


def _num(value: Tensor | float) -> float | None:
    """A float for JSON; NaN (undefined) becomes ``None``."""
    value = float(value)
    return None if math.isnan(value) else value


def save_maps(explanation: Explanation, path: str | Path) -> None:
    """Save one sample's raw signed maps (``<method>/<tap>``), logits, target mask and score.

    Written to a temporary file first, so a crash never leaves a half-written ``.npz``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exp = explanation.select(0)
    arrays = {f"{m}/{t}": v[0].numpy() for m, d in exp.raw.items() for t, v in d.items()}
    arrays["logits"] = exp.logits[0, 0].numpy()
    arrays["target_mask"] = exp.mask[0, 0].numpy().astype(np.uint8)
    arrays["target_score"] = exp.score[0].numpy()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def size_multiple(model: nn.Module) -> int:
    """The factor input sides must be divisible by: ``2**depth`` of the (wrapped) network, else 1."""
    for candidate in (model, getattr(model, "net", None)):
        depth = getattr(candidate, "depth", None)
        if isinstance(depth, int):
            return 2**depth
    return 1


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad the bottom/right of N×C×H×W ``x`` to multiples of ``multiple`` (reflection where the
    image is large enough, else edge replication)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def explain_pair(
    model: nn.Module,
    pre: np.ndarray,
    post: np.ndarray,
    *,
    label: np.ndarray | None = None,
    roi: np.ndarray | None = None,
    name: str = "pair",
    settings: ExplainSettings | None = None,
    device: torch.device | str | None = None,
) -> PairExplanation:
    """Explain one pair end to end.

    Args:
        model: the network (eval mode is used; its mode is restored).
        pre: uint8 H×W×3 first-date image (as from :func:`changecam.data.io.read_image`).
        post: uint8 H×W×3 second-date image of the same size.
        label: {0,1} H×W ground truth (drawn in the panel; needed for ``target=ground_truth``).
        roi: {0,1} H×W region of interest (needed for ``target=roi``).
        name: the pair's name (panel title, file names).
        settings: what to explain; default :class:`ExplainSettings`.
        device: where to run; default the model's device.

    Raises:
        ValueError: images of different sizes or channel counts, or masks that do not fit.
    """
    settings = settings or ExplainSettings()
    if pre.shape != post.shape:
        raise ValueError(
            f"pair {name!r}: pre is {pre.shape[:2]} but post is {post.shape[:2]}; both dates must have the same size"
        )
    height, width = pre.shape[:2]
    for what, m in (("label", label), ("roi", roi)):
        if m is not None and m.shape != (height, width):
            raise ValueError(
                f"pair {name!r}: {what} is {m.shape} but the images are {(height, width)}"
            )
    if device is None:
        device = next(model.parameters()).device
    multiple = size_multiple(model)
    x_pre = pad_to_multiple(image_to_tensor(pre)[None].to(device), multiple)
    x_post = pad_to_multiple(image_to_tensor(post)[None].to(device), multiple)
    padded = tuple(x_pre.shape[-2:])
    valid = torch.zeros(1, *padded, dtype=torch.bool, device=device)
    valid[:, :height, :width] = True

    def padded_mask(m: np.ndarray | None) -> Tensor | None:
        if m is None:
            return None
        out = torch.zeros(1, 1, *padded, device=device)
        out[..., :height, :width] = torch.from_numpy(np.asarray(m) > 0).float()
        return out

    exp = explain_batch(
        model,
        x_pre,
        x_post,
        taps=settings.taps,
        target=Target(settings.target, settings.threshold),
        methods=settings.methods,
        label=padded_mask(label),
        roi=padded_mask(roi),
        valid=valid,
    )
    faith = None
    if settings.steps > 0:
        faith = faithfulness(
            model,
            x_pre,
            x_post,
            exp,
            layer=settings.faithfulness_layer,
            dates=tuple(dict.fromkeys(("both", *settings.dates))),
            steps=settings.steps,
            insertion=settings.insertion,
            random_repeats=settings.random_repeats,
            seed=settings.seed,
            valid=valid,
            batch_size=settings.batch_size,
        )
    exp = exp.crop(height, width).to("cpu")
    panel = render_panel(
        pre,
        post,
        exp,
        label=label,
        layer=settings.panel_layer,
        faithfulness=faith,
        threshold=settings.threshold,
        title=name,
        dpi=settings.dpi,
    )
    return PairExplanation(
        name=name,
        explanation=exp,
        faithfulness=faith,
        panel=panel,
        padded_size=padded if padded != (height, width) else None,
    )


def settings_from_config(cfg: Any) -> ExplainSettings:
    """:class:`ExplainSettings` from the ``explain`` block of the Hydra config."""
    faith = cfg.get("faithfulness") or {}
    taps = cfg.get("taps")
    return ExplainSettings(
        taps=tuple(taps) if taps is not None else None,
        methods=tuple(cfg.get("methods", METHODS)),
        target=cfg.get("target", "predicted"),
        threshold=float(cfg.get("threshold", 0.5)),
        panel_layer=cfg.get("panel_layer"),
        faithfulness_layer=faith.get("layer"),
        steps=int(faith.get("steps", 10)),
        dates=tuple(faith.get("dates", CURVE_DATES)),
        random_repeats=int(faith.get("random_repeats", 1)),
        insertion=bool(faith.get("insertion", False)),
        seed=int(faith.get("seed", 0)),
        batch_size=int(faith.get("batch_size", 32)),
        dpi=int(cfg.get("dpi", 72)),
    )


__all__ = [
    "ExplainSettings",
    "PairExplanation",
    "explain_pair",
    "pad_to_multiple",
    "save_maps",
    "settings_from_config",
    "size_multiple",
]

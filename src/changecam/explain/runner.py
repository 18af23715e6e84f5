"""The one explanation runner: settings, padding, explanation, faithfulness, panel, files.

Every command explains through here: ``explain.py`` and ``predict.py`` per pair
(:func:`explain_pair`), ``eval.py`` per test batch and the CAM-panel callback per validation
epoch (:func:`explain_tensors`). The settings are one type, :class:`ExplainSettings`, with a
nested :class:`FaithfulnessSettings` block: the ``explain`` config group
(``conf/explain/*.yaml``) instantiates it.

Sides that are not a multiple of the network's ``size_multiple`` are padded at the bottom and
right (reflection; the padding is excluded from the target and never modified by the curves),
and the maps are cropped back to the input afterwards (raw maps keep the tap cells that cover
it; shares are computed on those).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from changecam.atomic import atomic_open
from changecam.data.transforms import image_to_tensor
from changecam.explain.faithfulness import CURVE_DATES, CurveDate, Faithfulness, faithfulness
from changecam.explain.hirescam import (
    CAM_METHODS,
    INPUT_ONLY_METHODS,
    INPUT_TAPS,
    METHODS,
    Explanation,
    Method,
    choose_layer,
    explain_batch,
    per_date_layers,
    resolve_taps,
)
from changecam.explain.integrated import IntegratedGradientsSettings
from changecam.explain.layer_ig import LayerIGSettings
from changecam.explain.occlusion import OcclusionSettings
from changecam.explain.render import render_panel, save_panel
from changecam.explain.targets import Target, TargetKind
from changecam.models.inference import check_finite_logits
from changecam.models.protocol import size_multiple
from changecam.values import is_count


def _tuple(value: Sequence[Any] | str | None) -> tuple[Any, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def build_blocks(settings: Any, prefix: str = "explain", **blocks: type) -> None:
    """Build the nested settings blocks of a frozen dataclass that were given as mappings
    (from a config): ``build_blocks(self, ig=IntegratedGradientsSettings)``. A block's refusal
    names its key under ``prefix`` (the blocks name themselves under ``explain``)."""
    for name, cls in blocks.items():
        value = getattr(settings, name)
        if not isinstance(value, cls):
            try:
                built = cls(**value)
            except ValueError as err:
                if prefix == "explain":
                    raise
                raise ValueError(
                    str(err).replace(f"explain.{name}.", f"{prefix}.{name}.", 1)
                ) from None
            object.__setattr__(settings, name, built)


@dataclass(frozen=True)
class FaithfulnessSettings:
    """The date-swap deletion curves (the ``explain.faithfulness`` block).

    Args:
        enabled: compute the curves and the faithfulness gap.
        layer: per-date layer whose maps rank the pixels; ``None``: the deepest explained.
        steps: curve resolution (``steps + 1`` points, ``k = 0, 1/steps, ..., 1``).
        dates: curves computed (``both`` is always included: it gives the headline gap).
        random_repeats: random orders averaged for the baseline.
        insertion: also compute insertion curves (twice the cost).
        seed: seed of the random order.
        batch_size: counterfactual pairs per forward pass.
        max_batch_pixels: at most this many pixels per forward pass (caps ``batch_size`` for
            large images, at least one pair per pass); ``None``: no cap.
    """

    enabled: bool = True
    layer: str | None = None
    steps: int = 10
    dates: tuple[CurveDate, ...] = CURVE_DATES
    random_repeats: int = 1
    insertion: bool = False
    seed: int = 0
    batch_size: int = 32
    max_batch_pixels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dates", _tuple(self.dates))
        if self.steps < 1 or self.random_repeats < 1 or self.batch_size < 1:
            raise ValueError(
                f"explain.faithfulness.steps={self.steps}, random_repeats={self.random_repeats} "
                f"and batch_size={self.batch_size} must be >= 1 (explain.faithfulness.enabled=false "
                "turns the curves off)"
            )
        bad = [d for d in self.dates if d not in CURVE_DATES]
        if bad:
            raise ValueError(
                f"explain.faithfulness.dates has {bad}; expected some of {CURVE_DATES}"
            )
        cap = self.max_batch_pixels  # below 1 ran one counterfactual per pass, unannounced
        if cap is not None and not is_count(cap):
            raise ValueError(
                f"explain.faithfulness.max_batch_pixels={cap!r} must be >= 1 or null (no cap)"
            )

    def batch_size_for(self, pixels: int) -> int:
        """Pairs per forward pass for images of ``pixels`` pixels."""
        if self.max_batch_pixels is None:
            return self.batch_size
        return min(self.batch_size, max(1, self.max_batch_pixels // pixels))


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain and how (the ``explain`` config group; the callback's ``explain`` block).

    Args:
        enabled: explain at all (``predict.py`` and ``eval.py`` can skip it).
        taps: tap names or per-date layers (``input``, ``enc3``; one name may be a string);
            ``None``: every tap, the input included.
        methods: ``hirescam``, ``gradcam``, ``contrastive`` (date-contrastive HiResCAM, the same
            pass), ``integrated_gradients`` (maps at the input only: the taps must include
            ``input``), ``layer_ig`` (every per-date layer, ``2 × layers × steps`` passes more),
            ``occlusion`` (date-swap occlusion, maps at the input only, one forward per square
            and date).
        method: the method of the panel, the headline post share and the faithfulness curves
            (one of ``methods``): ``hirescam`` (the seed's) or ``contrastive`` (see README, "Does
            the model look at the right date?").
        target: ``predicted``, ``ground_truth``, ``all`` or ``roi``.
        threshold: probability threshold of the predicted-change target and of the panel.
        roi: for ``target=roi``, a 0/255 (or 0/1) mask image of the pairs' size.
        panel_layer: per-date layer drawn in the panel; ``None``: the deepest explained.
        max_pixels: larger pairs are not explained (memory grows with the image); ``None``:
            no limit.
        dpi: panel resolution.
        faithfulness: the deletion curves.
        ig: Integrated Gradients (steps, baseline), used when ``methods`` lists it.
        layer_ig: Layer Integrated Gradients from the other date, when ``methods`` lists it.
        occlusion: date-swap occlusion (square, stride), when ``methods`` lists it.
    """

    enabled: bool = True
    taps: tuple[str, ...] | str | None = None  # one name may be given as a string
    methods: tuple[Method, ...] | Method = CAM_METHODS
    method: Method = "hirescam"
    target: TargetKind = "predicted"
    threshold: float = 0.5
    roi: str | None = None
    panel_layer: str | None = None
    max_pixels: int | None = None
    dpi: int = 72
    faithfulness: FaithfulnessSettings = field(default_factory=FaithfulnessSettings)
    ig: IntegratedGradientsSettings = field(default_factory=IntegratedGradientsSettings)
    layer_ig: LayerIGSettings = field(default_factory=LayerIGSettings)
    occlusion: OcclusionSettings = field(default_factory=OcclusionSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", _tuple(self.taps))
        object.__setattr__(self, "methods", _tuple(self.methods))
        build_blocks(
            self,
            faithfulness=FaithfulnessSettings,
            ig=IntegratedGradientsSettings,
            layer_ig=LayerIGSettings,
            occlusion=OcclusionSettings,
        )
        Target(self.target, self.threshold)  # validates kind and threshold
        if not is_count(self.dpi):
            raise ValueError(
                f"explain.dpi={self.dpi!r} must be a whole number of dots per inch >= 1"
            )
        if self.max_pixels is not None and not is_count(self.max_pixels):
            raise ValueError(
                f"explain.max_pixels={self.max_pixels!r} must be a whole number of pixels >= 1 "
                "(null: no limit)"
            )
        if self.roi and self.target != "roi":
            raise ValueError(
                f"explain.roi={self.roi} is read only by explain.target=roi (this run's target "
                f"is {self.target}): set explain.target=roi, or drop explain.roi"
            )
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            close = {m: difflib.get_close_matches(m, METHODS, n=1) for m in bad}
            hints = "".join(f"; {m!r}: did you mean {c[0]!r}?" for m, c in close.items() if c)
            raise ValueError(
                f"explain.methods: unknown method(s) {bad}; known methods: {list(METHODS)}{hints}"
            )
        if self.method not in self.methods:
            raise ValueError(
                f"explain.methods={list(self.methods)} must include explain.method={self.method} "
                "(panels, shares and the faithfulness curves use it), e.g. explain.methods=["
                f"{','.join((self.method, *self.methods))}]"
            )
        input_only = [m for m in INPUT_ONLY_METHODS if m in self.methods]
        if input_only and self.taps is not None:
            if not any(t in ("input", *INPUT_TAPS) for t in self.taps):
                raise ValueError(
                    f"explain.methods has {' and '.join(input_only)}, whose maps are at the input "
                    f"only, but explain.taps={list(self.taps)} leaves the input out; add it, e.g. "
                    f"explain.taps=[input,{','.join(self.taps)}]"
                )

    def layers(self, model: nn.Module) -> list[str]:
        """The per-date layers explained on ``model``; errors name the key asking for a missing one.

        Raises:
            TapError: unknown tap names.
            ValueError: no per-date layer among the taps, or a layer key that names none of them.
        """
        layers = per_date_layers(resolve_taps(model, self.taps))
        if not layers:
            raise ValueError(
                f"explain.taps={list(self.taps or [])} has no per-date layer (enc1, enc2 ...); "
                "panels and shares need one"
            )
        drawn = self.method_layers(layers)  # the panel and the curves use explain.method's maps
        which = f" ({self.method})" if self.method in INPUT_ONLY_METHODS else ""
        choose_layer(drawn, self.panel_layer, f"explain.panel_layer{which}")
        if self.faithfulness.enabled:
            choose_layer(drawn, self.faithfulness.layer, f"explain.faithfulness.layer{which}")
        return layers

    def method_layers(self, layers: Sequence[str]) -> list[str]:
        """The layers among ``layers`` where ``explain.method`` has maps (the input only for
        ``integrated_gradients`` and ``occlusion``)."""
        if self.method in INPUT_ONLY_METHODS:
            return [layer for layer in layers if layer == "input"]
        return list(layers)


@dataclass(frozen=True)
class Explained:
    """The runner's result for a batch: maps and curves on the CPU, cropped to the input size."""

    explanation: Explanation
    faithfulness: Faithfulness | None
    padded_size: tuple[int, int] | None  # the size explained, where padding was needed


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad the bottom/right of N×C×H×W ``x`` to multiples of ``multiple`` (reflection where the
    image is large enough, else edge replication)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _pad_mask(
    mask: Tensor | None, what: str, image: tuple[int, int], size: tuple[int, int]
) -> Tensor | None:
    """A B×1×h×w (or h×w) {0,1} mask of the ``image``'s size placed top-left in zeros of
    ``size``; a ``what`` (label, region of interest) of another size is refused."""
    if mask is None:
        return None
    h, w = mask.shape[-2:]
    if (h, w) != image:
        raise ValueError(
            f"{what} has shape {tuple(mask.shape)}; expected {image[0]} x {image[1]} pixels, "
            "the size of the pair"
        )
    mask = mask.float()
    mask = mask[None, None] if mask.ndim == 2 else mask
    out = mask.new_zeros(*mask.shape[:-2], *size)
    out[..., :h, :w] = (mask > 0.5).float()
    return out


def explain_tensors(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    settings: ExplainSettings,
    *,
    label: Tensor | None = None,
    roi: Tensor | None = None,
    valid: Tensor | None = None,
    upsample: bool = True,
) -> Explained:
    """Explain a batch of B×C×H×W float pairs of any size: the steps every command shares.

    Args:
        model: the network (run in eval mode; its modes are restored).
        pre: first-date images on the model's device.
        post: second-date images of the same shape.
        settings: what to explain (``enabled`` is the caller's business).
        label: B×1×H×W {0,1} ground truth (needed for ``target=ground_truth``).
        roi: H×W (or B×1×H×W) region of interest (needed for ``target=roi``).
        valid: B×H×W pixels that may be in the target (e.g. not nodata); default all.
        upsample: also return the maps at input resolution (panels and curves need them).
    """
    height, width = pre.shape[-2:]
    multiple = size_multiple(model)
    x_pre, x_post = pad_to_multiple(pre, multiple), pad_to_multiple(post, multiple)
    padded = tuple(x_pre.shape[-2:])
    given, valid = valid, None
    if padded != (height, width) or given is not None:  # the padding is no part of the target
        valid = torch.zeros(len(pre), *padded, dtype=torch.bool, device=pre.device)
        valid[:, :height, :width] = True if given is None else given.bool()
    exp = explain_batch(
        model,
        x_pre,
        x_post,
        taps=settings.taps,
        target=Target(settings.target, settings.threshold),
        methods=settings.methods,
        label=_pad_mask(label, "label", (height, width), padded),
        roi=_pad_mask(roi, "region of interest", (height, width), padded),
        valid=valid,
        upsample=upsample,  # the curves upsample their own layer when the maps are not
        ig=settings.ig,
        layer_ig=settings.layer_ig,
        occlusion=settings.occlusion,
    )
    faith = None
    if settings.faithfulness.enabled:
        faith = _faithfulness(
            model, x_pre, x_post, exp, settings.faithfulness, valid, settings.method
        )
    return Explained(
        explanation=exp.crop(height, width).to("cpu"),
        faithfulness=faith,
        padded_size=padded if padded != (height, width) else None,
    )


def _faithfulness(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    explanation: Explanation,
    settings: FaithfulnessSettings,
    valid: Tensor | None,
    method: Method = "hirescam",
) -> Faithfulness:
    """The deletion curves of the settings on the (padded) inputs."""
    return faithfulness(
        model,
        pre,
        post,
        explanation,
        layer=settings.layer,
        method=method,
        dates=tuple(dict.fromkeys(("both", *settings.dates))),
        steps=settings.steps,
        insertion=settings.insertion,
        random_repeats=settings.random_repeats,
        seed=settings.seed,
        valid=valid,
        batch_size=settings.batch_size_for(pre.shape[-2] * pre.shape[-1]),
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
        if exp.ig:
            out["integrated_gradients"] = {k: _num(v[0]) for k, v in exp.ig.items()}
        faith = self.faithfulness
        out["faithfulness_gap"] = _num(faith.gap("both")[0]) if faith else None
        if faith is not None:
            out["faithfulness"] = _faithfulness_summary(faith)
        return out

    def save(self, run_dir: str | Path, maps: bool = True) -> dict[str, str]:
        """Write ``panels/<name>.png`` and (if ``maps``) ``maps/<name>.npz``; return their paths."""
        run_dir = Path(run_dir)
        written = {"panel": str(run_dir / "panels" / f"{self.name}.png")}
        save_panel(self.panel, written["panel"])
        if maps:
            written["maps"] = str(run_dir / "maps" / f"{self.name}.npz")
            try:
                save_maps(self.explanation, written["maps"])
            except BaseException:  # the pair failed: no panel of it stays
                Path(written["panel"]).unlink(missing_ok=True)
                raise
        return written


def _faithfulness_summary(faith: Faithfulness) -> dict[str, Any]:
    """The curves and gaps of one pair, JSON-ready."""
    dates = list(faith.curves["deletion"])
    return {
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
            kind: {d: {o: [_num(v) for v in c[0]] for o, c in per.items()} for d, per in dd.items()}
            for kind, dd in faith.curves.items()
        },
    }


def _num(value: Tensor | float) -> float | None:
    """A float for JSON; NaN (undefined) becomes ``None``."""
    value = float(value)
    return None if math.isnan(value) else value


def save_maps(explanation: Explanation, path: str | Path) -> None:
    """Save one sample's raw signed maps (``<method>/<tap>``), logits, target mask and score
    (atomically: a crash never leaves a half-written ``.npz``)."""
    exp = explanation.select(0)
    arrays = {f"{m}/{t}": v[0].numpy() for m, d in exp.raw.items() for t, v in d.items()}
    arrays["logits"] = exp.logits[0, 0].numpy()
    arrays["target_mask"] = exp.mask[0, 0].numpy().astype(np.uint8)
    arrays["target_score"] = exp.score[0].numpy()
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


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
    probability: np.ndarray | None = None,
) -> PairExplanation:
    """Explain one uint8 pair end to end: :func:`explain_tensors`, then the panel.

    Args:
        model: the network (eval mode is used; its mode is restored).
        pre: uint8 H×W×3 first-date image (as from :func:`changecam.data.io.read_image`).
        post: uint8 H×W×3 second-date image of the same size.
        label: {0,1} H×W ground truth (drawn in the panel; needed for ``target=ground_truth``).
        roi: {0,1} H×W region of interest (needed for ``target=roi``).
        name: the pair's name (panel title, file names).
        settings: what to explain; default :class:`ExplainSettings`.
        device: where to run; default the model's device.
        probability: H×W change probability the panel draws as the prediction (predict.py's
            sliding window); default the whole image's own.

    Raises:
        ValueError: images of different sizes or channel counts, masks that do not fit, or
            logits that are not finite (an explanation of NaN would show no change).
    """
    settings = settings or ExplainSettings()
    if pre.shape != post.shape:
        raise ValueError(
            f"pair {name!r}: pre is {pre.shape[:2]} but post is {post.shape[:2]}; both dates must have the same size"
        )
    size = pre.shape[:2]
    for what, m in (("label", label), ("roi", roi)):
        if m is not None and m.shape != size:
            raise ValueError(f"pair {name!r}: {what} is {m.shape} but the images are {size}")
    if device is None:
        device = next(model.parameters()).device

    def as_tensor(m: np.ndarray | None) -> Tensor | None:
        return None if m is None else torch.from_numpy(np.asarray(m) > 0).float().to(device)

    result = explain_tensors(
        model,
        image_to_tensor(pre)[None].to(device),
        image_to_tensor(post)[None].to(device),
        settings,
        label=as_tensor(label),
        roi=as_tensor(roi),
    )
    check_finite_logits(result.explanation.logits, f"pair {name!r}")
    panel = render_panel(
        pre,
        post,
        result.explanation,
        label=label,
        layer=settings.panel_layer,
        method=settings.method,
        faithfulness=result.faithfulness,
        threshold=settings.threshold,
        title=name,
        probability=probability,
        dpi=settings.dpi,
        target=settings.target,
    )
    return PairExplanation(
        name=name,
        explanation=result.explanation,
        faithfulness=result.faithfulness,
        panel=panel,
        padded_size=result.padded_size,
    )


def with_threshold(settings: ExplainSettings, threshold: float) -> ExplainSettings:
    """The settings with the command's decision threshold (one threshold per run)."""
    return replace(settings, threshold=threshold)


__all__ = [
    "ExplainSettings",
    "Explained",
    "FaithfulnessSettings",
    "PairExplanation",
    "explain_pair",
    "explain_tensors",
    "pad_to_multiple",
    "save_maps",
    "with_threshold",
]

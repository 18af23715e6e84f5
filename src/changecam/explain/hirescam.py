"""HiResCAM and Grad-CAM at every tap and for both dates, from one forward and one backward pass.

For a tapped activation ``A`` (C×h×w) and the target score ``S`` (see
:mod:`changecam.explain.targets`):

* HiResCAM: ``Σ_c ∂S/∂A_c ⊙ A_c`` — signed, h×w, in units of logit contribution;
* Grad-CAM: ``Σ_c mean_hw(∂S/∂A_c) · A_c`` — signed as well (no ReLU), as in captum's
  ``LayerGradCam(relu_attributions=False)``;
* date-contrastive HiResCAM (``contrastive``): ``Σ_c ∂S/∂A^post_c ⊙ (A^post_c − A^pre_c)`` for
  the post date and the mirror for the pre date — HiResCAM with the other date's activation at
  the same layer as the baseline instead of zero, from the same pass, at every per-date layer
  (taps that exist for one date only have no contrastive map);
* Layer Integrated Gradients from the other date (``layer_ig``,
  :mod:`changecam.explain.layer_ig`): the exact path integral of which ``contrastive`` is the
  first-order variant; ``2 × layers × steps`` more passes.

Forward hooks on the model's :class:`~changecam.models.taps.Tap` modules record every requested
activation during one forward; ``torch.autograd.grad`` then returns ``∂S/∂A`` for all of them in
one backward, without touching parameter gradients. A shared encoder runs once per date, but each
date's output passes through its own tap (``pre/encK``, ``post/encK``), so each map belongs to
exactly one date.

Every model also has the per-date layer ``input`` (taps ``pre/input``, ``post/input``): its
activation is the input image of that date, so HiResCAM there is gradient × input summed over
the bands, from the same forward and backward. Integrated Gradients
(:mod:`changecam.explain.integrated`, through captum) has maps at the input taps only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from changecam.explain.integrated import IntegratedGradientsSettings, integrated_gradients
from changecam.explain.layer_ig import LayerIGSettings, layer_integrated_gradients
from changecam.explain.occlusion import OcclusionSettings, date_swap_occlusion
from changecam.explain.targets import Target, TargetKind, is_empty, target_mask, target_score
from changecam.models.taps import Tap, TapError, find_taps, tap_paths

Method = Literal[
    "hirescam", "gradcam", "contrastive", "integrated_gradients", "layer_ig", "occlusion"
]
METHODS: tuple[Method, ...] = get_args(Method)
# the methods computed by default: both come from the one forward and backward at every tap
CAM_METHODS: tuple[Method, ...] = ("hirescam", "gradcam")
# the methods that come from the one forward and backward (no extra pass)
ONE_PASS_METHODS: tuple[Method, ...] = ("hirescam", "gradcam", "contrastive")
# methods with maps at the input taps only
INPUT_ONLY_METHODS: tuple[Method, ...] = ("integrated_gradients", "occlusion")
Date = Literal["pre", "post"]
DATES: tuple[Date, ...] = get_args(Date)
INPUT_LAYER = "input"
INPUT_TAPS: tuple[str, ...] = tuple(f"{d}/{INPUT_LAYER}" for d in DATES)


NO_TAPS_HELP = (
    "explanations hook named identity taps: wrap each activation to explain in a "
    "changecam.models.taps.Tap, e.g. `self.tap_pre1 = Tap('pre/enc1')` in __init__ and "
    "`x = self.tap_pre1(x)` in forward (one Tap per date for a shared encoder); "
    "see changecam.models.SiameseUNet; a model changecam did not write can declare its layers "
    "with changecam.models.LayerTaps (model=external); the input layer works on every model"
)


def input_maps_left_out(methods: Iterable[str], taps: Iterable[str]) -> list[str]:
    """The ``methods`` with maps at the input only (:data:`INPUT_ONLY_METHODS`) that ``taps``
    (``input``, or both dates' input taps) leave without any."""
    names = set(taps)
    if INPUT_LAYER in names or all(t in names for t in INPUT_TAPS):
        return []
    wanted = set(methods)
    return [m for m in INPUT_ONLY_METHODS if m in wanted]


def resolve_taps(
    model: nn.Module, taps: Sequence[str] | None = None, shared: bool = False
) -> dict[str, Tap | None]:
    """The requested taps of ``model``, in forward order.

    The input taps ``pre/input`` and ``post/input`` come first and have no module (``None``):
    their activations are the inputs themselves, so every model has them.

    Args:
        model: a network (or a LightningModule wrapping one), usually holding :class:`Tap` modules.
        taps: public tap names; a per-date layer name such as ``"enc3"`` (or ``"input"``) stands
            for both ``pre/enc3`` and ``post/enc3``. ``None`` means every tap, the input included.

        shared: list a name that two different taps share too (only to choose a layer among
            them: :func:`explain_batch` refuses to explain such a name).

    Raises:
        TapError: a name is unknown (the message lists the available ones), a Tap of the model
            uses a reserved input tap name, or (without ``shared``) a resolved name is shared.
    """
    modules = find_taps(model)
    reserved = [n for n in INPUT_TAPS if n in modules]
    if reserved:
        raise TapError(
            f"{type(model).__name__} has Tap(s) named {reserved}: these names are reserved for "
            "the model's inputs (every model has them); rename the Tap"
        )
    found: dict[str, Tap | None] = {**dict.fromkeys(INPUT_TAPS), **modules}
    if taps is None:
        if not shared:
            check_single_taps(model, found)
        return found
    if isinstance(taps, str):
        taps = [taps]
    wanted: set[str] = set()
    unknown = []
    for name in taps:
        if name in found:
            wanted.add(name)
        elif all(f"{d}/{name}" in found for d in DATES):
            wanted.update(f"{d}/{name}" for d in DATES)
        else:
            unknown.append(name)
    if unknown:
        help_text = (
            "" if modules else f"; {type(model).__name__} has no taps but the input: {NO_TAPS_HELP}"
        )
        raise TapError(
            f"unknown tap name(s) {unknown} for {type(model).__name__}; available: {list(found)}"
            f" (or a per-date layer: {per_date_layers(found)}){help_text}"
        )
    if not wanted:
        raise TapError(f"no taps requested; available: {list(found)}")
    if not shared:
        check_single_taps(model, wanted)
    return {n: t for n, t in found.items() if n in wanted}


def check_single_taps(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse to explain a tap name that two different :class:`Tap` modules of ``model`` share:
    one of them would be explained under the other's name, or not at all.

    Raises:
        TapError: naming each shared name and where its taps are.
    """
    paths = tap_paths(model)
    shared = {n: paths[n] for n in names if len(paths.get(n, ())) > 1}
    if shared:
        raise TapError(
            "two different Tap modules share a name: "
            + "; ".join(f"{name!r} at {', '.join(where)}" for name, where in shared.items())
            + "; give each its own name, or explain other taps (explain.taps=[...])"
        )


def per_date_layers(tap_names: Sequence[str] | dict[str, object]) -> list[str]:
    """Layers tapped for both dates (``"enc1"`` ... for ``pre/enc1``, ``post/enc1``), in order."""
    names = list(tap_names)
    layers = [n.split("/", 1)[1] for n in names if n.startswith("pre/")]
    return [layer for layer in layers if f"post/{layer}" in names]


def choose_layer(layers: Sequence[str], requested: str | None = None, key: str = "layer") -> str:
    """The per-date layer to use: ``requested`` if it is among ``layers``, and ``None`` means the
    deepest one (the last in forward order). The one place that picks the default layer.

    Args:
        layers: the explained per-date layers, in forward order (:func:`per_date_layers`).
        requested: a layer name, or ``None`` for the deepest.
        key: the config key or argument that asked, named in the error.

    Raises:
        ValueError: ``requested`` is not among ``layers``, or there are no layers.
    """
    if requested is None:
        if not layers:
            raise ValueError(f"{key}: no layer is explained for both dates")
        return layers[-1]
    if requested not in layers:
        raise ValueError(
            f"{key}={requested!r} is not an explained per-date layer (a layer explained for "
            f"both dates); available: {list(layers)}"
        )
    return requested


@contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run a block with ``model`` (optionally) in eval mode; restore every submodule's mode after.

    Each submodule's own ``training`` flag is restored, so a model that mixes modes (e.g. a
    frozen BatchNorm inside a training model) comes back exactly as it was, also after an error.
    Outside eval mode the buffers are restored too: a BatchNorm in training mode would fold the
    explanation's inputs (counterfactuals, interpolations) into its running statistics.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [] if eval_mode else [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


@dataclass(frozen=True)
class Explanation:
    """Maps of one batch; every tensor is detached, float32, on the model's device.

    Attributes:
        taps: explained tap names, in forward order (``pre/input``, ``post/input`` first).
        methods: the methods computed (``hirescam``, ``gradcam``, ``integrated_gradients``); a
            method may have maps at some taps only (``integrated_gradients``: the input taps).
        logits: model output, B×1×H×W.
        mask: target mask ``M``, B×1×H×W in {0, 1}.
        score: target score ``S = Σ M ⊙ logits``, B.
        raw: ``raw[method][tap]``: signed map at tap resolution, B×h×w, in logit contribution
            per tap cell (these are the definitions; shares use them).
        upsampled: ``upsampled[method][tap]``: the raw map bilinearly resized to the input,
            B×H×W, divided by the area ratio ``(H·W)/(h·w)`` so it reads as logit contribution
            per input pixel (its sum approximates the raw map's sum). Empty if not requested.
        ig: for ``integrated_gradients``: ``baseline_score`` ``S(baseline)`` and ``delta``
            (captum's convergence delta ``Σ attributions − (S − S(baseline))``), B each; for
            ``layer_ig``: ``layer_ig_delta/<tap>`` (``Σ map − (S − S(swapped))``); after
            :meth:`crop`, the deltas of the kept maps; empty otherwise.
    """

    taps: tuple[str, ...]
    methods: tuple[Method, ...]
    logits: Tensor
    mask: Tensor
    score: Tensor
    raw: dict[str, dict[str, Tensor]]
    upsampled: dict[str, dict[str, Tensor]]
    ig: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the explained inputs."""
        return tuple(self.logits.shape[-2:])  # type: ignore[return-value]

    @property
    def empty(self) -> Tensor:
        """Per sample: the target selected no pixel (e.g. no change predicted); maps are zero."""
        return is_empty(self.mask)

    @property
    def layers(self) -> list[str]:
        """Layers explained for both dates (``input``, ``enc1``, ``enc2`` ...)."""
        return per_date_layers(self.taps)

    def layers_of(self, method: Method = "hirescam") -> list[str]:
        """The per-date layers that have maps of ``method`` (``["input"]`` for Integrated
        Gradients), in forward order."""
        return per_date_layers(list(self.raw.get(method, {})))

    def map(self, tap: str, method: Method = "hirescam", upsampled: bool = False) -> Tensor:
        """One map: B×h×w (raw) or B×H×W (``upsampled``).

        Raises:
            KeyError: ``method`` was not computed, or has no map at ``tap`` (the message lists
                the taps it has).
        """
        maps = self.upsampled if upsampled else self.raw
        what = "upsampled " if upsampled else ""
        if method not in maps:
            raise KeyError(
                f"no {what}{method} maps: methods computed: {list(maps)}"
                + ("" if upsampled or maps else " (upsample=False)")
            )
        if tap not in maps[method]:
            raise KeyError(
                f"no {what}{method} map for tap {tap!r}; {method} has maps at "
                f"{list(maps[method])} (explained taps: {list(self.taps)})"
            )
        return maps[method][tap]

    def positive_mass(self, tap: str, method: Method = "hirescam") -> Tensor:
        """``P = Σ ReLU(map)`` on the raw map, per sample (B)."""
        return self.map(tap, method).clamp(min=0).flatten(1).sum(1)

    def post_share(self, layer: str, method: Method = "hirescam") -> Tensor:
        """``P_post / (P_pre + P_post)`` of one per-date layer (e.g. ``"enc3"``), per sample.

        NaN where both masses are 0 (undefined: e.g. an empty target).
        """
        pre = self.positive_mass(f"pre/{layer}", method)
        post = self.positive_mass(f"post/{layer}", method)
        total = pre + post
        return torch.where(
            total > 0, post / total.clamp(min=torch.finfo(total.dtype).tiny), torch.nan
        )

    def post_shares(self, method: Method = "hirescam") -> dict[str, Tensor]:
        """:meth:`post_share` of every per-date layer with maps of ``method``: ``{"enc1": B, ...}``."""
        return {layer: self.post_share(layer, method) for layer in self.layers_of(method)}

    def select(self, index: int | slice | Tensor) -> Explanation:
        """The explanation of some samples (an ``int`` keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._apply(lambda t: t[index])

    def to(self, device: torch.device | str) -> Explanation:
        """All tensors moved to ``device``."""
        return self._apply(lambda t: t.to(device))

    def crop(self, height: int, width: int) -> Explanation:
        """Keep the top-left ``height × width`` input pixels (undo bottom/right padding).

        Raw maps keep the tap cells that cover the kept pixels (``ceil(h·height/H)`` rows ...);
        ``score`` is unchanged (exclude the padding from the target with ``valid`` when explaining).
        The completeness deltas of ``ig`` then describe the kept maps: the attribution the
        padding held, which the maps no longer sum, moves into them.
        """
        full_h, full_w = self.input_size
        if not (0 < height <= full_h and 0 < width <= full_w):
            raise ValueError(f"cannot crop {self.input_size} to {(height, width)}")

        def crop_raw(t: Tensor) -> Tensor:
            h, w = t.shape[-2:]
            return t[..., : -(-h * height // full_h), : -(-w * width // full_w)]

        raw = {m: {k: crop_raw(v) for k, v in d.items()} for m, d in self.raw.items()}

        def dropped(method: str, taps: Sequence[str]) -> Tensor:
            return sum(
                self.raw[method][t].flatten(1).sum(1) - raw[method][t].flatten(1).sum(1)
                for t in taps
            )

        ig = dict(self.ig)
        for key in ig:
            if key == "delta":
                ig[key] = ig[key] - dropped("integrated_gradients", INPUT_TAPS)
            elif key.startswith("layer_ig_delta/"):
                ig[key] = ig[key] - dropped("layer_ig", [key.removeprefix("layer_ig_delta/")])
        return replace(
            self,
            logits=self.logits[..., :height, :width],
            mask=self.mask[..., :height, :width],
            score=self.score,
            raw=raw,
            upsampled={
                m: {k: v[..., :height, :width] for k, v in d.items()}
                for m, d in self.upsampled.items()
            },
            ig=ig,
        )

    def _apply(self, fn) -> Explanation:
        return replace(
            self,
            logits=fn(self.logits),
            mask=fn(self.mask),
            score=fn(self.score),
            raw={m: {k: fn(v) for k, v in d.items()} for m, d in self.raw.items()},
            upsampled={m: {k: fn(v) for k, v in d.items()} for m, d in self.upsampled.items()},
            ig={k: fn(v) for k, v in self.ig.items()},
        )


def cam_maps(
    activation: Tensor, gradient: Tensor | None, methods: Sequence[Method]
) -> dict[str, Tensor]:
    """HiResCAM / Grad-CAM maps (B×h×w, float32) of one activation and its gradient."""
    a = activation.detach().float()
    g = torch.zeros_like(a) if gradient is None else gradient.detach().float()
    out: dict[str, Tensor] = {}
    if "hirescam" in methods:
        out["hirescam"] = (g * a).sum(1)
    if "gradcam" in methods:
        out["gradcam"] = torch.einsum("bc,bchw->bhw", g.mean((2, 3)), a)
    return out


def contrastive_maps(
    activations: dict[str, Tensor], gradients: dict[str, Tensor | None]
) -> dict[str, Tensor]:
    """Date-contrastive HiResCAM at every per-date layer: ``Σ_c ∂S/∂A^d_c ⊙ (A^d_c − A^o_c)``
    for date ``d`` and the other date ``o`` (B×h×w each, in forward order of ``activations``)."""
    out: dict[str, Tensor] = {}
    layers = per_date_layers(activations)
    for name in activations:
        date, _, layer = name.partition("/")
        if layer not in layers:
            continue
        own = activations[name].detach().float()
        other = activations[f"{'post' if date == 'pre' else 'pre'}/{layer}"].detach().float()
        grad = gradients[name]
        g = torch.zeros_like(own) if grad is None else grad.detach().float()
        out[name] = (g * (own - other)).sum(1)
    return out


def upsample_maps(
    raw: dict[str, dict[str, Tensor]], size: tuple[int, int]
) -> dict[str, dict[str, Tensor]]:
    """Resize every raw map to ``size`` (bilinear), scaled to logit contribution per input pixel.

    Maps of the same resolution are resized together, one interpolation per resolution.
    """
    keys = [(m, t) for m, d in raw.items() for t in d]
    groups: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for key in keys:
        groups.setdefault(tuple(raw[key[0]][key[1]].shape[-2:]), []).append(key)
    out: dict[str, dict[str, Tensor]] = {m: {} for m in raw}
    for (h, w), group in groups.items():
        stack = torch.stack([raw[m][t] for m, t in group], dim=1)
        if (h, w) != tuple(size):
            area = (size[0] * size[1]) / (h * w)
            stack = F.interpolate(stack, size=size, mode="bilinear", align_corners=False) / area
        for i, (m, t) in enumerate(group):
            out[m][t] = stack[:, i]
    return {m: {t: out[m][t] for t in raw[m]} for m in raw}


def explain_batch(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    *,
    taps: Sequence[str] | None = None,
    target: Target | TargetKind = "predicted",
    methods: Sequence[Method] = CAM_METHODS,
    label: Tensor | None = None,
    roi: Tensor | None = None,
    valid: Tensor | None = None,
    upsample: bool = True,
    eval_mode: bool = True,
    ig: IntegratedGradientsSettings | None = None,
    layer_ig: LayerIGSettings | None = None,
    occlusion: OcclusionSettings | None = None,
) -> Explanation:
    """Explain a batch: one forward and one backward for all taps, both dates and both CAMs.

    Safe inside a Lightning validation/test step (it leaves ``torch.inference_mode`` locally and
    works on clones of the inputs). It never changes ``requires_grad`` flags nor accumulates
    parameter gradients, and restores every submodule's train/eval mode; hooks are removed
    even when the forward fails.

    Args:
        model: ``model(pre, post) -> logits`` (B×1×H×W), with :class:`Tap` modules for layers
            beyond the input.
        pre: B×C×H×W images of the first date (same shape as ``post``).
        post: B×C×H×W images of the second date.
        taps: tap names (or per-date layers like ``"enc3"``, ``"input"``); ``None``: every tap.
        target: which pixels' logits form ``S`` (see :mod:`changecam.explain.targets`).
        methods: any of ``hirescam``, ``gradcam`` (every tap), ``contrastive`` (every per-date
            layer; the same pass), ``integrated_gradients`` (the input taps only; ``steps`` more
            forward and backward passes, see ``ig``) and ``layer_ig`` (every per-date layer;
            ``2 × layers × steps`` more passes, see ``layer_ig``) and ``occlusion`` (date-swap
            occlusion, the input taps only; one forward per square and date, see
            ``occlusion``).
        label: ground-truth mask for ``target="ground_truth"``.
        roi: region of interest for ``target="roi"``.
        valid: pixels allowed in the target (e.g. excluding padding); default all.
        upsample: also return the maps resized to the input size.
        eval_mode: run the model in eval mode (BatchNorm running statistics, no dropout).
        ig: Integrated Gradients settings (steps, baseline); default
            :class:`IntegratedGradientsSettings`.
        layer_ig: Layer Integrated Gradients settings; default :class:`LayerIGSettings`.
        occlusion: date-swap occlusion settings; default :class:`OcclusionSettings`.

    Raises:
        TapError: unknown tap names, or a tap that did not run exactly once.
        ValueError: mismatched ``pre``/``post`` shapes, unknown methods, a target that lacks
            its ``label``/``roi``, or ``integrated_gradients`` or ``occlusion`` without the input
            among the taps.
    """
    methods = _checked_methods(methods)
    if pre.shape != post.shape or pre.ndim != 4:
        raise ValueError(
            f"pre and post must both be B×C×H×W of the same shape, got {tuple(pre.shape)} and "
            f"{tuple(post.shape)}"
        )
    modules = resolve_taps(model, taps)
    cams = tuple(m for m in methods if m in ONE_PASS_METHODS)
    with_ig = "integrated_gradients" in methods
    with_lig = "layer_ig" in methods
    with_occlusion = "occlusion" in methods
    left_out = input_maps_left_out(methods, modules)
    if left_out:
        raise ValueError(
            f"{left_out[0]} has maps at the input only, but the taps {list(modules)} "
            "leave it out: add `input` to the taps (e.g. taps=[input, enc4])"
        )
    if (with_lig or "contrastive" in methods) and not per_date_layers(modules):
        raise ValueError(
            f"{'layer_ig' if with_lig else 'contrastive'} needs a layer tapped for both dates; "
            f"the taps {list(modules)} have none"
        )
    if not cams and not with_lig:  # no hooks and no backward, the taps are the input's
        modules = dict.fromkeys(INPUT_TAPS)
    with preserved_state(model, eval_mode), torch.inference_mode(False), torch.enable_grad():
        logits, activations = _recorded_forward(model, modules, pre, post)
        mask = target_mask(logits, target, label=label, roi=roi, valid=valid)
        score = target_score(logits, mask)
        if not score.requires_grad:
            raise ValueError(f"the output of {type(model).__name__} does not depend on its inputs")
        no_grad = [name for name, a in activations.items() if cams and not a.requires_grad]
        if no_grad:
            raise ValueError(
                f"taps {no_grad}: their outputs do not require grad (computed under "
                f"torch.no_grad() in {type(model).__name__}'s forward, e.g. a frozen backbone), "
                "so the change score has no gradient there: run that part with grad enabled "
                "(parameters with requires_grad=False stay frozen) or tap a layer after it"
            )
        grads = (
            torch.autograd.grad(
                score.sum(), list(activations.values()), allow_unused=True, retain_graph=with_lig
            )
            if cams
            else (None,) * len(activations)
        )
        ig_maps, ig_info = {}, {}
        if with_ig:
            ig_maps, ig_info = integrated_gradients(
                model, pre, post, mask.detach(), score.detach(), ig or IntegratedGradientsSettings()
            )
        lig_maps: dict[str, Tensor] = {}
        if with_lig:
            inputs = dict(zip(INPUT_TAPS, (pre, post), strict=True))
            lig_maps, lig_delta = layer_integrated_gradients(
                model,
                pre.detach(),
                post.detach(),
                mask.detach(),
                score.detach(),
                modules,
                {n: inputs.get(n, a) for n, a in activations.items()},
                per_date_layers(modules),
                layer_ig or LayerIGSettings(),
            )
            ig_info = {**ig_info, **{f"layer_ig_delta/{t}": d for t, d in lig_delta.items()}}
        occlusion_maps = (
            date_swap_occlusion(model, pre, post, mask.detach(), occlusion or OcclusionSettings())
            if with_occlusion
            else ()
        )

    with torch.no_grad():
        raw: dict[str, dict[str, Tensor]] = {m: {} for m in methods}
        for (name, act), grad in zip(activations.items(), grads, strict=True):
            for method, cam in cam_maps(act, grad, cams).items():
                raw[method][name] = cam
        if "contrastive" in methods:
            raw["contrastive"] = contrastive_maps(
                activations, dict(zip(activations, grads, strict=True))
            )
        if with_lig:
            raw["layer_ig"] = lig_maps
        if with_ig:
            raw["integrated_gradients"] = dict(zip(INPUT_TAPS, ig_maps, strict=True))
        if with_occlusion:
            raw["occlusion"] = dict(zip(INPUT_TAPS, occlusion_maps, strict=True))
        return Explanation(
            taps=tuple(activations),
            methods=methods,
            logits=logits.detach().float(),
            mask=mask.float(),
            score=score.detach().float(),
            raw=raw,
            upsampled=upsample_maps(raw, tuple(logits.shape[-2:])) if upsample else {},
            ig=ig_info,
        )


def _checked_methods(methods: Sequence[Method]) -> tuple[Method, ...]:
    """The requested methods without repeats, or a :class:`ValueError` for unknown ones."""
    methods = tuple(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(
            f"unknown explanation method(s) {bad or methods}; expected some of {METHODS}"
        )
    return methods


def _recorded_forward(
    model: nn.Module, modules: dict[str, Tap | None], pre: Tensor, post: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward on clones of the inputs (grad-enabled), recording every tap's output once.

    The input taps (``None`` in ``modules``) record the grad-enabled input clones themselves.

    Raises:
        TapError: a tap ran more or less than once (e.g. one Tap for a module called twice).
    """
    hooked = {n: t for n, t in modules.items() if t is not None}
    seen: dict[str, list[Tensor]] = {n: [] for n in hooked}
    versions: dict[str, int] = {}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            seen[name].append(output)
            versions[name] = output._version

        return hook

    x_pre = pre.detach().clone().requires_grad_(True)
    x_post = post.detach().clone().requires_grad_(True)
    handles = [tap.register_forward_hook(recorder(n)) for n, tap in hooked.items()]
    try:
        logits = model(x_pre, x_post)
    finally:
        for handle in handles:
            handle.remove()
    wrong = {n: len(v) for n, v in seen.items() if len(v) != 1}
    if wrong:
        raise TapError(
            f"each tap must run exactly once per forward; runs per tap: {wrong}. "
            "A module called twice (e.g. a shared encoder) needs one Tap per call."
        )
    # An in-place op after the tap (`out += identity`, ReLU(inplace=True)) would leave the
    # recorded activation, and its gradient, those of a later layer: silently wrong maps.
    # (A view shares its base's version counter: an in-place op on another part of the base
    # moves it too, and rebuilds the view's gradient function, whose gradient then misses the
    # view's uses before the op; so a moved counter is refused either way.)
    changed = sorted(n for n, v in seen.items() if v[0]._version != versions[n])
    if changed:
        raise TapError(
            f"the output of tap(s) {changed} was modified in place later in the forward, or is "
            "a view of a tensor that was (e.g. `out += identity`, ReLU(inplace=True), an "
            "in-place op on another slice of the same tensor), so the recorded activation or "
            "its gradient is another layer's; pass a copy on after the tap "
            "(`x = tap(x).clone()`) or make that op out of place"
        )
    inputs = dict(zip(INPUT_TAPS, (x_pre, x_post), strict=True))
    return logits, {n: inputs[n] if n in inputs else seen[n][0] for n in modules}

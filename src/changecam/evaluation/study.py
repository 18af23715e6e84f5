"""The attribution study of one model: every method and per-date layer against known answers.

For each image of a split, each labelled changed object (a connected component, dilated by
``dilation`` px) is explained on its own (target ``S`` = the logits summed inside the dilated
object; the objects of an image are explained together as one batch), and each method's maps
are scored by :mod:`changecam.evaluation.attribution`: date accuracy (against the generator's
change types), agreement with the causal date (the date whose date-swap inside the object
changes ``S`` more; also weighed by how decisive that date is, the causal margin), the energy
pointing game and the post share of the object's window. The same batch gives the date-swap deletion curves
(:func:`changecam.explain.faithfulness`, ``both`` dates) and their gap against random order.
The cascading parameter-randomisation check (:mod:`changecam.evaluation.randomisation`) runs on
the first ``randomisation_images`` images.

``random`` is a map of uniform noise at each layer's resolution: the baseline of every metric
(date accuracy 0.5, pointing = the object's share of the image, gap 0, Spearman 0).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from changecam.data.transforms import image_to_tensor
from changecam.evaluation.attribution import (
    ChangedObject,
    agreement,
    attributed_post,
    bootstrap,
    causal_margin,
    causal_post,
    changed_objects,
    pointing,
    spearman,
    swap_regions,
)
from changecam.evaluation.randomisation import cascade_order, cascade_points, randomised
from changecam.explain.faithfulness import faithfulness
from changecam.explain.hirescam import (
    INPUT_LAYER,
    METHODS,
    Explanation,
    explain_batch,
    input_maps_left_out,
    upsample_maps,
)
from changecam.explain.integrated import IntegratedGradientsSettings
from changecam.explain.layer_ig import LayerIGSettings
from changecam.explain.occlusion import OcclusionSettings
from changecam.explain.runner import build_blocks, pad_to_multiple
from changecam.explain.targets import target_score
from changecam.models.protocol import size_multiple

log = logging.getLogger(__name__)

RANDOM = "random"
STUDY_METHODS: tuple[str, ...] = (*METHODS, RANDOM)
KINDS = ("appeared", "vanished")
# the metrics of one method and layer (with _appeared / _vanished variants where they apply)
OBJECT_METRICS = ("date_accuracy", "causal_agreement", "causal_agreement_weighted", "pointing")


@dataclass(frozen=True)
class StudySettings:
    """What the study computes (the ``study`` block of ``conf/study.yaml``).

    Args:
        methods: explanation methods (``hirescam``, ``gradcam``, ``contrastive``,
            ``integrated_gradients``, ``layer_ig``, ``occlusion``) and ``random``, the baseline
            map.
        layers: per-date layers (``input``, ``enc3`` ...); ``None``: every per-date layer.
        dilation: pixels added around each object.
        context: each object is explained in a ``context``² window of the pair centred on it
            (the networks are fully convolutional and trained on 128² tiles; the cost of every
            pass is proportional to its pixels); ``None``: the whole image.
        max_objects: at most this many objects, in image order (``None``: all).
        ig: Integrated Gradients (input layer only).
        layer_ig: Layer Integrated Gradients from the other date.
        occlusion: date-swap occlusion (input layer only).
        faithfulness_steps: deletion-curve resolution; 0 leaves the curves out.
        faithfulness_layers: ``deepest``: the curves rank pixels by each method's deepest
            layer (as ``explain.py``'s faithfulness gap); ``all``: every layer (cost × layers).
        randomisation_images: images the randomisation check runs on (0: no check).
        randomisation_points: cascade steps evaluated (evenly from the head to every layer).
        pass_spearman: a method passes the randomisation check when the mean ``|Spearman|``
            between its maps and the trained model's, with every layer re-initialised, is below
            this (fixed before any measurement: 0.5).
        bootstrap: resamples of the images for the 95 % intervals.
        objects_per_pass: at most this many objects explained in one batch.
        seed: random maps, random curve order, re-initialisation and bootstrap.
    """

    methods: tuple[str, ...] = STUDY_METHODS
    layers: tuple[str, ...] | None = None
    dilation: int = 3
    context: int | None = 96
    max_objects: int | None = None
    ig: IntegratedGradientsSettings = field(default_factory=IntegratedGradientsSettings)
    layer_ig: LayerIGSettings = field(default_factory=LayerIGSettings)
    occlusion: OcclusionSettings = field(default_factory=OcclusionSettings)
    faithfulness_steps: int = 4
    faithfulness_layers: Literal["deepest", "all"] = "deepest"
    randomisation_images: int = 2
    randomisation_points: int = 4
    pass_spearman: float = 0.5
    bootstrap: int = 1000
    objects_per_pass: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("methods", "layers"):
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
            elif value is not None:
                object.__setattr__(self, key, tuple(value))
        build_blocks(
            self,
            prefix="study",
            ig=IntegratedGradientsSettings,
            layer_ig=LayerIGSettings,
            occlusion=OcclusionSettings,
        )
        bad = [m for m in self.methods if m not in STUDY_METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"study.methods: unknown method(s) {bad or list(self.methods)}; expected some of "
                f"{list(STUDY_METHODS)}"
            )
        optional = ("context", "max_objects")  # null: the whole image, every object
        for key in (*optional, "dilation", "faithfulness_steps", "randomisation_images",
                    "randomisation_points", "pass_spearman", "bootstrap", "objects_per_pass",
                    "seed"):  # fmt: skip
            value = getattr(self, key)
            number = (int, float) if key == "pass_spearman" else int
            if (value is None and key in optional) or (
                isinstance(value, number) and not isinstance(value, bool)
            ):
                continue
            kind = "a number" if key == "pass_spearman" else "a whole number"
            raise ValueError(f"study.{key}={value!r} must be {kind}")
        for key in ("dilation", "faithfulness_steps", "randomisation_images"):
            if getattr(self, key) < 0:
                raise ValueError(f"study.{key}={getattr(self, key)} must be >= 0")
        if self.faithfulness_layers not in ("deepest", "all"):
            raise ValueError(
                f"study.faithfulness_layers={self.faithfulness_layers!r}; expected deepest or all"
            )
        if self.layers is not None and not self.layers:
            raise ValueError("study.layers=[] names no layer: list some, or null for every one")
        left_out = [] if self.layers is None else input_maps_left_out(self.methods, self.layers)
        if left_out:
            raise ValueError(
                f"study.methods {left_out} have maps at the input only, but "
                f"study.layers={list(self.layers)} leaves it out: add {INPUT_LAYER} "
                f"(e.g. study.layers=[{INPUT_LAYER}, {self.layers[-1]}])"
            )
        if self.context is not None and self.context < 16:
            raise ValueError(f"study.context={self.context} must be >= 16 or null (whole image)")
        if self.max_objects is not None and self.max_objects < 0:  # a slice would drop the last
            raise ValueError(f"study.max_objects={self.max_objects} must be >= 0 or null (all)")
        if not 0.0 < self.pass_spearman <= 1.0:  # NaN too
            raise ValueError(
                f"study.pass_spearman={self.pass_spearman} must be in (0, 1]: the mean "
                "|Spearman| below which a method passes the randomisation check"
            )
        if self.randomisation_points < 1 or self.objects_per_pass < 1 or self.bootstrap < 1:
            raise ValueError(
                "study.randomisation_points, study.objects_per_pass and study.bootstrap must be "
                ">= 1"
            )


@dataclass(frozen=True)
class StudyImage:
    """One pair of the split: uint8 H×W×3 dates, {0,1} label, change types or ``None``."""

    name: str
    pre: np.ndarray
    post: np.ndarray
    label: np.ndarray
    change_type: np.ndarray | None = None


@dataclass
class _Pass:
    """One batch of objects of one image: each object's window, padded to the network's
    multiple."""

    image: StudyImage
    objects: list[ChangedObject]
    pre: Tensor
    post: Tensor
    regions: Tensor  # B×Hp×Wp bool
    valid: Tensor | None
    size: tuple[int, int]  # of the windows, before padding
    windows: list[tuple[int, int, int, int]]  # each object's (y0, x0, y1, x1) in the image
    explanation: Explanation | None = None


@dataclass
class _Records:
    """Per (method, layer, metric): one list of per-object values per image."""

    values: dict[tuple[str, str, str], dict[str, list[float]]] = field(default_factory=dict)
    # per-object weights of a weighted metric, in the same layout as its values
    weights: dict[tuple[str, str, str], dict[str, list[float]]] = field(default_factory=dict)
    # per (method, layer, order): the deletion curves of the objects whose faithfulness gap is
    # recorded, whose |S(0)| are that gap's weights
    curves: dict[tuple[str, str, str], list[np.ndarray]] = field(default_factory=dict)

    def curve_scale(self, method: str, layer: str) -> float:
        """Σ|S(0)| of the objects behind ``curves`` of ``method`` at ``layer``."""
        per_image = self.weights.get((method, layer, "faithfulness_gap"), {})
        return float(sum(sum(w) for w in per_image.values()))

    def add(
        self,
        method: str,
        layer: str,
        metric: str,
        image: str,
        values: Iterable[float],
        weights: Iterable[float] | None = None,
    ):
        values = [float(v) for v in values]
        per_image = self.values.setdefault((method, layer, metric), {})
        per_image.setdefault(image, []).extend(values)
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(values):
                raise ValueError(f"{metric}: {len(weights)} weights for {len(values)} values")
            self.weights.setdefault((method, layer, metric), {}).setdefault(image, []).extend(
                weights
            )


def engine_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods :func:`explain_batch` computes (``random`` is the study's own)."""
    return tuple(m for m in methods if m != RANDOM)


def with_random_maps(exp: Explanation, generator: torch.Generator) -> Explanation:
    """``exp`` with a ``random`` map (uniform in [0, 1), at the tap's resolution) at every
    per-date tap any method has a map at."""
    shapes: dict[str, torch.Size] = {}
    for maps in exp.raw.values():
        for tap, value in maps.items():
            if tap.split("/", 1)[-1] in exp.layers:
                shapes.setdefault(tap, value.shape)
    raw = {tap: torch.rand(shape, generator=generator) for tap, shape in shapes.items()}
    up = upsample_maps({RANDOM: raw}, exp.input_size)[RANDOM] if exp.upsampled else {}
    return replace(
        exp,
        methods=(*exp.methods, RANDOM),  # type: ignore[arg-type]
        raw={**exp.raw, RANDOM: raw},
        upsampled={**exp.upsampled, RANDOM: up} if exp.upsampled else {},
    )


def study_model(
    model: nn.Module,
    images: Sequence[StudyImage],
    settings: StudySettings,
    *,
    name: str = "model",
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every metric of the study on one model.

    Returns:
        A JSON-ready dict: ``results[method][layer][metric]`` (estimates with ``mean``, ``ci95``,
        ``n``; ``randomisation`` with its curve), ``objects`` (counts per kind), ``causal``
        (the model's own date use: share of objects whose causal date is post, how often it is
        the known date, the causal margins and the share of near-ties under 5 %),
        ``baselines``, ``curves`` (deletion curves pooled over objects, ``Σ S(k) / Σ|S(0)|``),
        ``per_image`` (causal agreement per image, for panels) and ``skipped`` (metrics left
        out and why).
    """
    say = progress or (lambda text: log.info(text))
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(settings.seed)
    records = _Records()
    model_records: dict[str, dict[str, list[float]]] = {}
    kinds: dict[str, int] = {}
    saved: list[_Pass] = []
    has_types = all(img.change_type is not None for img in images)
    say(f"[{name}] per-object metrics on {len(images)} images")
    budget = settings.max_objects
    for image in tqdm(images, desc=f"{name}: images", unit="image", leave=False):
        objects = changed_objects(image.label, image.change_type, settings.dilation)
        if budget is not None:  # an image without change spends none of it
            if budget == 0:
                break
            objects = objects[:budget]
            budget -= len(objects)
        for obj in objects:
            kinds[obj.kind] = kinds.get(obj.kind, 0) + 1
        for start in range(0, len(objects), settings.objects_per_pass):
            chunk = objects[start : start + settings.objects_per_pass]
            batch = _make_pass(model, image, chunk, settings.context)
            batch.explanation = _explain(model, batch, settings, generator, device)
            _score_pass(model, batch, settings, records, model_records)
            if len(saved) < settings.randomisation_images and start == 0:
                saved.append(batch)
    randomisation = {}
    if saved and settings.randomisation_images:
        say(f"[{name}] randomisation check on {len(saved)} images")
        randomisation = _randomisation(model, saved, settings, generator, device)
    results = _summarise(records, randomisation, settings)
    known = [k for k in KINDS if kinds.get(k)]
    n_known = sum(kinds.get(k, 0) for k in KINDS)
    skipped = {}
    if not has_types:
        skipped["date_accuracy"] = (
            "the split has no change_type/ folder (known appeared/vanished answers): date "
            "accuracy is left out; causal agreement, pointing and faithfulness are measured"
        )
    return {
        "objects": dict(sorted(kinds.items())),
        "images": len(images),
        "results": results,
        # study.json sorts its keys: the layers' forward order, for the report (its deepest)
        "layer_order": {method: list(layers) for method, layers in results.items()},
        "causal": {
            **{key: _estimate(values, settings).as_dict() for key, values in model_records.items()},
            "causal_margin_median": _pooled_median(model_records.get("causal_margin", {})),
        },
        "baselines": {
            "random": 0.5,
            "post_always": (kinds.get("appeared", 0) / n_known) if n_known else None,
        },
        "curves": {
            f"{m}/{layer}/{order}": (np.sum(c, 0) / scale).round(6).tolist()
            for (m, layer, order), c in records.curves.items()
            if (scale := records.curve_scale(m, layer)) > 0
        },
        "per_image": {
            f"{m}/{layer}": {img: float(np.nanmean(v)) if len(v) else None for img, v in d.items()}
            for (m, layer, metric), d in records.values.items()
            if metric == "causal_agreement"
        },
        "kinds_with_answers": known,
        "skipped": skipped,
    }


def object_window(
    obj: ChangedObject, size: tuple[int, int], context: int | None
) -> tuple[int, int, int, int]:
    """The ``context``² window (y0, x0, y1, x1) centred on the object, inside the image (the
    whole image when ``context`` is ``None`` or larger than the image)."""
    h, w = size
    if context is None:
        return 0, 0, h, w
    side_h, side_w = min(context, h), min(context, w)
    ys, xs = np.nonzero(obj.mask)
    cy, cx = (int(ys.min()) + int(ys.max())) // 2, (int(xs.min()) + int(xs.max())) // 2
    y0 = min(max(cy - side_h // 2, 0), h - side_h)
    x0 = min(max(cx - side_w // 2, 0), w - side_w)
    return y0, x0, y0 + side_h, x0 + side_w


def _make_pass(
    model: nn.Module, image: StudyImage, objects: list[ChangedObject], context: int | None
) -> _Pass:
    """The objects' batch: each object's window of the pair, padded to the network's multiple."""
    size = image.label.shape
    windows = [object_window(obj, size, context) for obj in objects]
    pre_t, post_t = image_to_tensor(image.pre), image_to_tensor(image.post)
    pre = torch.stack([pre_t[:, y0:y1, x0:x1] for y0, x0, y1, x1 in windows])
    post = torch.stack([post_t[:, y0:y1, x0:x1] for y0, x0, y1, x1 in windows])
    regions = torch.stack(
        [
            torch.from_numpy(o.region[y0:y1, x0:x1])
            for o, (y0, x0, y1, x1) in zip(objects, windows, strict=True)
        ]
    )
    h, w = regions.shape[-2:]
    multiple = size_multiple(model)
    pre, post = pad_to_multiple(pre, multiple), pad_to_multiple(post, multiple)
    hp, wp = pre.shape[-2:]
    valid = None
    if (hp, wp) != (h, w):
        padded = torch.zeros(len(objects), hp, wp, dtype=torch.bool)
        padded[:, :h, :w] = regions
        regions = padded
        valid = torch.zeros(len(objects), hp, wp, dtype=torch.bool)
        valid[:, :h, :w] = True
    return _Pass(image, objects, pre, post, regions, valid, (h, w), windows)


def _explain(
    model: nn.Module,
    batch: _Pass,
    settings: StudySettings,
    generator: torch.Generator,
    device: torch.device | str,
) -> Explanation:
    methods = engine_methods(settings.methods) or ("hirescam",)
    exp = explain_batch(
        model,
        batch.pre.to(device),
        batch.post.to(device),
        taps=settings.layers,
        target="roi",
        roi=batch.regions[:, None].to(device),
        valid=None if batch.valid is None else batch.valid[:, None].to(device),
        methods=methods,  # type: ignore[arg-type]
        ig=settings.ig,
        layer_ig=settings.layer_ig,
        occlusion=settings.occlusion,
    ).to("cpu")
    if RANDOM in settings.methods:
        exp = with_random_maps(exp, generator)
    if RANDOM not in settings.methods or engine_methods(settings.methods):
        return exp
    # random alone: HiResCAM ran only to give the taps' shapes
    return replace(
        exp,
        methods=(RANDOM,),  # type: ignore[arg-type]
        raw={RANDOM: exp.raw[RANDOM]},
        upsampled={RANDOM: exp.upsampled[RANDOM]},
    )


def _layers(exp: Explanation, method: str, settings: StudySettings) -> list[str]:
    layers = exp.layers_of(method)  # type: ignore[arg-type]
    return [
        layer
        for layer in layers
        if settings.layers is None
        or layer in settings.layers
        or any(t.endswith(f"/{layer}") for t in settings.layers)
    ]


def _score_pass(
    model: nn.Module,
    batch: _Pass,
    settings: StudySettings,
    records: _Records,
    model_records: dict[str, dict[str, list[float]]],
) -> None:
    """Every per-object metric of one batch, for every method and layer."""
    exp = batch.explanation
    assert exp is not None
    device = next(model.parameters()).device
    h, w = batch.size
    regions = batch.regions[:, :h, :w]
    with torch.no_grad():
        mask = exp.mask.to(device)
        score = exp.score
        drops = {}
        for date in ("pre", "post"):
            a, b = swap_regions(batch.pre, batch.post, batch.regions, date)
            drops[date] = score - target_score(model(a.to(device), b.to(device)), mask).cpu()
    causal = causal_post(drops["pre"], drops["post"])
    margin = causal_margin(drops["pre"], drops["post"])
    # the causal date is chosen by |ΔS|: where its swap raises S, that date's content works
    # against the change, and a map's positive mass, which decides the map's date, cannot name it
    causal_drop = torch.where(
        drops["post"].abs() >= drops["pre"].abs(), drops["post"], drops["pre"]
    )
    kinds = [obj.kind for obj in batch.objects]
    known = torch.tensor(
        [{"post": 1.0, "pre": 0.0}.get(o.known_date or "", math.nan) for o in batch.objects]
    )
    name = batch.image.name

    def by_kind(key: str, values: Tensor, keep: Tensor | None = None) -> dict[str, list[float]]:
        """``key`` over the kept objects, and ``key_appeared`` / ``key_vanished``."""
        vals = values.tolist()
        kept = [True] * len(vals) if keep is None else keep.tolist()
        out = {key: [v for v, k in zip(vals, kept, strict=True) if k]}
        for kind in KINDS:
            out[f"{key}_{kind}"] = [v for v, k in zip(vals, kinds, strict=True) if k == kind]
        return out

    has_known = ~torch.isnan(known)
    for key, values in {
        **by_kind("causal_post", causal),
        # share of objects whose causal date's swap raises S instead of lowering it
        **by_kind("causal_raises", (causal_drop < 0).float()),
        **by_kind("model_date_accuracy", agreement(causal, known), has_known),
        "drop_pre": drops["pre"].tolist(),
        "drop_post": drops["post"].tolist(),
        "causal_margin": margin.tolist(),
        # share of objects whose two swaps move S within 5 % of each other (descriptive)
        "causal_near_tie": (margin < 0.05).float().tolist(),
    }.items():
        model_records.setdefault(key, {}).setdefault(name, []).extend(
            v for v in values if not math.isnan(v)
        )
    # the window's own pixels: a window that is no multiple of the network's size multiple is
    # padded, and the padding's evidence is no part of the object's post share
    window = exp.crop(h, w) if tuple(exp.input_size) != (h, w) else exp
    for method in exp.methods:
        for layer in _layers(exp, method, settings):
            up = {
                d: exp.map(f"{d}/{layer}", method, upsampled=True)[:, :h, :w]
                for d in ("pre", "post")
            }
            attributed = attributed_post(up["pre"], up["post"], regions)
            agrees = agreement(attributed, causal)
            metrics = {
                **by_kind("date_accuracy", agreement(attributed, known), has_known),
                **by_kind("causal_agreement", agrees),
                **by_kind("pointing", pointing(up["pre"], up["post"], regions)),
                "post_share": window.post_share(layer, method).tolist(),  # type: ignore[arg-type]
            }
            deepest = layer == _layers(exp, method, settings)[-1]
            if settings.faithfulness_steps and (deepest or settings.faithfulness_layers == "all"):
                faith = faithfulness(
                    model,
                    batch.pre.to(device),
                    batch.post.to(device),
                    exp.to(device),
                    layer=layer,
                    method=method,
                    dates=("both",),  # type: ignore[arg-type]
                    steps=settings.faithfulness_steps,
                    insertion=False,
                    seed=settings.seed,
                    valid=None if batch.valid is None else batch.valid.to(device),
                )
                # each object's gap weighed by its |S(0)|: the estimate is the pooled
                # Σ(AUC_random − AUC_map) / Σ|S(0)|, which an object whose S(0) is near 0 (the
                # target is the object's logits, predicted change or not) cannot dominate
                gaps, s0 = faith.gap("both"), faith.score0.abs()
                kept = ~gaps.isnan()
                records.add(
                    method,
                    layer,
                    "faithfulness_gap",
                    name,
                    gaps[kept].tolist(),
                    weights=s0[kept].tolist(),
                )
                # the curves pooled the same way (Σ S(k) / Σ|S(0)|), so that the area between
                # the plotted curves is the gap in the table
                for order in ("cam", "random"):
                    curve = faith.curve("deletion", "both", order)[kept].numpy()
                    records.curves.setdefault((method, layer, order), []).extend(curve)
            for metric, values in metrics.items():
                records.add(method, layer, metric, name, [v for v in values if not math.isnan(v)])
            # each object's agreement with the causal date, weighed by how decisive that date is
            records.add(
                method,
                layer,
                "causal_agreement_weighted",
                name,
                agrees.tolist(),
                weights=margin.tolist(),
            )


def _randomisation(
    model: nn.Module,
    saved: list[_Pass],
    settings: StudySettings,
    generator: torch.Generator,
    device: torch.device | str,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Mean |Spearman| between trained and cascaded-randomised maps per method and layer (a
    map whose ranking flips still carries the trained model's structure: signs must not cancel)."""
    first = saved[0]
    order = cascade_order(model, first.pre[:1].to(device), first.post[:1].to(device))
    points = cascade_points(len(order), settings.randomisation_points)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for count in tqdm(points, desc="randomisation", unit="step", leave=False):
        shuffled = randomised(model, order, count, settings.seed)
        rhos: dict[tuple[str, str], list[float]] = {}
        for batch in saved:
            trained = batch.explanation
            assert trained is not None
            again = _explain(shuffled, batch, settings, generator, device)
            for method in trained.methods:
                for layer in _layers(trained, method, settings):
                    a = _both_dates(trained, method, layer)
                    b = _both_dates(again, method, layer)
                    rho = spearman(a, b)
                    rhos.setdefault((method, layer), []).extend(
                        v for v in rho.tolist() if not math.isnan(v)
                    )
        for key, values in rhos.items():
            entry = out.setdefault(key, {"layers_randomised": [], "of": len(order), "spearman": []})
            entry["layers_randomised"].append(count)
            entry["spearman"].append(float(np.mean(np.abs(values))) if values else None)
    for entry in out.values():
        final = entry["spearman"][-1]
        entry["final"] = final
        entry["passes"] = None if final is None else bool(final < settings.pass_spearman)
        entry["pass_spearman"] = settings.pass_spearman
    return out


def _both_dates(exp: Explanation, method: str, layer: str) -> Tensor:
    """The raw maps of both dates side by side, flattened (B×2hw)."""
    pre = exp.map(f"pre/{layer}", method).flatten(1)  # type: ignore[arg-type]
    post = exp.map(f"post/{layer}", method).flatten(1)  # type: ignore[arg-type]
    return torch.cat([pre, post], 1)


def _pooled_median(per_image: dict[str, list[float]]) -> float | None:
    values = [v for vals in per_image.values() for v in vals]
    return float(np.median(values)) if values else None


def _estimate(
    per_image: dict[str, list[float]],
    settings: StudySettings,
    weights: dict[str, list[float]] | None = None,
):
    return bootstrap(
        list(per_image.values()),
        settings.bootstrap,
        settings.seed,
        None if weights is None else [weights[k] for k in per_image],
    )


def _summarise(
    records: _Records,
    randomisation: dict[tuple[str, str], dict[str, Any]],
    settings: StudySettings,
) -> dict[str, dict[str, dict[str, Any]]]:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for (method, layer, metric), per_image in records.values.items():
        entry = results.setdefault(method, {}).setdefault(layer, {})
        weights = records.weights.get((method, layer, metric))
        entry[metric] = _estimate(per_image, settings, weights).as_dict()
    for (method, layer), entry in randomisation.items():
        results.setdefault(method, {}).setdefault(layer, {})["randomisation"] = entry
    return results


__all__ = [
    "RANDOM",
    "STUDY_METHODS",
    "StudyImage",
    "StudySettings",
    "engine_methods",
    "study_model",
    "with_random_maps",
]

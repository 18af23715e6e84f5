"""Faithfulness of a per-date explanation: date-swap deletion and insertion curves.

Deleting a pixel of one date means copying in the other date's pixel there — the "no change
here" counterfactual. For a date ``d`` and a fraction ``k``:

* deletion: the top-``k`` pixels of ``d`` (ranked by the CAM of ``d``) take the other date's
  values; ``S`` (with the explanation's fixed target mask) should fall fast;
* insertion: start with ``d`` replaced everywhere by the other date and copy the top-``k``
  pixels of ``d`` back in; ``S`` should rise fast;
* ``both``: rank locations by ``max(CAM_pre, CAM_post)`` and modify, at each location, the date
  whose CAM is larger — deletion makes the pair identical at the top-``k`` locations;
* the same curves in random order of locations (for ``both`` each location still modifies the
  date the maps chose, so both orders end at the same pair), averaged over a few permutations,
  are the baseline.

The areas under the curves (trapezoid over ``k`` in [0, 1]) give the **faithfulness gap**:
``(AUC_random − AUC_cam) / |S(k=0)|`` for deletion (``AUC_cam − AUC_random`` for insertion);
positive means the map orders pixels better than chance. It is NaN where ``S(k=0) = 0``
(e.g. no change predicted). Curves are batched: ``B × steps`` counterfactuals go through the
model ``batch_size`` at a time, so a curve costs a few forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from changecam.explain.hirescam import (
    Explanation,
    Method,
    choose_layer,
    preserved_state,
    upsample_maps,
)
from changecam.explain.targets import target_score

CurveDate = Literal["pre", "post", "both"]
CURVE_DATES: tuple[CurveDate, ...] = get_args(CurveDate)
CurveKind = Literal["deletion", "insertion"]
Order = Literal["cam", "random"]


@dataclass(frozen=True)
class Faithfulness:
    """Perturbation curves of one batch (tensors on the CPU).

    Attributes:
        layer: the per-date layer whose maps ranked the pixels (e.g. ``"enc4"``).
        method: ``hirescam`` or ``gradcam``.
        fractions: ``k`` values in [0, 1] (F).
        score0: ``S`` of the unmodified pair (B).
        curves: ``curves[kind][date][order]``: ``S`` after modifying a fraction ``k``, B×F.
    """

    layer: str
    method: Method
    fractions: Tensor
    score0: Tensor
    curves: dict[str, dict[str, dict[str, Tensor]]]

    def curve(
        self, kind: CurveKind = "deletion", date: CurveDate = "both", order: Order = "cam"
    ) -> Tensor:
        """One curve, B×F."""
        try:
            return self.curves[kind][date][order]
        except KeyError:
            have = {k: list(d) for k, d in self.curves.items()}
            raise KeyError(f"no {kind} curve for date {date!r}; computed: {have}") from None

    def auc(
        self, kind: CurveKind = "deletion", date: CurveDate = "both", order: Order = "cam"
    ) -> Tensor:
        """Area under one curve over ``k`` in [0, 1], in units of ``S`` (B)."""
        return torch.trapezoid(self.curve(kind, date, order), self.fractions, dim=-1)

    def gap(self, date: CurveDate = "both", kind: CurveKind = "deletion") -> Tensor:
        """Faithfulness gap per sample: positive when the map beats random order; NaN when S(0)=0."""
        diff = self.auc(kind, date, "random") - self.auc(kind, date, "cam")
        if kind == "insertion":
            diff = -diff
        scale = self.score0.abs()
        return torch.where(
            scale > 0, diff / scale.clamp(min=torch.finfo(scale.dtype).tiny), torch.nan
        )

    def select(self, index: int | slice) -> Faithfulness:
        """The curves of some samples (an ``int`` keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(
            self,
            score0=self.score0[index],
            curves={
                k: {d: {o: c[index] for o, c in v.items()} for d, v in dd.items()}
                for k, dd in self.curves.items()
            },
        )


def _ranks(scores: Tensor) -> Tensor:
    """Rank of each pixel (0 = highest score), B×N; ties keep pixel order."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def perturbation_curve(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    mask: Tensor,
    ranking: Tensor,
    modify_post: Tensor,
    fractions: Tensor,
    kind: CurveKind = "deletion",
    valid: Tensor | None = None,
    batch_size: int = 32,
) -> Tensor:
    """``S`` along one deletion or insertion curve (B×F).

    Args:
        model: ``model(pre, post) -> logits``; called as it is (the caller sets eval mode).
        pre: B×C×H×W first-date images.
        post: B×C×H×W second-date images.
        mask: fixed target mask, B×1×H×W.
        ranking: B×H×W scores; higher pixels are modified first.
        modify_post: B×H×W bool: at each pixel, whether the post date is the one modified
            (it takes the pre value) or the pre date (it takes the post value).
        fractions: F fractions ``k`` in [0, 1] of the valid pixels.
        kind: ``deletion`` (modify the top-k) or ``insertion`` (modify all but the top-k).
        valid: B×H×W bool pixels that may be modified (default all); others keep their values.
        batch_size: counterfactual pairs per forward pass.
    """
    b, _, h, w = pre.shape
    scores = ranking.reshape(b, h * w).float()
    allowed = (
        torch.ones_like(scores, dtype=torch.bool)
        if valid is None
        else valid.reshape(b, h * w).bool()
    )
    ranks = _ranks(torch.where(allowed, scores, -torch.inf))
    counts = torch.round(
        fractions.to(scores.device)[None] * allowed.sum(1, keepdim=True)
    ).long()  # B×F
    n_frac = counts.shape[1]
    modify_post = modify_post.reshape(b, 1, h, w).bool()
    out = torch.empty(b * n_frac, device=pre.device)
    for start in range(0, b * n_frac, batch_size):
        idx = torch.arange(start, min(start + batch_size, b * n_frac), device=pre.device)
        sample, step = idx // n_frac, idx % n_frac
        chosen = ranks[sample] < counts[sample, step][:, None]  # top-k pixels, n×N
        if kind == "insertion":
            chosen = allowed[sample] & ~chosen
        chosen = chosen.reshape(-1, 1, h, w)
        x_pre, x_post = pre[sample], post[sample]
        new_pre = torch.where(chosen & ~modify_post[sample], x_post, x_pre)
        new_post = torch.where(chosen & modify_post[sample], x_pre, x_post)
        out[start : start + len(idx)] = target_score(model(new_pre, new_post), mask[sample]).float()
    return out.reshape(b, n_frac)


def faithfulness(
    model: nn.Module,
    pre: Tensor,
    post: Tensor,
    explanation: Explanation,
    *,
    layer: str | None = None,
    method: Method = "hirescam",
    dates: Sequence[CurveDate] = CURVE_DATES,
    steps: int = 10,
    insertion: bool = True,
    random_repeats: int = 1,
    seed: int = 0,
    valid: Tensor | None = None,
    batch_size: int = 32,
    eval_mode: bool = True,
) -> Faithfulness:
    """Deletion (and insertion) curves of ``explanation`` and of random order, for each date.

    Args:
        model: the explained model.
        pre: the explained B×C×H×W first-date images.
        post: the explained second-date images.
        explanation: from :func:`~changecam.explain.explain_batch` on the same inputs; its
            target mask stays fixed along the curves.
        layer: per-date layer whose upsampled maps rank pixels; default the deepest explained.
        method: which map ranks the pixels.
        dates: curves to compute: ``pre``, ``post`` and/or ``both``.
        steps: the curve has ``steps + 1`` points, ``k = 0, 1/steps, ..., 1``.
        insertion: also compute insertion curves.
        random_repeats: random permutations averaged for the baseline (on images of
            thousands of pixels one is stable: each step deletes many random pixels).
        seed: seed of the random order (the same seed gives the same baseline, whichever
            other dates are asked for); every sample of the batch gets the same order, so its
            curves do not depend on its batch.
        valid: B×H×W (or H×W) bool pixels that may be modified (e.g. excluding padding).
        batch_size: counterfactual pairs per forward pass.
        eval_mode: run the model in eval mode (restored afterwards).

    Raises:
        ValueError: inputs that do not match the explanation, an unknown layer or date, or
            ``steps``/``random_repeats`` below 1.
    """
    _check_request(pre, post, explanation, dates, steps, random_repeats)
    layer = choose_layer(explanation.layers_of(method), layer, f"faithfulness layer ({method})")
    b, _, h, w = pre.shape
    if valid is not None:
        valid = valid.to(pre.device).bool().expand(b, h, w)
    run = _CurveRunner(model, pre, post, explanation.mask.to(pre.device), valid, batch_size)
    cams = _layer_maps(explanation, layer, method, pre.device)
    fractions = torch.linspace(0, 1, steps + 1)
    randoms = _random_rankings(seed, random_repeats, (h, w))
    kinds: list[CurveKind] = ["deletion", "insertion"] if insertion else ["deletion"]
    curves: dict[str, dict[str, dict[str, Tensor]]] = {k: {} for k in kinds}
    with preserved_state(model, eval_mode), torch.inference_mode():
        score0 = run.score0()
        for date in dates:
            orders = _orders(date, cams, randoms[date])
            for kind, per_order in run.date_curves(orders, kinds, score0, fractions).items():
                curves[kind][date] = per_order
    return Faithfulness(
        layer=layer, method=method, fractions=fractions, score0=score0.cpu(), curves=curves
    )


def _check_request(
    pre: Tensor,
    post: Tensor,
    explanation: Explanation,
    dates: Sequence[CurveDate],
    steps: int,
    random_repeats: int,
) -> None:
    """Refuse inputs that do not match the explanation, unknown dates and too few steps."""
    if (
        pre.shape != post.shape
        or tuple(pre.shape[-2:]) != explanation.input_size
        or len(pre) != len(explanation)
    ):
        raise ValueError(
            f"pre {tuple(pre.shape)} and post {tuple(post.shape)} must match the explanation's "
            f"batch of {len(explanation)} at {explanation.input_size}"
        )
    bad = [d for d in dates if d not in CURVE_DATES]
    if bad or not dates:
        raise ValueError(
            f"unknown curve date(s) {bad or list(dates)}; expected some of {CURVE_DATES}"
        )
    if steps < 1 or random_repeats < 1:
        raise ValueError(f"steps={steps} and random_repeats={random_repeats} must be >= 1")


def _layer_maps(
    explanation: Explanation, layer: str, method: Method, device: torch.device
) -> dict[str, Tensor]:
    """The upsampled map of ``layer`` for each date (upsampled here if the explanation is not)."""
    size = explanation.input_size
    cams = {}
    for d in ("pre", "post"):
        tap = f"{d}/{layer}"
        up = explanation.upsampled.get(method, {}).get(tap)
        if up is None:
            up = upsample_maps({method: {tap: explanation.map(tap, method)}}, size)[method][tap]
        cams[d] = up.to(device)
    return cams


# the order the random rankings are drawn in, every date's whether its curve is asked for or
# not: a date's random baseline then depends on the seed alone, not on the other dates asked
# for (explain.py's ``both`` comes first: its rankings are those drawn before this order)
RANDOM_DRAW_ORDER: tuple[CurveDate, ...] = ("both", "pre", "post")


def _random_rankings(
    seed: int, random_repeats: int, size: tuple[int, int]
) -> dict[CurveDate, list[Tensor]]:
    """``random_repeats`` random H×W rankings per curve date, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        date: [torch.rand(size, generator=generator) for _ in range(random_repeats)]
        for date in RANDOM_DRAW_ORDER
    }


def _orders(
    date: CurveDate, cams: dict[str, Tensor], randoms: list[Tensor]
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """``(ranking, modify_post)`` per order of one date's curve; random has one per ranking
    of ``randoms``."""
    b, h, w = cams["pre"].shape
    device = cams["pre"].device
    if date == "both":
        cam = (torch.maximum(cams["pre"], cams["post"]), cams["post"] > cams["pre"])
    else:
        ones = torch.ones(b, h, w, dtype=torch.bool, device=device)
        cam = (cams[date], ones if date == "post" else ~ones)
    # one order for every sample of the batch: a sample's random curve is then the same
    # whichever batch (and place in it) it is scored in, as when it is scored alone
    random = [(r.to(device).expand(b, h, w), cam[1]) for r in randoms]
    return {"cam": [cam], "random": random}


@dataclass(frozen=True)
class _CurveRunner:
    """The explained batch and how to score its counterfactuals."""

    model: nn.Module
    pre: Tensor
    post: Tensor
    mask: Tensor
    valid: Tensor | None
    batch_size: int

    def score0(self) -> Tensor:
        """``S`` of the unmodified pairs (B)."""
        return target_score(self.model(self.pre, self.post), self.mask).float()

    def curve(self, ranking: Tensor, modify_post: Tensor, fractions: Tensor, kind: CurveKind):
        return perturbation_curve(
            self.model,
            self.pre,
            self.post,
            self.mask,
            ranking,
            modify_post,
            fractions,
            kind,
            self.valid,
            self.batch_size,
        )

    def date_curves(
        self,
        orders: dict[str, list[tuple[Tensor, Tensor]]],
        kinds: Sequence[CurveKind],
        score0: Tensor,
        fractions: Tensor,
    ) -> dict[str, dict[str, Tensor]]:
        """``curves[kind][order]`` (B×F, on the CPU) of one date."""
        # The end points do not depend on the order: nothing modified (S0: deletion k=0,
        # insertion k=1) and every valid pixel modified (deletion k=1, insertion k=0).
        rank, which = orders["cam"][0]
        full = self.curve(rank, which, torch.ones(1), "deletion")[:, 0]
        ends = {"deletion": (score0, full), "insertion": (full, score0)}
        out: dict[str, dict[str, Tensor]] = {}
        for kind in kinds:
            first, last = ends[kind]
            out[kind] = {}
            for order, entries in orders.items():
                middle = torch.stack(
                    [self.curve(r, m, fractions[1:-1], kind) for r, m in entries]
                ).mean(0)
                out[kind][order] = torch.cat([first[:, None], middle, last[:, None]], 1).cpu()
        return out

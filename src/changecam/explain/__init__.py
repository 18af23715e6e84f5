"""Explanations of change detectors: HiResCAM and Grad-CAM per date, in one pass.

Public entry points (import them from here):

* :func:`explain_batch` ``(model, pre, post, taps=..., target=..., methods=...) -> Explanation``:
  one forward + one backward; every tap, both dates, HiResCAM and Grad-CAM. Works inside a
  Lightning validation/test step.
* :class:`Explanation`: the maps (``raw[method][tap]`` at tap resolution,
  ``upsampled[method][tap]`` at input resolution), ``logits``, target ``mask`` and ``score``;
  ``post_share(layer)`` / ``post_shares()`` give ``P_post / (P_pre + P_post)`` on raw maps
  (NaN when both are 0), ``empty`` flags samples whose target selects no pixel.
* :class:`Target` / :func:`target_mask` / :func:`target_score`: ``S = Σ M ⊙ logits`` with ``M`` the
  predicted change (default), the ground truth, all pixels or an ROI.
"""

from changecam.explain.faithfulness import (
    CURVE_DATES,
    CurveDate,
    CurveKind,
    Faithfulness,
    faithfulness,
    perturbation_curve,
)
from changecam.explain.hirescam import (
    DATES,
    METHODS,
    Date,
    Explanation,
    Method,
    TapError,
    explain_batch,
    per_date_layers,
    preserved_state,
    resolve_taps,
)
from changecam.explain.render import render_panel, save_panel
from changecam.explain.targets import TARGET_KINDS, Target, TargetKind, target_mask, target_score

__all__ = [
    "CURVE_DATES",
    "CurveDate",
    "CurveKind",
    "Faithfulness",
    "faithfulness",
    "perturbation_curve",
    "DATES",
    "METHODS",
    "TARGET_KINDS",
    "Date",
    "Explanation",
    "Method",
    "TapError",
    "Target",
    "TargetKind",
    "explain_batch",
    "per_date_layers",
    "preserved_state",
    "render_panel",
    "resolve_taps",
    "save_panel",
    "target_mask",
    "target_score",
]

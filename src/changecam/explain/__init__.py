"""Explanations of change detectors: HiResCAM and Grad-CAM per date, in one pass.

Public entry points (import them from here); definitions in ``docs/design.md``
("Explanations"):

* :func:`explain_batch` ``(model, pre, post, taps=..., target=..., methods=...) -> Explanation``:
  one forward + one backward; every tap, both dates, HiResCAM and Grad-CAM. Works inside a
  Lightning validation/test step; leaves modes, ``requires_grad`` and ``.grad`` as found.
  Every model has the per-date layer ``input`` (taps ``pre/input``, ``post/input``: gradient ×
  input); ``methods=[..., "integrated_gradients"]`` adds captum's Integrated Gradients there
  (:class:`IntegratedGradientsSettings`: steps, baseline).
* :class:`LayerTaps` ``(model, layers={"encoder.layer3": "calls", ...})``: a model changecam did
  not write, its layers declared by module path and how the dates pass through them
  (``calls``, ``batch_halves``, ``batch_interleaved``, ``pre``, ``post``, ``fused``).
* :class:`Explanation`: ``raw[method][tap]`` (B×h×w, tap resolution, logit contribution per
  cell), ``upsampled[method][tap]`` (B×H×W, per input pixel), ``logits``, target ``mask`` and
  ``score``; ``post_share(layer)`` / ``post_shares()`` give ``P_post / (P_pre + P_post)`` on raw
  maps (NaN when both are 0); ``empty`` flags samples whose target selects no pixel;
  ``select``, ``crop``, ``to`` return new explanations.
* :class:`Target` / :func:`target_mask` / :func:`target_score`: ``S = Σ M ⊙ logits`` with ``M`` the
  predicted change (default), the ground truth, all pixels or an ROI.
* :func:`faithfulness` ``(model, pre, post, explanation, layer=...) -> Faithfulness``: date-swap
  deletion (and insertion) curves vs random order; ``.gap(date)`` is
  ``(AUC_random − AUC_cam) / |S(0)|`` (positive: better than random; ``date="both"`` by default).
* :func:`render_panel` ``(pre, post, explanation, index=..., label=...) -> np.ndarray`` (the 2×4
  panel, uint8 RGB) and :func:`save_panel` (PNG).
* :class:`ExplainSettings` (with a nested :class:`FaithfulnessSettings`): what to explain; the
  ``explain`` config group instantiates it. :func:`choose_layer` picks the default (deepest)
  layer, for every caller.
* :func:`explain_tensors` ``(model, pre, post, settings) -> Explained``: the one runner (padding
  for any size, explanation, faithfulness, crop), used by every command and the CAM callback;
  :func:`explain_pair` ``(model, pre_uint8, post_uint8, label=..., settings=...) ->
  PairExplanation`` adds the panel (``.summary()`` for JSON, ``.save(run_dir)`` for ``panels/``
  and ``maps/``), for ``explain.py`` and ``predict.py``.
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
    CAM_METHODS,
    DATES,
    INPUT_LAYER,
    INPUT_TAPS,
    METHODS,
    Date,
    Explanation,
    Method,
    TapError,
    choose_layer,
    explain_batch,
    per_date_layers,
    preserved_state,
    resolve_taps,
)
from changecam.explain.integrated import IntegratedGradientsSettings
from changecam.explain.render import render_panel, save_panel
from changecam.explain.runner import (
    Explained,
    ExplainSettings,
    FaithfulnessSettings,
    PairExplanation,
    explain_pair,
    explain_tensors,
    save_maps,
    with_threshold,
)
from changecam.explain.targets import TARGET_KINDS, Target, TargetKind, target_mask, target_score
from changecam.models.external import LayerTaps

__all__ = [
    "ExplainSettings",
    "Explained",
    "FaithfulnessSettings",
    "PairExplanation",
    "choose_layer",
    "explain_pair",
    "explain_tensors",
    "save_maps",
    "with_threshold",
    "CURVE_DATES",
    "CurveDate",
    "CurveKind",
    "Faithfulness",
    "faithfulness",
    "perturbation_curve",
    "CAM_METHODS",
    "DATES",
    "INPUT_LAYER",
    "INPUT_TAPS",
    "IntegratedGradientsSettings",
    "LayerTaps",
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

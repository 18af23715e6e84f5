"""Predict change on image pairs of any size (Hydra, ``conf/predict.yaml``).

``python predict.py ckpt_path=<best.ckpt> input.pre=<file> input.post=<file>`` or
``input.dir=<folder with A/ and B/>`` writes, in the run directory, per pair:

* ``masks/<name>.png``: the binary change mask, 0/255, exactly the input's size;
* ``probabilities/<name>.png``: the change probability as a 16-bit grayscale PNG,
  ``p = value / 65535`` (read it back with :func:`read_probability`);
* ``panels/<name>.png``: the 2x4 explanation panel;

and one ``predictions.json`` with each pair's changed-pixel fraction, post share per layer and
faithfulness gap. Masks and probabilities come from sliding-window inference
(:mod:`changecam.models.sliding_window`); the panel, the shares and the gap from
:func:`changecam.explain.explain_pair`, the code ``explain.py`` runs, on the whole (padded)
image. A pair that fails (e.g. its two dates differ in size) leaves no files; the
others are still predicted, and the command exits with an error naming the failed pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from changecam.atomic import write_json
from changecam.cli.common import (
    checked_threshold,
    explain_settings,
    load_model,
    log,
    prepare_run,
    read_roi,
    resolve_device,
    sliding_window_spec,
    task_wrapper,
)
from changecam.cli.config_checks import ConfigError
from changecam.data.io import ImageReadError, pair_size, read_image, read_label, write_png
from changecam.data.layout import Triplet, input_pairs
from changecam.data.transforms import image_to_tensor
from changecam.explain import ExplainSettings, PairExplanation, explain_pair
from changecam.models.sliding_window import SlidingWindow, check_window, sliding_window_logits

PROBABILITY_SCALE = 65535
PROBABILITY_ENCODING = "16-bit grayscale PNG, probability = value / 65535"


class PredictionError(RuntimeError):
    """Some pairs could not be predicted (the others were)."""


@dataclass(frozen=True)
class PairPrediction:
    """The outputs of one pair, in memory until :meth:`save` writes them all."""

    name: str
    probability: np.ndarray  # float32 H x W in [0, 1]
    threshold: float
    explained: PairExplanation | None
    skipped: str | None = None  # why the pair was not explained, if it was not

    @property
    def mask(self) -> np.ndarray:
        """uint8 H x W, 255 where the probability exceeds the threshold."""
        return np.where(self.probability > self.threshold, 255, 0).astype(np.uint8)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers of the pair."""
        changed = int((self.probability > self.threshold).sum())
        out: dict[str, Any] = {
            "name": self.name,
            "size": list(self.probability.shape),
            "changed_pixels": changed,
            "changed_fraction": changed / self.probability.size,
            "mean_probability": float(self.probability.mean()),
        }
        if self.explained is not None:
            explained = self.explained.summary()
            for key in ("post_share", "faithfulness_gap", "target_score", "empty_target"):
                out[key] = explained.get(key)
        elif self.skipped:
            out["explanation_skipped"] = self.skipped
        return out

    def save(self, run_dir: Path) -> dict[str, str]:
        """Write the mask, probability and panel files; on any error remove those written."""
        files = {
            "mask": run_dir / "masks" / f"{self.name}.png",
            "probability": run_dir / "probabilities" / f"{self.name}.png",
        }
        if self.explained is not None:
            files["panel"] = run_dir / "panels" / f"{self.name}.png"
        written: list[Path] = []
        try:
            write_png(files["mask"], self.mask)
            written.append(files["mask"])
            write_png(files["probability"], encode_probability(self.probability))
            written.append(files["probability"])
            if self.explained is not None:
                write_png(files["panel"], self.explained.panel)
                written.append(files["panel"])
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return {k: str(v.relative_to(run_dir)) for k, v in files.items()}


def encode_probability(probability: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint16 (``round(p * 65535)``)."""
    return np.round(np.clip(probability, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint16)


def read_probability(path: str | Path) -> np.ndarray:
    """Read a ``probabilities/<name>.png`` back as float32 probabilities in [0, 1]."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16 or data.ndim != 2:
        raise ValueError(f"{path} is not a 16-bit grayscale probability PNG written by predict.py")
    return data.astype(np.float32) / PROBABILITY_SCALE


def predict_probability(
    net: nn.Module, pre: np.ndarray, post: np.ndarray, spec: SlidingWindow, device: torch.device
) -> np.ndarray:
    """Sliding-window change probability (float32 H x W) of one uint8 pair."""
    x_pre = image_to_tensor(pre)[None].to(device)
    x_post = image_to_tensor(post)[None].to(device)
    logits = sliding_window_logits(net, x_pre, x_post, spec)
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


def predict_pair(
    net: nn.Module,
    pair: Triplet,
    spec: SlidingWindow,
    threshold: float,
    settings: ExplainSettings | None,
    device: torch.device,
    roi: np.ndarray | None = None,
) -> PairPrediction:
    """Everything predict.py computes for one pair, in memory (nothing written yet).

    Args:
        net: the network (eval mode, on ``device``).
        pair: the pair's files.
        spec: sliding-window settings of the mask and probability.
        threshold: probability above which a pixel is change.
        settings: explanation settings (with the same threshold); ``None`` skips the
            explanation. Pairs above ``settings.max_pixels`` are not explained.
        device: where to compute.
        roi: the region of interest of ``target=roi``.

    Raises:
        ValueError: the two dates differ in size (or an image cannot be read).
    """
    height, width = pair_size(replace(pair, label=None))  # the label is optional here
    pre, post = read_image(pair.pre), read_image(pair.post)
    if pre.shape != post.shape:  # headers can lie; the decoded arrays decide
        raise ValueError(
            f"pair {pair.name!r} refused: decoded sizes {pre.shape} and {post.shape} differ"
        )
    probability = predict_probability(net, pre, post, spec, device)
    if settings is None:
        return PairPrediction(pair.name, probability, threshold, None, "explain.enabled=false")
    if settings.max_pixels is not None and height * width > settings.max_pixels:
        reason = (
            f"{height}x{width} exceeds explain.max_pixels={settings.max_pixels}; explain a crop "
            "with explain.py or raise the limit"
        )
        return PairPrediction(pair.name, probability, threshold, None, reason)
    # drawn in the panel; only explain.target=ground_truth needs it
    label = optional_label(pair, (height, width), required=settings.target == "ground_truth")
    explained = explain_pair(
        net, pre, post, label=label, roi=roi, name=pair.name, settings=settings, device=device
    )
    return PairPrediction(pair.name, probability, threshold, explained)


def optional_label(
    pair: Triplet, size: tuple[int, int], required: bool = False
) -> np.ndarray | None:
    """The pair's label for its panel, or ``None``: unless ``required``, a label that cannot be
    read or does not fit the images is dropped with a warning and the pair still runs.

    Raises:
        ValueError / OSError: ``required`` and the label is unusable.
    """
    if pair.label is None:
        return None
    try:
        label = read_label(pair.label)
        if label.shape != size:
            raise ImageReadError(
                f"{pair.label} is {label.shape[0]}x{label.shape[1]} but the images are "
                f"{size[0]}x{size[1]}"
            )
    except (ImageReadError, OSError) as err:
        if required:
            raise ValueError(f"pair {pair.name!r} refused: label {err}") from err
        log.warning("pair %s: label dropped (the panel shows none): %s", pair.name, err)
        return None
    return label


def mean_of(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


@task_wrapper
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every input pair; write masks, probabilities, panels and ``predictions.json``."""
    output_dir = prepare_run(cfg)
    threshold = checked_threshold(cfg.threshold)
    spec = sliding_window_spec(cfg)
    if spec is None:
        raise ConfigError("predict.py predicts window by window: set sliding_window.enabled=true")
    settings = explain_settings(cfg, threshold)
    roi = read_roi(settings) if settings is not None else None
    pairs = input_pairs(cfg.input.get("pre"), cfg.input.get("post"), cfg.input.get("dir"))
    device = resolve_device(cfg.get("device", "auto"))
    net = load_model(cfg)[0].to(device).eval()
    check_window(net, spec.window)  # before any pair: every pair would fail the same way
    if settings is not None:
        settings.layers(net)  # unknown taps or layers fail before any pair

    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for pair in tqdm(pairs, desc="predict", unit="pair"):
        try:
            result = predict_pair(net, pair, spec, threshold, settings, device, roi)
            files = result.save(output_dir)
        except (ValueError, OSError, RuntimeError) as err:
            log.error("pair %s failed: %s", pair.name, err)
            failed.append(
                {"name": pair.name, "pre": str(pair.pre), "post": str(pair.post), "error": str(err)}
            )
            continue
        row = result.summary()
        row["inputs"] = {
            "pre": str(pair.pre),
            "post": str(pair.post),
            "label": str(pair.label) if pair.label is not None else None,
        }
        row["files"] = files
        rows.append(row)
        del result  # one pair's images and maps in memory at a time

    explained = [r for r in rows if r.get("post_share")]
    report = {
        "checkpoint": str(cfg.ckpt_path),
        "threshold": threshold,
        "sliding_window": OmegaConf.to_container(cfg.sliding_window, resolve=True),
        "probability_encoding": PROBABILITY_ENCODING,
        "explained": settings is not None,
        "mean": {
            "changed_fraction": mean_of([r["changed_fraction"] for r in rows]),
            "faithfulness_gap": mean_of([r.get("faithfulness_gap") for r in rows]),
            "post_share": {
                layer: mean_of([r["post_share"][layer] for r in explained])
                for layer in dict.fromkeys(k for r in explained for k in r["post_share"])
            },
        },
        "pairs": rows,
        "failed": failed,
    }
    write_json(output_dir / "predictions.json", report)
    print(f"predicted {len(rows)} pair(s) into {output_dir}")
    if failed:
        names = ", ".join(f["name"] for f in failed)
        raise PredictionError(
            f"{len(failed)} of {len(pairs)} pair(s) failed and have no outputs ({names}); "
            f"see 'failed' in {output_dir / 'predictions.json'}. First error: {failed[0]['error']}"
        )
    return report

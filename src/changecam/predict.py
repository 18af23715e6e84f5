"""Predict change on image pairs of any size (Hydra, ``conf/predict.yaml``).

``python predict.py ckpt_path=<best.ckpt> input.pre=<file> input.post=<file>`` or
``input.dir=<folder with A/ and B/>`` writes, in the run directory, per pair:

* ``masks/<name>.png``: the binary change mask, 0/255, exactly the input's size;
* ``probabilities/<name>.png``: the change probability as a 16-bit grayscale PNG,
  ``p = value / 65535`` (read it back with :func:`read_probability`);
* ``panels/<name>.png``: the 2x4 explanation panel;

and one ``predictions.json`` with each pair's changed-pixel fraction, post share per layer and
faithfulness gap. Masks and probabilities come from sliding-window inference
(:mod:`changecam.inference`); the panel, the shares and the gap from
:func:`changecam.explain.pipeline.explain_pair`, the code ``explain.py`` runs, on the whole
(padded) image. A pair that fails (e.g. its two dates differ in size) leaves no files; the
others are still predicted, and the command exits with an error naming the failed pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from changecam.utils import CONF_DIR, configure_environment

configure_environment()

import cv2  # noqa: E402
import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from changecam.checkpoint import load_network  # noqa: E402
from changecam.data.io import image_size, read_image, read_label, write_png  # noqa: E402
from changecam.data.layout import Triplet, input_pairs  # noqa: E402
from changecam.data.transforms import image_to_tensor  # noqa: E402
from changecam.explain import per_date_layers  # noqa: E402
from changecam.explain.main import resolve_device  # noqa: E402
from changecam.explain.pipeline import (  # noqa: E402
    ExplainSettings,
    PairExplanation,
    explain_pair,
    settings_from_config,
)
from changecam.inference import SlidingWindow, check_window, sliding_window_logits  # noqa: E402
from changecam.models.taps import find_taps  # noqa: E402
from changecam.utils import log, print_config, task_wrapper, write_json  # noqa: E402

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


def check_pair_sizes(pair: Triplet) -> tuple[int, int]:
    """(height, width) of a pair, read from the file headers; refuses dates of different sizes."""
    pre_size, post_size = image_size(pair.pre), image_size(pair.post)
    if pre_size != post_size:
        raise ValueError(
            f"pair {pair.name!r} refused: {pair.pre} is {pre_size[0]}x{pre_size[1]} but {pair.post} is "
            f"{post_size[0]}x{post_size[1]} (height x width); both dates must have the same size"
        )
    return pre_size


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
    max_explained_pixels: int | None = None,
    max_batch_pixels: int | None = None,
) -> PairPrediction:
    """Everything predict.py computes for one pair, in memory (nothing written yet).

    Args:
        net: the network (eval mode, on ``device``).
        pair: the pair's files.
        spec: sliding-window settings of the mask and probability.
        threshold: probability above which a pixel is change.
        settings: explanation settings; ``None`` skips the explanation.
        device: where to compute.
        max_explained_pixels: larger pairs are not explained (whole-image explanations need
            memory in proportion to the image); ``None``: no limit.
        max_batch_pixels: pixels per counterfactual forward pass of the faithfulness curves;
            caps ``settings.batch_size`` for large pairs (at least one pair per pass).

    Raises:
        ValueError: the two dates differ in size (or an image cannot be read).
    """
    height, width = check_pair_sizes(pair)
    pre, post = read_image(pair.pre), read_image(pair.post)
    if pre.shape != post.shape:  # headers can lie; the decoded arrays decide
        raise ValueError(
            f"pair {pair.name!r} refused: decoded sizes {pre.shape} and {post.shape} differ"
        )
    probability = predict_probability(net, pre, post, spec, device)
    if settings is None:
        return PairPrediction(pair.name, probability, threshold, None, "explain.enabled=false")
    if max_explained_pixels is not None and height * width > max_explained_pixels:
        reason = (
            f"{height}x{width} exceeds explain.max_pixels={max_explained_pixels}; explain a crop "
            "with explain.py or raise the limit"
        )
        return PairPrediction(pair.name, probability, threshold, None, reason)
    label = read_label(pair.label) if pair.label is not None else None  # drawn in the panel
    if label is not None and label.shape != (height, width):
        raise ValueError(
            f"pair {pair.name!r} refused: label {pair.label} is {label.shape}, the images {(height, width)}"
        )
    if max_batch_pixels is not None:
        fitting = max(1, max_batch_pixels // (height * width))
        settings = replace(settings, batch_size=min(settings.batch_size, fitting))
    explained = explain_pair(
        net, pre, post, label=label, name=pair.name, settings=settings, device=device
    )
    return PairPrediction(pair.name, probability, threshold, explained)


def explain_settings(cfg: DictConfig) -> ExplainSettings | None:
    """The explanation settings, or ``None`` when ``explain.enabled=false``."""
    block = cfg.get("explain")
    if not block or not block.get("enabled", True):
        return None
    return settings_from_config(block)


def sliding_window_spec(cfg: DictConfig) -> SlidingWindow:
    """The ``sliding_window`` block as a :class:`SlidingWindow`."""
    return SlidingWindow(**OmegaConf.to_container(cfg.sliding_window, resolve=True))


def mean_of(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


@task_wrapper
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every input pair; write masks, probabilities, panels and ``predictions.json``."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config"):
        print_config(cfg)
    threshold = float(cfg.threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold={threshold} must be a probability in [0, 1)")
    spec = sliding_window_spec(cfg)
    settings = explain_settings(cfg)
    block = cfg.get("explain") or {}
    max_pixels = block.get("max_pixels")
    max_batch_pixels = (block.get("faithfulness") or {}).get("max_batch_pixels")
    if settings is not None and settings.threshold != threshold:
        raise ValueError(
            f"explain.threshold={settings.threshold} differs from threshold={threshold}; "
            "leave explain.threshold at ${threshold}"
        )
    pairs = input_pairs(cfg.input.get("pre"), cfg.input.get("post"), cfg.input.get("dir"))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    device = resolve_device(cfg.get("device", "auto"))
    net = load_network(cfg.ckpt_path, model_cfg).to(device).eval()
    check_window(net, spec.window)  # before any pair: every pair would fail the same way
    if settings is not None and settings.taps is None:  # all that predict reports is per date
        settings = replace(settings, taps=tuple(per_date_layers(find_taps(net))))

    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for pair in tqdm(pairs, desc="predict", unit="pair"):
        try:
            result = predict_pair(
                net, pair, spec, threshold, settings, device, max_pixels, max_batch_pixels
            )
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()

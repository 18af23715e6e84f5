"""Score a trained model on a split: ``python eval.py ckpt_path=<best.ckpt> [data=...]`` (Hydra).

Writes to the run directory:

* ``metrics.json``: change-class ``<split>/{precision,recall,f1,iou,accuracy}`` pooled over every
  pixel of the split (one confusion matrix: the BIT/ChangeFormer protocol), plus, under the
  separate ``seed_style/<split>/...`` keys, the seed notebook's way: scores of consecutive groups
  of ``seed_batch_size`` samples, averaged over the groups;
* ``per_image.csv``: one row per sample (tile, or whole image with sliding windows): ``name``,
  ``TP, FP, FN, TN``, ``F1``, ``IoU`` and the post share of the deepest per-date encoder tap;

and logs the same to the configured logger (scalars; the table too where the logger has
``log_table``, i.e. W&B). ``sliding_window.enabled=true`` scores whole images with
:func:`changecam.inference.sliding_window_logits` instead of the data module's tiles.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from changecam.utils import CONF_DIR, configure_environment

configure_environment()

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from changecam.checkpoint import load_network  # noqa: E402
from changecam.explain import Target, explain_batch, per_date_layers  # noqa: E402
from changecam.explain.pipeline import pad_to_multiple, size_multiple  # noqa: E402
from changecam.inference import SlidingWindow, sliding_window_logits  # noqa: E402
from changecam.metrics import SCORE_NAMES, ChangeScores, confusion_counts, scores_from_counts  # noqa: E402
from changecam.models.taps import find_taps  # noqa: E402
from changecam.utils import (  # noqa: E402
    configure_wandb,
    instantiate_loggers,
    log,
    print_config,
    task_wrapper,
    to_float_dict,
    write_json,
)

EvalSplit = Literal["val", "test"]
SEED_STYLE = "seed_style"


@dataclass(frozen=True)
class ImageScore:
    """One row of ``per_image.csv``."""

    name: str
    TP: int
    FP: int
    FN: int
    TN: int
    F1: float
    IoU: float
    post_share: float


def image_scores(names: Sequence[str], counts: Tensor, shares: Tensor) -> list[ImageScore]:
    """Rows from per-sample ``[TP, FP, FN, TN]`` counts (``N x 4``) and post shares (``N``)."""
    scores = scores_from_counts(*counts.T)
    return [
        ImageScore(
            name,
            *(int(v) for v in counts[i].tolist()),
            F1=float(scores["f1"][i]),
            IoU=float(scores["iou"][i]),
            post_share=float(shares[i]),
        )
        for i, name in enumerate(names)
    ]


def mean_of_group_scores(counts: Tensor, group_size: int) -> dict[str, float]:
    """The seed notebook's figure: scores of consecutive groups of samples, averaged over groups.

    Each group (a "batch" of ``group_size`` samples, the last one possibly smaller) gets its own
    pooled scores; the result is their unweighted mean. Unlike the split-pooled scores it
    depends on the grouping and gives a group without change and without false alarms a
    score of 0 (no true positives possible), which pulls the average down.
    """
    if group_size < 1:
        raise ValueError(f"seed_batch_size={group_size} must be >= 1")
    if counts.ndim != 2 or counts.shape[1] != 4 or len(counts) == 0:
        raise ValueError(f"expected N x 4 confusion counts with N >= 1, got {tuple(counts.shape)}")
    sums = torch.stack([g.sum(0) for g in counts.split(group_size)])
    scores = scores_from_counts(*sums.T)
    return {name: float(scores[name].mean()) for name in SCORE_NAMES}


def deepest_layer(net: nn.Module) -> str:
    """The deepest layer tapped for both dates (``enc4`` for a depth-4 SiameseUNet)."""
    layers = per_date_layers(find_taps(net))
    if not layers:
        raise ValueError(
            f"{type(net).__name__} has no per-date encoder taps (pre/encK, post/encK); "
            "set post_share_layer=null to skip the post share"
        )
    return layers[-1]


def explain_whole(
    net: nn.Module, pre: Tensor, post: Tensor, layer: str, threshold: float
) -> Tensor:
    """Post share of ``layer`` per sample, on whole inputs (reflect-padded to ``2**depth``)."""
    height, width = pre.shape[-2:]
    multiple = size_multiple(net)
    pre, post = pad_to_multiple(pre, multiple), pad_to_multiple(post, multiple)
    valid = None
    if tuple(pre.shape[-2:]) != (height, width):  # the padding is no part of the target
        valid = torch.zeros(pre.shape[-2:], dtype=torch.bool, device=pre.device)
        valid[:height, :width] = True
    explanation = explain_batch(
        net,
        pre,
        post,
        taps=[layer],
        target=Target("predicted", threshold),
        methods=("hirescam",),
        valid=valid,
        upsample=False,
    )
    return explanation.post_share(layer)


class Evaluator(L.LightningModule):
    """Test-loop module: pooled scores, per-sample rows, the seed-style figure.

    Args:
        net: the network (eval mode).
        split: the split's name, used as the metric prefix.
        threshold: probability above which a pixel counts as change.
        sliding_window: if given, whole images are predicted window by window.
        post_share_layer: per-date layer whose post share goes into each row (``None``: skip).
        seed_batch_size: group size of the seed-style mean of per-batch scores.
    """

    def __init__(
        self,
        net: nn.Module,
        split: EvalSplit = "test",
        threshold: float = 0.5,
        sliding_window: SlidingWindow | None = None,
        post_share_layer: str | None = None,
        seed_batch_size: int = 16,
    ) -> None:
        super().__init__()
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold={threshold} must be a probability in [0, 1)")
        if seed_batch_size < 1:
            raise ValueError(f"seed_batch_size={seed_batch_size} must be >= 1")
        self.net = net
        self.split = split
        self.threshold = threshold
        self.sliding_window = sliding_window
        self.post_share_layer = post_share_layer
        self.seed_batch_size = seed_batch_size
        self.scores = ChangeScores(threshold)
        self.names: list[str] = []
        self.counts: list[Tensor] = []
        self.shares: list[Tensor] = []
        self.rows: list[ImageScore] = []

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        if self.sliding_window is not None:
            return sliding_window_logits(self.net, pre, post, self.sliding_window)
        return self.net(pre, post)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        pre, post, mask = batch["pre"], batch["post"], batch["mask"]
        probs = torch.sigmoid(self(pre, post))
        self.scores.update(probs, mask)
        self.counts.append(confusion_counts(probs, mask, self.threshold).cpu())
        self.names.extend(batch["name"])
        if self.post_share_layer is None:
            self.shares.append(torch.full((len(pre),), math.nan))
        else:
            shares = explain_whole(self.net, pre, post, self.post_share_layer, self.threshold)
            self.shares.append(shares.cpu())

    def on_test_epoch_end(self) -> None:
        for name, value in self.scores.compute().items():
            self.log(f"{self.split}/{name}", value)
        counts = torch.cat(self.counts)
        for name, value in mean_of_group_scores(counts, self.seed_batch_size).items():
            self.log(f"{SEED_STYLE}/{self.split}/{name}", value)
        self.log(f"{SEED_STYLE}/batch_size", float(self.seed_batch_size))
        shares = torch.cat(self.shares)
        if self.post_share_layer is not None and (~shares.isnan()).any():
            self.log(f"{self.split}/post_share/{self.post_share_layer}", shares.nanmean())
        self.rows = image_scores(self.names, counts, shares)


def per_image_csv(rows: Sequence[ImageScore], share_column: str) -> str:
    """``per_image.csv`` as text; ``share_column`` names the post-share column."""
    buffer = io.StringIO()
    fields = [f.replace("post_share", share_column) for f in ImageScore.__dataclass_fields__]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        values = asdict(row)
        writer.writerow(
            [
                f"{v:.6f}" if isinstance(v, float) and not math.isnan(v) else v
                for v in values.values()
            ]
        )
    return buffer.getvalue()


def write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def sliding_window_spec(cfg: DictConfig) -> SlidingWindow | None:
    """The ``sliding_window`` config group as a :class:`SlidingWindow`, or ``None`` if disabled."""
    sw = cfg.get("sliding_window")
    if not sw or not sw.get("enabled"):
        return None
    fields = OmegaConf.to_container(sw, resolve=True)
    fields.pop("enabled")
    return SlidingWindow(**fields)


def resolve_share_layer(setting: str | None, net: nn.Module) -> str | None:
    """``auto`` -> the deepest per-date layer; ``None`` -> no post share; else checked as given."""
    if setting is None:
        return None
    if setting == "auto":
        return deepest_layer(net)
    layers = per_date_layers(find_taps(net))
    if setting not in layers:
        raise ValueError(
            f"post_share_layer={setting!r} is not a per-date layer; available: {layers}"
        )
    return setting


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.ckpt_path`` on ``cfg.split``; write ``metrics.json`` and ``per_image.csv``."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config"):
        print_config(cfg)
    split = cfg.get("split", "test")
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} is not allowed; expected val or test")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    net = load_network(cfg.ckpt_path, model_cfg)
    spec = sliding_window_spec(cfg)
    share_layer = resolve_share_layer(cfg.get("post_share_layer", "auto"), net)

    # whole images, one per step, when windows do the cutting
    overrides: dict[str, Any] = {"eval_protocol": "full", "eval_batch_size": 1} if spec else {}
    datamodule = hydra.utils.instantiate(cfg.data, **overrides)
    datamodule.prepare_data()
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()

    module = Evaluator(
        net,
        split=split,
        threshold=cfg.threshold,
        sliding_window=spec,
        post_share_layer=share_layer,
        seed_batch_size=cfg.seed_batch_size,
    )
    configure_wandb(cfg, output_dir)  # W&B run id in the run dir; one group per multirun
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    if trainer.world_size > 1:
        raise ValueError("eval.py runs on one device; set trainer.devices=1 (and no ddp trainer)")
    hparams = {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
        for k, v in cfg.items()
        if k != "hydra"
    }
    for logger in loggers:
        logger.log_hyperparams(hparams)
    metrics = to_float_dict(trainer.test(module, dataloaders=loader, verbose=False)[0])

    share_column = f"post_share_{share_layer}" if share_layer else "post_share"
    columns = [c.replace("post_share", share_column) for c in ImageScore.__dataclass_fields__]
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(
                key=f"{split}/per_image",
                columns=columns,
                data=[list(asdict(r).values()) for r in module.rows],
            )
    write_text(output_dir / "per_image.csv", per_image_csv(module.rows, share_column))
    write_json(output_dir / "metrics.json", metrics)
    log.info("run directory: %s", output_dir)
    print(f"run directory: {output_dir}")
    pooled = ", ".join(f"{k}={metrics[f'{split}/{k}']:.4f}" for k in SCORE_NAMES)
    print(f"{split} (pooled over all pixels): {pooled}")
    seed = ", ".join(f"{k}={metrics[f'{SEED_STYLE}/{split}/{k}']:.4f}" for k in SCORE_NAMES)
    print(f"{split} (seed style, mean over batches of {cfg.seed_batch_size}): {seed}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()

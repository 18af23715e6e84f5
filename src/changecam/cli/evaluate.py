"""Score a trained model on a split: ``python eval.py ckpt_path=<best.ckpt> [data=...]`` (Hydra).

eval.py runs the test (or validation) loop of the same
:class:`~changecam.training.module.ChangeDetectionModule` that ``train.py`` tests with, so its
``<split>/{precision,recall,f1,iou,accuracy}`` (pooled over every pixel of the split: the
BIT/ChangeFormer protocol) are train's numbers for the same checkpoint and data. With
``sliding_window.enabled=true`` the module's network is a
:class:`~changecam.models.SlidingWindowNet` over whole images. The
:class:`~changecam.evaluation.per_image.PerImageScores` callback adds, in the run directory:

* ``metrics.json``: the pooled scores plus, under the separate ``seed_style/<split>/...`` keys,
  the seed notebook's way (scores of consecutive groups of ``seed_batch_size`` samples,
  averaged over the groups) and ``<split>/post_share/<layer>``;
* ``per_image.csv``: one row per sample (tile, or whole image with sliding windows): ``name``,
  ``TP, FP, FN, TN``, ``F1``, ``IoU`` and the post share of one per-date layer;

and logs the same to the configured logger (scalars; the table too where the logger has
``log_table``, i.e. W&B).
"""

from __future__ import annotations

from typing import Any, Literal

import hydra
import lightning as L
from omegaconf import DictConfig

from changecam.atomic import write_json, write_text
from changecam.cli.common import (
    checked_choice,
    checked_threshold,
    instantiate_loggers,
    instantiate_refusing,
    load_model,
    log,
    log_hyperparameters,
    prepare_run,
    resolve_device,
    run_threshold,
    sliding_window_spec,
    task_wrapper,
    to_float_dict,
    warn_split_scale,
)
from changecam.cli.config_checks import ConfigError
from changecam.cli.hydra_callbacks import one_of_several
from changecam.evaluation.per_image import SEED_STYLE, PerImageScores, check_seed_batch_size
from changecam.explain import choose_layer, per_date_layers, resolve_taps
from changecam.metrics import SCORE_NAMES
from changecam.models import SlidingWindowNet
from changecam.training.module import ChangeDetectionModule

EvalSplit = Literal["val", "test"]


def eval_checks(cfg: DictConfig) -> None:
    """eval.py's own values: refused before anything is removed or built."""
    if one_of_several():  # each task would score the split and write the same results
        raise ConfigError(
            "eval.py runs as one process on one device, but this process is one of several "
            "launched for one job (SLURM tasks, torchrun): run it as one task "
            "(hydra.launcher.gpus_per_node=1 trainer.num_nodes=1 with the SLURM launcher, "
            "torchrun --nproc_per_node=1)"
        )
    checked_choice(cfg.get("split", "test"), EvalSplit, "split")
    checked_threshold(cfg.threshold)
    resolve_device(cfg.get("device", "auto"))
    sliding_window_spec(cfg)
    check_seed_batch_size(cfg.get("seed_batch_size", 16))


def post_share_layer(cfg: DictConfig, net: Any) -> str | None:
    """The per-date layer of ``per_image.csv``'s post share (``None`` with
    ``post_share=false``); refuses a ``post_share_layer`` the network does not have."""
    if not cfg.get("post_share", True):
        return None
    layers = per_date_layers(resolve_taps(net, shared=True))  # the input layer included
    return choose_layer(layers, cfg.get("post_share_layer"), "post_share_layer")


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.ckpt_path`` on ``cfg.split``; write ``metrics.json`` and ``per_image.csv``."""
    loaded: dict[str, Any] = {}

    def checks(cfg: DictConfig) -> None:
        # the command's own values, then the network: its layer and windows, judged before an
        # earlier run's results are removed
        eval_checks(cfg)
        net, loaded["hparams"] = load_model(cfg)
        loaded["share_layer"] = post_share_layer(cfg, net)
        spec = sliding_window_spec(cfg)
        loaded["net"], loaded["windowed"] = net, SlidingWindowNet(net, spec) if spec else None

    output_dir = prepare_run(
        cfg, results=("metrics.json", "per_image.csv"), checks=checks, one_device=True
    )
    net, hparams, share_layer = loaded["net"], loaded["hparams"], loaded["share_layer"]
    split = checked_choice(cfg.get("split", "test"), EvalSplit, "split")
    given = checked_threshold(cfg.threshold)
    device = resolve_device(cfg.get("device", "auto"))
    threshold = run_threshold(given, hparams)
    spec = sliding_window_spec(cfg)
    module = ChangeDetectionModule(
        loaded["windowed"] or net,
        loss=hparams.get("loss"),
        pos_weight=hparams.get("pos_weight"),
        threshold=threshold,
    )
    per_image = PerImageScores(
        net, threshold, post_share_layer=share_layer, seed_batch_size=cfg.seed_batch_size
    )

    # whole images, one per step, when windows do the cutting
    overrides: dict[str, Any] = {"eval_protocol": "full", "eval_batch_size": 1} if spec else {}
    datamodule = instantiate_refusing(cfg.data, **overrides)
    datamodule.prepare_data()  # before the scale check lists the split's files
    warn_split_scale(cfg.ckpt_path, hparams, datamodule, split, "eval.py", spec is not None)
    loggers = instantiate_loggers(cfg.get("logger"), "eval")
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[per_image],
        accelerator=device.type,
        # one device, whatever trainer= says (a ddp trainer's strategy ran one process as DDP,
        # warning about every metric's sync_dist)
        devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
        strategy="auto",
        num_nodes=1,
        sync_batchnorm=False,
    )
    # what it scores with: the threshold, loss and pos_weight its config leaves to the checkpoint
    used = {k: module.hparams.get(k) for k in ("loss", "pos_weight", "threshold")}
    log_hyperparameters(loggers, cfg, {"threshold": threshold, "module": used})
    run_loop = trainer.test if split == "test" else trainer.validate
    metrics: dict[str, float | None] = {
        **to_float_dict(run_loop(module, datamodule=datamodule, verbose=False)[0]),
        **dict.fromkeys(per_image.undefined),  # null in metrics.json: nothing was predicted
    }

    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(
                key=f"{split}/per_image", columns=per_image.columns(), data=per_image.table()
            )
    write_text(output_dir / "per_image.csv", per_image.csv_text())
    write_json(output_dir / "metrics.json", metrics)
    log.info("run directory: %s", output_dir)
    pooled = ", ".join(f"{k}={metrics[f'{split}/{k}']:.4f}" for k in SCORE_NAMES)
    print(f"{split} (pooled over all pixels): {pooled}")
    seed = ", ".join(f"{k}={metrics[f'{SEED_STYLE}/{split}/{k}']:.4f}" for k in SCORE_NAMES)
    print(f"{split} (seed style, mean over batches of {cfg.seed_batch_size}): {seed}")
    return metrics

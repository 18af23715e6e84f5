"""Loop overhead: an epoch of the quickstart model through ``Trainer.fit`` versus plain PyTorch.

The quickstart experiment (``experiment=quickstart``: synthetic data, the small shared-encoder
U-Net, CPU) is composed with Hydra, its data written to a temporary folder. From the same
initial weights and the same seed, i.e. on the same batches:

* **plain**: a hand-written loop -- ``module(pre, post)``, ``module.compute_loss``, backward,
  optimiser step over the training loader, then the validation forward, loss and pooled
  scores, then the scheduler step;
* **fit**: ``Trainer.fit`` for one epoch with Lightning alone (no logger, no callbacks, no
  sanity check): the module's own ``self.log`` calls are the only logging;
* **fit + <callback>** for each default callback of the experiment, **fit + logger** for its
  logger, and **fit (quickstart defaults)** with all of them and the sanity check.

The epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training and
validation) inside ``fit``, and the same span in the plain loop; ``fit`` set-up (sanity check,
logger start, model summary) is reported separately as ``fit_total_vs_plain_loop``. Repeats
alternate between the variants; medians are compared. The plain loop and the bare ``fit`` must
end with the same weights (``same_computation``), or the comparison is void.

Last line: ``{"fit_vs_plain_loop", "fit_defaults_vs_plain_loop", "callback_cost", ...}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from common import emit, machine, median, timed
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, ProgressBar
from omegaconf import DictConfig, open_dict

from changecam.utils import CONF_DIR, close_wandb, instantiate_loggers

SEED = 1234
TINY = [
    "data.synthetic.image_size=64",
    "data.synthetic.train=4",
    "data.synthetic.val=2",
    "data.synthetic.test=2",
    "data.patch_size=32",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "model.base_channels=4",
    "model.depth=2",
    "logger=csv",
]


def quickstart_config(tmp: Path, overrides: list[str]) -> DictConfig:
    """``experiment=quickstart`` as ``train.py`` composes it, with every path under ``tmp``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=["experiment=quickstart", *overrides], return_hydra_config=True
        )
        HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp)
        cfg.paths.data_dir = str(tmp / "data")
        cfg.paths.log_dir = str(tmp / "logs")
        cfg.paths.output_dir = str(tmp / "run")
    return cfg


class EpochTimer(Callback):
    """Wall-clock seconds of each training epoch (validation included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.start)


class Runner:
    """Builds identical starting points (weights, data, RNG) and runs one epoch each way."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        hydra.utils.instantiate(cfg.data).prepare_data()
        torch.manual_seed(SEED)
        self.initial = self.build().state_dict()
        self.steps = 0  # training steps per epoch, counted by the plain loop

    def build(self) -> L.LightningModule:
        net = hydra.utils.instantiate(self.cfg.model)
        return hydra.utils.instantiate(self.cfg.module, net=net)

    def start(self) -> tuple[L.LightningModule, L.LightningDataModule]:
        """Same weights, fresh data caches, same RNG state: the same batches every time."""
        module = self.build()
        module.load_state_dict(self.initial)
        datamodule = hydra.utils.instantiate(self.cfg.data)
        torch.manual_seed(SEED)
        return module, datamodule

    def plain(self) -> tuple[float, float, dict[str, torch.Tensor]]:
        """(epoch seconds, total seconds, final weights) of the hand-written loop."""
        module, dm = self.start()
        begin = time.perf_counter()
        dm.setup("fit")
        config = module.configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
        train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
        train_loader.sampler.set_epoch(0)
        scores = module.metrics["val"]
        epoch_start = time.perf_counter()
        module.train()
        for self.steps, batch in enumerate(train_loader, 1):
            loss = module.compute_loss(module(batch["pre"], batch["post"]), batch["mask"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        module.eval()
        with torch.inference_mode():
            for batch in val_loader:
                logits = module(batch["pre"], batch["post"])
                module.compute_loss(logits, batch["mask"])
                scores.update(torch.sigmoid(logits), batch["mask"])
            scores.compute()
            scores.reset()
        if scheduler is not None:
            scheduler.step()
        end = time.perf_counter()
        return end - epoch_start, end - begin, module.state_dict()

    def fit(
        self, callbacks: list[Callback], loggers: list[Any], sanity: bool
    ) -> tuple[float, float, dict[str, torch.Tensor]]:
        """(epoch seconds, total seconds, final weights) of ``Trainer.fit`` for one epoch."""
        module, dm = self.start()
        timer = EpochTimer()
        has = lambda kind: any(isinstance(c, kind) for c in callbacks)  # noqa: E731
        trainer = hydra.utils.instantiate(
            self.cfg.trainer,
            max_epochs=1,
            min_epochs=1,
            callbacks=[*callbacks, timer],
            logger=loggers or False,
            enable_checkpointing=has(ModelCheckpoint),
            enable_progress_bar=has(ProgressBar),
            enable_model_summary=has(ModelSummary),
            num_sanity_val_steps=None if sanity else 0,
            default_root_dir=self.cfg.paths.output_dir,
        )
        try:
            total, _ = timed(lambda: trainer.fit(module, datamodule=dm))
        finally:
            close_wandb()
        return timer.seconds[0], total, module.state_dict()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-breakdown", dest="breakdown", action="store_false", help="skip fit + each callback"
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of the quickstart")
    args = parser.parse_args(argv)
    if args.tiny:
        args.breakdown = False
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    repeats = 1 if args.tiny else args.repeats

    with tempfile.TemporaryDirectory(prefix="changecam-loop-") as tmp:
        cfg = quickstart_config(Path(tmp), overrides)
        runner = Runner(cfg)
        callback_cfgs = {
            name: c for name, c in (cfg.get("callbacks") or {}).items() if c and "_target_" in c
        }

        def variant(names: list[str], logger: bool, sanity: bool) -> Callable[[], tuple]:
            def run() -> tuple:
                callbacks = [hydra.utils.instantiate(callback_cfgs[n]) for n in names]
                loggers = instantiate_loggers(cfg.get("logger")) if logger else []
                return runner.fit(callbacks, loggers, sanity)

            return run

        variants: dict[str, Callable[[], tuple]] = {
            "plain": runner.plain,
            "fit": variant([], logger=False, sanity=False),
            "fit (quickstart defaults)": variant(list(callback_cfgs), logger=True, sanity=True),
        }
        if args.breakdown:
            variants |= {f"fit + {n}": variant([n], False, False) for n in callback_cfgs}
            variants["fit + logger"] = variant([], logger=True, sanity=False)
        epoch: dict[str, list[float]] = {name: [] for name in variants}
        total: dict[str, list[float]] = {name: [] for name in variants}
        errors: dict[str, str] = {}
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for repeat in range(repeats):
            for name, run in variants.items():
                if name in errors:
                    continue
                try:
                    epoch_s, total_s, weights[name] = run()
                except Exception as err:  # a callback under construction must not hide the rest
                    traceback.print_exc()
                    errors[name] = f"{type(err).__name__}: {err}"
                    continue
                epoch[name].append(epoch_s)
                total[name].append(total_s)
                print(
                    f"repeat {repeat}: {name:>28}  epoch {epoch_s:6.2f} s  total {total_s:6.2f} s"
                )

    plain = median(epoch["plain"])
    ratio = {name: round(median(v) / plain, 3) for name, v in epoch.items() if v}
    difference = max_difference(weights["plain"], weights["fit"])
    figures = {
        "fit_vs_plain_loop": ratio["fit"],
        "fit_defaults_vs_plain_loop": ratio.get("fit (quickstart defaults)"),
        "fit_total_vs_plain_loop": round(median(total["fit"]) / median(total["plain"]), 3),
        "fit_defaults_total_vs_plain_loop": round(
            median(total["fit (quickstart defaults)"]) / median(total["plain"]), 3
        )
        if total["fit (quickstart defaults)"]
        else None,
        "fit_overhead_ms_per_step": round((median(epoch["fit"]) - plain) / runner.steps * 1e3, 2),
        "callback_cost": {
            name.removeprefix("fit + "): round(r - ratio["fit"], 3)
            for name, r in ratio.items()
            if name.startswith("fit + ")
        },
        "epoch_s": {name: round(median(v), 3) for name, v in epoch.items() if v},
        "same_computation": difference < 1e-4,
        "max_weight_difference": difference,
        "errors": errors,
        "setup": {
            "experiment": "quickstart",
            "overrides": overrides,
            "train_steps_per_epoch": runner.steps,
            "repeats": repeats,
            "callbacks": list(callback_cfgs),
            "logger": list((cfg.get("logger") or {}).keys()),
        },
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()

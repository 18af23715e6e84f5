"""Loop overhead: an epoch of the quickstart model through ``Trainer.fit`` versus plain PyTorch.

The quickstart experiment (``experiment=quickstart``: synthetic data, the small shared-encoder
U-Net, CPU) is composed with Hydra, its data written to a temporary folder. From the same
initial weights and the same seed, i.e. on the same batches:

* **plain**: a hand-written loop -- ``module(pre, post)``, ``module.compute_loss``, backward,
  optimiser step over the training loader, then the validation forward, loss and pooled
  scores, then the scheduler step;
* **fit**: ``Trainer.fit`` for one epoch with Lightning alone (no logger, no callbacks, no
  sanity check): the module's own ``self.log`` calls are its only logging;
* **fit (quickstart defaults)**: with the experiment's callbacks, logger and sanity check, as
  ``make train`` runs it. The time spent inside each callback's and logger's hooks is measured
  directly (their methods are wrapped with timers), so each one's cost is attributed exactly
  in one run instead of from differences of noisy epochs;
* **overhead probe**: plain and bare ``fit`` again with a network so small (``PROBE``) that a
  step costs almost nothing, which gives Lightning's own cost per step in milliseconds
  (``fit_overhead_ms_per_step``): what it adds to any step, e.g. a fast GPU step.

The epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training and
validation) inside ``fit``, and the same span in the plain loop; the set-up of ``fit``
(sanity check, logger start, model summary) shows in the ``*_total_*`` figures. Repeats
alternate between the variants and the best (shortest) of them are compared, as ``timeit``
does: interference from other processes only ever adds time. The slow fit with the defaults
(W&B start-up, CAM panels) runs once by default (``--defaults-repeats``) to keep ``make bench``
short. The plain loop and the bare ``fit``
must end with the same weights (``same_computation``), or the comparison is void.

Times are the process's **CPU time** (wall-clock ratios are reported too, ``*_wall_clock``),
and torch runs one thread (``--threads``): the benchmark must mean something on a 2-core
machine that other jobs share, where two OpenMP threads made step times up to 9x slower and
wall-clock epochs varied by +-30 % between repeats. With one thread and nothing else
running, CPU time and wall-clock time agree.

Last line: ``{"fit_vs_plain_loop", "fit_defaults_vs_plain_loop", "callback_cost", ...}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from common import TINY_QUICKSTART, emit, machine, quickstart_config
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, ProgressBar
from omegaconf import DictConfig

from changecam.cli.common import close_wandb

SEED = 1234
# The overhead probe: 32² tiles of 12 (val: 3) quickstart images, unaugmented, through a
# width-4, depth-2 network, so that a step costs little and the loop's own cost per step shows.
PROBE = [
    "model.base_channels=4",
    "model.depth=2",
    "data.patch_size=32",
    "data.augment=null",
    "data.synthetic.train=12",
    "data.synthetic.val=3",
]
TINY = TINY_QUICKSTART


CPU, WALL = 0, 1  # the two clocks of a (cpu, wall) pair


def now() -> tuple[float, float]:
    """(CPU seconds of this process, wall-clock seconds)."""
    return time.process_time(), time.perf_counter()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    """(CPU, wall) seconds since ``start`` (from :func:`now`)."""
    cpu, wall = now()
    return cpu - start[0], wall - start[1]


class HookTimer:
    """CPU seconds spent inside the hooks of callbacks and loggers, per object name."""

    CALLBACK_HOOKS = tuple(n for n in dir(Callback) if n.startswith("on_")) + ("setup", "teardown")
    LOGGER_HOOKS = ("log_hyperparams", "log_metrics", "log_graph", "save", "finalize")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, obj: Any, hooks: tuple[str, ...]) -> Any:
        """Replace ``obj``'s hook methods by timed ones (on the instance only); return ``obj``."""
        for hook in hooks:
            method = getattr(obj, hook, None)
            if callable(method):
                setattr(obj, hook, self._timed(name, method))
        return obj

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.process_time() - start

        return run


class EpochTimer(Callback):
    """Wall-clock seconds of the training epoch (validation included), and the hook time in it."""

    def __init__(self, hooks: HookTimer) -> None:
        self.hooks = hooks
        self.seconds = (0.0, 0.0)
        self.in_hooks: dict[str, float] = {}
        self._start = (0.0, 0.0)
        self._at_start: dict[str, float] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._at_start = dict(self.hooks.seconds)
        self._start = now()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seconds = elapsed(self._start)
        self.in_hooks = {k: v - self._at_start.get(k, 0.0) for k, v in self.hooks.seconds.items()}


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

    def plain(self) -> dict:
        """One epoch of the hand-written loop: epoch and total seconds, final weights."""
        module, dm = self.start()
        begin = now()
        dm.setup("fit")
        config = module.configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
        train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
        train_loader.sampler.set_epoch(0)
        scores = module.metrics["val"]
        epoch_start = now()
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
        epoch, total = elapsed(epoch_start), elapsed(begin)
        return {"epoch": epoch, "total": total, "weights": module.state_dict()}

    def fit(self, callbacks: dict[str, Callback], loggers: dict[str, Any], sanity: bool) -> dict:
        """One epoch of ``Trainer.fit``: epoch and total seconds, hook seconds, final weights."""
        module, dm = self.start()
        hooks = HookTimer()
        for name, callback in callbacks.items():
            hooks.wrap(name, callback, HookTimer.CALLBACK_HOOKS)
        for name, logger in loggers.items():
            hooks.wrap(f"logger/{name}", logger, HookTimer.LOGGER_HOOKS)
        timer = EpochTimer(hooks)
        has = lambda kind: any(isinstance(c, kind) for c in callbacks.values())  # noqa: E731
        trainer = hydra.utils.instantiate(
            self.cfg.trainer,
            max_epochs=1,
            min_epochs=1,
            callbacks=[*callbacks.values(), timer],
            logger=list(loggers.values()) or False,
            enable_checkpointing=has(ModelCheckpoint),
            enable_progress_bar=has(ProgressBar),
            enable_model_summary=has(ModelSummary),
            num_sanity_val_steps=None if sanity else 0,
            default_root_dir=self.cfg.paths.output_dir,
        )
        begin = now()
        try:
            trainer.fit(module, datamodule=dm)
        finally:
            close_wandb()
        total = elapsed(begin)
        return {
            "epoch": timer.seconds,
            "total": total,
            "hooks_in_epoch": timer.in_hooks,
            "hooks_total": dict(hooks.seconds),
            "weights": module.state_dict(),
        }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="of plain and bare fit")
    parser.add_argument(
        "--defaults-repeats", type=int, default=1, help="of the fit with the quickstart defaults"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see above)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of the quickstart")
    args = parser.parse_args(argv)
    # With one torch thread on 2 cores, the CAM callback's auto mode would explain in a background
    # process, whose CPU time this process's clock does not see: keep it inline so its work
    # counts (benchmarks/cam_callback.py measures the background mode).
    overrides = [*(TINY if args.tiny else []), "callbacks.cam_panels.mode=inline", *args.overrides]
    repeats = 1 if args.tiny else args.repeats
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        runs, runner, errors = measure(overrides, repeats, min(repeats, args.defaults_repeats))
        probe, probe_runner, _ = measure([*overrides, *PROBE], repeats, defaults_repeats=0)
    finally:
        torch.set_num_threads(threads)

    def best(variant: str, key: str, clock: int = CPU, runs: dict = runs) -> float:
        return min(r[key][clock] for r in runs[variant])

    def ratio(variant: str, key: str = "epoch", clock: int = CPU) -> float | None:
        if not runs[variant]:
            return None
        return round(best(variant, key, clock) / best("plain", key, clock), 3)

    defaults = "fit (quickstart defaults)"
    plain = best("plain", "epoch")
    names = list(runs[defaults][0]["hooks_total"]) if runs[defaults] else []
    in_epoch = {n: min(r["hooks_in_epoch"].get(n, 0.0) for r in runs[defaults]) for n in names}
    outside = {
        n: min(r["hooks_total"][n] - r["hooks_in_epoch"].get(n, 0.0) for r in runs[defaults])
        for n in names
    }
    difference = max_difference(runs["plain"][-1]["weights"], runs["fit"][-1]["weights"])
    figures = {
        "fit_vs_plain_loop": ratio("fit"),
        "fit_defaults_vs_plain_loop": ratio(defaults),
        "fit_total_vs_plain_loop": ratio("fit", "total"),
        "fit_defaults_total_vs_plain_loop": ratio(defaults, "total"),
        "fit_vs_plain_loop_wall_clock": ratio("fit", clock=WALL),
        "fit_defaults_vs_plain_loop_wall_clock": ratio(defaults, clock=WALL),
        "fit_overhead_ms_per_step": round(
            (best("fit", "epoch", runs=probe) - best("plain", "epoch", runs=probe))
            / probe_runner.steps
            * 1e3,
            3,
        ),
        "probe_fit_vs_plain_loop": round(
            best("fit", "epoch", runs=probe) / best("plain", "epoch", runs=probe), 3
        ),
        # CPU seconds inside each callback's/logger's hooks during the epoch, over the plain epoch
        "callback_cost": {n: round(v / plain, 4) for n, v in in_epoch.items()},
        "callback_setup_s": {n: round(v, 3) for n, v in outside.items()},
        "epoch_cpu_s": {n: round(best(n, "epoch"), 3) for n in runs if runs[n]},
        "epoch_wall_s": {n: round(best(n, "epoch", WALL), 3) for n in runs if runs[n]},
        "same_computation": difference < 1e-4,
        "max_weight_difference": difference,
        "errors": errors,
        "setup": {
            "experiment": "quickstart",
            "overrides": overrides,
            "train_steps_per_epoch": runner.steps,
            "probe": {"overrides": PROBE, "train_steps_per_epoch": probe_runner.steps},
            "repeats": repeats,
            "defaults_repeats": len(runs["fit (quickstart defaults)"]),
            "torch_threads": args.threads,
            "clock": "process CPU time (wall-clock ratios: *_wall_clock)",
            "callbacks": [n for n in names if not n.startswith("logger/")],
            "loggers": [n for n in names if n.startswith("logger/")],
        },
        "machine": machine(),
    }
    emit(figures)
    return figures


def measure(
    overrides: list[str], repeats: int, defaults_repeats: int
) -> tuple[dict[str, list[dict]], Runner, dict[str, str]]:
    """Run the variants ``repeats`` times, alternating; their results and any errors."""
    with tempfile.TemporaryDirectory(prefix="changecam-loop-") as tmp:
        cfg = quickstart_config(Path(tmp), overrides)
        runner = Runner(cfg)
        callback_cfgs = {
            name: c for name, c in (cfg.get("callbacks") or {}).items() if c and "_target_" in c
        }
        logger_cfgs = {
            name: c for name, c in (cfg.get("logger") or {}).items() if c and "_target_" in c
        }

        def defaults() -> dict:
            callbacks = {n: hydra.utils.instantiate(c) for n, c in callback_cfgs.items()}
            loggers = {n: hydra.utils.instantiate(c) for n, c in logger_cfgs.items()}
            return runner.fit(callbacks, loggers, sanity=True)

        variants: dict[str, Callable[[], dict]] = {
            "plain": runner.plain,
            "fit": lambda: runner.fit({}, {}, sanity=False),
        }
        if defaults_repeats:
            variants["fit (quickstart defaults)"] = defaults
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        errors: dict[str, str] = {}
        for repeat in range(repeats):
            for name, run in variants.items():
                if name in errors or (
                    name == "fit (quickstart defaults)" and repeat >= defaults_repeats
                ):
                    continue
                try:
                    result = run()
                except Exception as err:  # a callback under construction must not hide the rest
                    if name != "fit (quickstart defaults)":
                        raise
                    traceback.print_exc()
                    errors[name] = f"{type(err).__name__}: {err}"
                    continue
                runs[name].append(result)
                cpu, wall = result["epoch"]
                print(f"repeat {repeat}: {name:>26}  epoch {cpu:6.2f} s CPU, {wall:6.2f} s wall")
    return runs, runner, errors


if __name__ == "__main__":
    main()

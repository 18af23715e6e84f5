"""Train a change detector: ``python train.py experiment=quickstart`` (Hydra, ``conf/train.yaml``)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from changecam.atomic import write_json
from changecam.cli.common import (
    configure_wandb,
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_refusing,
    log,
    log_hyperparameters,
    log_summary,
    override_key,
    prepare_run,
    remove_earlier_results,
    start_history,
    task_wrapper,
    to_float_dict,
    unlogged,
)
from changecam.cli.config_checks import ConfigError
from changecam.cli.ddp import ddp_job, in_sweep
from changecam.cli.launch import is_rank_zero
from changecam.data.validate import network_fit
from changecam.metrics import SCORE_NAMES
from changecam.training.callbacks.finite_checkpoint import top_k_problem
from changecam.training.checkpoint import CheckpointError, check_resume_checkpoint
from changecam.training.csv_logger import CSVLogger
from changecam.training.loop_state import LoopState, read_loop_state
from changecam.training.module import pos_weight_problem, stopped_early
from changecam.training.sigterm import take_sigterm_quietly


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``"last"`` means this run directory's ``checkpoints/last.ckpt``.

    In a sweep, a job without one (it had not started when the sweep was stopped) starts from
    the beginning, as long as some job of the sweep folder has one (a mistyped
    ``hydra.sweep.dir`` is refused). A SLURM job requeued after a timeout or preemption
    (``SLURM_RESTART_COUNT`` > 0) resumes from its own ``last.ckpt`` when it has one, whatever
    ``ckpt_path`` it was started with.
    """
    last = output_dir / "checkpoints" / "last.ckpt"
    requeued = os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")
    if requeued and last.is_file():
        log.info(
            "SLURM requeued this job (SLURM_RESTART_COUNT=%s): resuming from %s",
            os.environ["SLURM_RESTART_COUNT"],
            last,
        )
        return str(last)
    if ckpt_path == "last":
        if last.is_file():
            return str(last)
        if in_sweep() and list(output_dir.parent.glob("*/checkpoints/last.ckpt")):
            log.info("ckpt_path=last: %s has no last.ckpt, so this job starts anew", output_dir)
            return None
        where = (
            f"no job of the sweep folder {output_dir.parent} has one (run with "
            "hydra.sweep.dir=<the old sweep dir>)"
            if in_sweep()
            else "run with hydra.run.dir=<the old run dir>"
        )
        raise FileNotFoundError(f"ckpt_path=last but {last} does not exist ({where})")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


SCORED_WITH = ("loss", "pos_weight", "threshold")  # the module settings behind a run's scores


def score_as_trained(cfg: DictConfig, path: str) -> None:
    """A run that goes on from ``path`` (``train=false`` scoring it, or a resume) uses the
    ``module.loss``, ``module.pos_weight`` and ``module.threshold`` it was trained and scored
    with (as eval.py does), set in ``cfg.module`` so that the CAM panels' threshold follows.
    Lightning restores only the weights; the composed config's values would score (and train)
    it otherwise than its own run did. A value given on the command line (a sweep's too) is
    used as given, with a warning where it differs from the checkpoint's."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    recorded = ckpt.get("hyper_parameters") or {}
    given = command_line_keys()
    run = "the resumed run" if cfg.get("train") else "train=false"
    warn = log.warning if is_rank_zero() else log.debug  # every DDP rank adopts; one says so
    for key in SCORED_WITH:
        if key not in recorded or cfg.module.get(key) == recorded[key]:
            continue
        if f"module.{key}" in given:
            warn(
                "%s was trained and scored with module.%s=%s; %s uses module.%s=%s as given",
                path,
                key,
                recorded[key],
                run,
                key,
                cfg.module.get(key),
            )
            continue
        warn(
            "%s uses %s's module.%s=%s, as it was trained and scored (the config's %s is not "
            "used; give module.%s=<value> for another)",
            run,
            path,
            key,
            recorded[key],
            cfg.module.get(key),
            key,
        )
        cfg.module[key] = recorded[key]


def command_line_keys() -> set[str]:
    """The config keys this run's command line (or its sweep job) sets."""
    if not HydraConfig.initialized():
        return set()
    task = HydraConfig.get().overrides.task
    return {override_key(o) for o in task if not o.startswith("~")}


def run_splits(cfg: DictConfig) -> list[str]:
    """The data splits a run uses: train (if it fits), val, and test (if it tests)."""
    return [*(["train"] if cfg.get("train") else []), "val", *(["test"] if cfg.get("test") else [])]


def checked_resume_path(cfg: DictConfig, net: Any, output_dir: Path) -> str | None:
    """``ckpt_path`` resolved and checked as eval and predict check a checkpoint (readable,
    weights only, finite, fitting the ``model`` config, with the overrides that fit), before
    Lightning reads it; ``None`` when not resuming.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: what is wrong with it, naming ``ckpt_path``.
    """
    path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if path is None:
        return None
    try:
        check_resume_checkpoint(path, net)
    except CheckpointError as err:
        what = "resume" if cfg.get("train") else "score (train=false)"
        raise CheckpointError(f"cannot {what} ckpt_path: {err}") from None
    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    state = read_loop_state(path) if cfg.get("train") else None
    if state is not None and max_steps not in (None, -1):
        epoch = epoch_to_go_on_from(
            state,
            max_steps,
            trainer.get("max_epochs"),
            trainer.get("min_epochs"),
            trainer.get("min_steps"),
        )
        if epoch is not None:
            cut = state.cut
            saved = (
                f"when the fit was stopped after {cut[1]} batch(es) of epoch {epoch}, as that "
                "epoch's end"
                if cut is not None
                else f"at the end of epoch {epoch}"
            )
            raise CheckpointError(
                f"cannot resume ckpt_path={path} with trainer.max_steps={max_steps}: it was saved "
                f"{saved}, and Lightning resumes a fit that counts steps "
                "inside that epoch again (its end-of-epoch callbacks run twice: early stopping "
                "fails, and the run drifts from an uninterrupted one); resume without "
                "trainer.max_steps (trainer.max_epochs ends the run), or from a checkpoint saved "
                "inside an epoch"
            )
    cut = state.cut if state is not None and max_steps in (None, -1) else None
    if cut is not None:
        log.warning(
            "%s was saved when the fit was stopped (trainer.max_steps or trainer.max_time) after "
            "%d batch(es) of epoch %d: Lightning counts that epoch as trained, so the rest of "
            "epoch %d is not trained (a run that trains on starts epoch %d, and differs from one "
            "never stopped)",
            path,
            cut[1],
            cut[0],
            cut[0],
            cut[0] + 1,
        )
    return path


def epoch_to_go_on_from(
    state: LoopState,
    max_steps: int,
    max_epochs: int | None,
    min_epochs: int | None = None,
    min_steps: int | None = None,
) -> int | None:
    """The epoch a checkpoint was saved at the end of (:attr:`LoopState.at_epoch_end`), when
    the run goes on from there (under ``max_steps`` and ``max_epochs``, and not stopped early:
    Lightning stops early only past ``min_epochs`` and ``min_steps``); ``None`` otherwise
    (saved inside an epoch, a finished run, which Lightning only scores, or no loop state)."""
    if not state.at_epoch_end:
        return None
    processed, global_step = state.epochs["processed"], state.global_step or 0
    done = global_step >= max_steps or (max_epochs not in (None, -1) and processed >= max_epochs)
    stopped = any(
        "EarlyStopping" in name
        and isinstance(callback, dict)
        and stopped_early(callback.get("stopping_reason"), callback.get("stopped_epoch", 0))
        for name, callback in state.callbacks.items()
    )
    may_stop = (min_epochs in (None, -1) or processed >= min_epochs) and (
        min_steps in (None, -1) or global_step >= min_steps
    )
    return None if done or (stopped and may_stop) else state.epochs["completed"]


def build_module(cfg: DictConfig, net: Any, **overrides: Any) -> L.LightningModule:
    """The ``module`` config built around ``net``; its own refusals (a ``module.init_from``
    that does not fit, an unknown ``module.freeze`` name) are raised as they are."""
    return instantiate_refusing(cfg.module, net=net, **overrides)


def train_checks(cfg: DictConfig) -> None:
    """train.py's own refusals, before anything is written."""
    check_optimized_metric(cfg, sweep=in_sweep())
    panels = OmegaConf.select(cfg, "callbacks.cam_panels.explain", default=None)
    if isinstance(panels, DictConfig) and "threshold" in panels:  # the callback passes its own
        raise ConfigError(
            f"callbacks.cam_panels.explain.threshold={panels.threshold} is not read: the panels "
            "use callbacks.cam_panels.threshold (module.threshold by default); set that instead"
        )
    if cfg.get("train"):
        check_training_settings(cfg)


def check_training_settings(cfg: DictConfig) -> None:
    """Refuse, before anything is written, training settings that would silently do something
    else than asked: validation that never comes (no checkpoint, best or last, is written: both
    are saved after a validation), a step-interval schedule whose length counts epochs, a
    ``ReduceLROnPlateau`` that would cut the rate at each improvement of ``val/f1``, and
    several best checkpoints under one file name.

    Raises:
        ConfigError: each problem found, together.
    """
    problems = []
    trainer = cfg.get("trainer") or {}
    every, epochs = trainer.get("check_val_every_n_epoch", 1), trainer.get("max_epochs")
    validating = trainer.get("limit_val_batches", 1.0) != 0 and not trainer.get("fast_dev_run")
    if validating and isinstance(every, int) and isinstance(epochs, int) and 0 < epochs < every:
        problems.append(
            f"trainer.check_val_every_n_epoch={every} is beyond trainer.max_epochs={epochs}: "
            "validation would never run, so no checkpoint (best.ckpt or last.ckpt) would be "
            f"written; set trainer.check_val_every_n_epoch to at most {epochs}"
        )
    module = cfg.get("module") or {}
    weight_problem = pos_weight_problem(module.get("pos_weight"))
    if weight_problem:  # with the others, before anything is written (the module checks too)
        problems.append(weight_problem)
    scheduler = module.get("scheduler")
    if scheduler is not None:
        raw = OmegaConf.to_container(scheduler, resolve=False)
        interval = module.get("scheduler_interval", "epoch")
        if interval == "step" and raw.get("T_max") == "${trainer.max_epochs}":
            problems.append(
                "module.scheduler_interval=step steps the scheduler at every optimizer step, but "
                "module.scheduler.T_max is ${trainer.max_epochs}, which counts epochs: the schedule "
                "would cycle; set module.scheduler.T_max to the run's optimizer steps"
            )
        t_max = scheduler.get("T_max")  # resolved
        if isinstance(t_max, int | float) and not isinstance(t_max, bool) and t_max < 1:
            problems.append(
                f"module.scheduler.T_max={t_max} (from {raw.get('T_max')}): a schedule of no "
                "length, whose rate jumps between its ends every step it takes (training by "
                "steps with trainer.max_epochs=-1?); set module.scheduler.T_max to the run's "
                "length, with module.scheduler_interval=step for optimizer steps"
            )
        mode = scheduler.get("mode", "min")  # resolved: only T_max's spelling matters
        plateau = str(raw.get("_target_", "")).endswith("ReduceLROnPlateau")
        if plateau and mode != "max":
            problems.append(
                "the scheduler follows val/f1, which grows as the model improves, but "
                f"ReduceLROnPlateau's mode is {mode!r}: it would cut the learning rate at every "
                "improvement; add +module.scheduler.mode=max"
            )
        if plateau and (interval != "epoch" or not isinstance(every, int)):
            problems.append(
                "ReduceLROnPlateau follows val/f1, which changes only at validations, but it "
                + (
                    "would step at every optimizer step (module.scheduler_interval=step)"
                    if interval != "epoch"
                    else "would step at every epoch (trainer.check_val_every_n_epoch=null)"
                )
                + " with the last val/f1 again, spending its patience; use "
                "module.scheduler_interval=epoch with trainer.check_val_every_n_epoch=<N>"
            )
        if plateau and trainer.get("limit_val_batches", 1.0) == 0:
            problems.append(
                "ReduceLROnPlateau follows val/f1, but validation is off "
                "(trainer.limit_val_batches=0): the learning rate would never change; validate, "
                "or choose another module.scheduler"
            )
    best = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if best is not None:
        problem = top_k_problem(best.get("save_top_k", 1), best.get("filename"))
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("; ".join(problems))


def checkpoint_files(trainer: L.Trainer) -> dict[str, int]:
    """The ``.ckpt`` files in the checkpoint callbacks' folders, with their mtimes."""
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath}
    return {
        str(path): path.stat().st_mtime_ns
        for folder in folders
        if folder.is_dir()
        for path in folder.glob("*.ckpt")
    }


def remove_earlier_checkpoints(trainer: L.Trainer, before: dict[str, int]) -> None:
    """After a new run (not resumed) in an earlier run's folder: remove the checkpoints this run
    did not write over (``before``: :func:`checkpoint_files` before it), which would pass for
    its own (validation off writes no ``best.ckpt``; eval.py would score the other model)."""
    if not trainer.is_global_zero:
        return
    for name, mtime in before.items():
        path = Path(name)
        if path.is_file() and path.stat().st_mtime_ns == mtime:
            path.unlink()
            log.warning("removed %s, an earlier run's checkpoint this run did not replace", path)


@task_wrapper
def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, evaluate the best checkpoint on val and test, write ``metrics.json``; return the metrics.

    The config is checked first (:func:`changecam.cli.common.prepare_run`): unknown keys,
    invalid choices and switches this machine cannot honour stop the run before anything is
    built.
    """
    output_dir = prepare_run(cfg, history=False, checks=train_checks)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = instantiate_refusing(cfg.data, splits=run_splits(cfg))
    net = instantiate_refusing(cfg.model)
    ckpt_path = checked_resume_path(cfg, net, output_dir)
    if ckpt_path is not None:
        score_as_trained(cfg, ckpt_path)
    # a checkpoint to go on from (or to score) continues the folder's CAM panels and W&B run
    resumes = ckpt_path is not None
    # every split the run uses, before any logger starts a run: a bad test list or image fails
    # here, not after fitting, and leaves no W&B run behind
    datamodule.prepare_data()
    datamodule.check(run_splits(cfg), network_fit(net))
    # resuming restores the weights: module.init_from only starts a new run
    fresh = (
        {"init_from": None, "init_include": []} if ckpt_path and cfg.module.get("init_from") else {}
    )
    if fresh:
        log.info("resuming from %s: module.init_from is not read", ckpt_path)
    module = build_module(cfg, net, **fresh)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar given then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    new_run_id = configure_wandb(cfg, output_dir, resumes, record=False)  # the loggers need it
    loggers = instantiate_loggers(cfg.get("logger"), "train")
    for logger in loggers:
        if isinstance(logger, CSVLogger):  # a resumed run continues its metrics.csv
            logger.resume_from(ckpt_path, train=bool(cfg.get("train")))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    take_sigterm_quietly(trainer)  # Lightning's handler could deadlock DDP ranks
    # built: a value the module, a callback or the trainer refuses has left the earlier run's
    # results, panels and W&B run id in the folder as they were
    remove_earlier_results(output_dir, ("metrics.json",))
    start_history(output_dir, resumes, ("cam",), new_run_id)
    log_hyperparameters(loggers, cfg)
    with ddp_job(trainer):
        metrics: dict[str, Any] = {}
        if cfg.get("train"):
            before = checkpoint_files(trainer)
            trainer.fit(
                module,
                datamodule=datamodule,
                ckpt_path=ckpt_path,
            )
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            start = getattr(module, "fit_start_step", 0)  # None: a resume of a finished run
            trained = start is not None and trainer.global_step > start
            expected = trainer.checkpoint_callbacks and not trainer.fast_dev_run and trained
            if expected and checkpoint_files(trainer) == before:
                log.warning(
                    "no checkpoint was written: validation never ran in this run's length "
                    "(trainer.check_val_every_n_epoch against max_steps or max_time), and "
                    "last.ckpt is saved after a validation unless it runs every epoch"
                )
            if ckpt_path is None:
                remove_earlier_checkpoints(trainer, before)
            if best is None:
                log.warning(
                    "no best checkpoint (%s): scoring the final weights",
                    "validation is off, trainer.limit_val_batches=0"
                    if not trainer.limit_val_batches
                    else "fast_dev_run, no checkpoint callback, or no finite val/f1",
                )
        else:  # train=false scores ckpt_path, or the network as built
            best = ckpt_path
            if best is None:
                log.warning("train=false without ckpt_path: evaluating the initial weights")
        if cfg.get("train"):
            # the best checkpoint's scores are the run's summary, not one more epoch of the
            # val/* history (at an epoch and step that were never trained)
            with unlogged(trainer):
                scored = trainer.validate(
                    module, datamodule=datamodule, ckpt_path=best, verbose=False
                )
            if scored and trainer.is_global_zero:  # the trainer's: fast_dev_run logs nothing
                log_summary(trainer.loggers, scored[0])
        else:  # scoring is all the run does: its one row of the history
            scored = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics.update(scored[0] if scored else {})  # nothing with limit_val_batches=0
        if cfg.get("test"):
            metrics.update(
                trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
            )
    metrics = to_float_dict(metrics)
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        log.info("run directory: %s", output_dir)
        print("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


def optimized_value(metrics: dict[str, float], metric: str | None) -> float | None:
    """The value a sweeper optimises, or ``None`` without ``optimized_metric``."""
    if not metric:
        return None
    if metric not in metrics:
        raise KeyError(
            f"optimized_metric={metric} is not among this run's metrics ({', '.join(metrics)})"
        )
    return metrics[metric]


# what train() can return: the scores and loss of the best checkpoint on val and test
RUN_METRICS = tuple(
    f"{stage}/{name}" for stage in ("val", "test") for name in (*SCORE_NAMES, "loss")
)


def check_optimized_metric(cfg: DictConfig, sweep: bool = True) -> None:
    """Refuse an ``optimized_metric`` no run returns (a typo would fail only after training,
    in a sweep after its first trial); in a ``sweep`` also one of a split the run's config
    leaves out (``test=false``; a single run only warns then, as it needs no value), and none
    under a sweeper that optimises one (Optuna's).

    Raises:
        ConfigError: naming the metric and the ones a run returns.
    """
    metric = cfg.get("optimized_metric")
    if metric and metric not in RUN_METRICS:
        close = difflib.get_close_matches(str(metric), RUN_METRICS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"optimized_metric={metric} is not a metric a run returns (one of "
            f"{', '.join(RUN_METRICS)}){hint}"
        )
    stage = str(metric).split("/")[0] if metric else None
    skipped = {  # the splits whose scores this run's config leaves out
        "test": "test=false" if not cfg.get("test") else None,
        "val": "trainer.limit_val_batches=0"
        if OmegaConf.select(cfg, "trainer.limit_val_batches", default=1) == 0
        else None,
    }.get(stage)
    if skipped and sweep:  # the first trial failed after training
        raise ConfigError(
            f"optimized_metric={metric}, but {skipped}: no run returns {stage} scores"
        )
    direction = sweeper_direction(cfg)
    direction = getattr(direction, "name", direction)  # Optuna's sweeper may hold its enum
    if not metric and sweep and isinstance(direction, str):  # every trial would fail, trained
        raise ConfigError(
            "optimized_metric is null, but the sweeper optimises the value each run returns "
            f"(direction {direction}): set optimized_metric, e.g. optimized_metric=val/f1"
        )
    if metric and isinstance(direction, str):
        wanted = "minimize" if str(metric).endswith("/loss") else "maximize"
        if direction.lower() != wanted:  # the sweep would search for the worst model
            grows = "shrinks" if wanted == "minimize" else "grows"
            raise ConfigError(
                f"optimized_metric={metric} {grows} as the model improves, but the sweeper's "
                f"direction is {direction}: set hydra.sweeper.direction={wanted}"
            )


def sweeper_direction(cfg: DictConfig) -> Any:
    """The Hydra sweeper's ``direction`` (Optuna's), or ``None``: from the composed config's
    ``hydra`` node where it has one, else from the running Hydra's config."""
    hydra_cfg = cfg.get("hydra")
    if hydra_cfg is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
    sweeper = hydra_cfg.get("sweeper") if hydra_cfg is not None else None
    return sweeper.get("direction") if sweeper is not None else None


def train_and_score(cfg: DictConfig) -> float | None:
    """Train; return ``optimized_metric`` (e.g. ``val/f1``) for Hydra sweepers such as Optuna.
    A single run without it among its metrics (validation off: no ``val/*``) returns nothing,
    with a warning; a sweep's trial fails, as its sweeper needs the value."""
    metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    if metric and metric not in metrics and not in_sweep():
        log.warning(
            "optimized_metric=%s is not among this run's metrics (%s): no value for a sweeper",
            metric,
            ", ".join(metrics) or "none",
        )
        return None
    return optimized_value(metrics, metric)

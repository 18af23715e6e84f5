"""What every Hydra main shares: environment, run set-up and guards, the network, the device.

Each command (:mod:`~changecam.cli.train`, :mod:`~changecam.cli.evaluate`,
:mod:`~changecam.cli.predict`, :mod:`~changecam.cli.explain`) is a task wrapped by
:func:`task_wrapper` and started by :func:`changecam.cli.launch.hydra_main`. The task first calls
:func:`prepare_run`: print the config if asked, run the config guards
(:mod:`changecam.cli.config_checks`) and fill in the W&B run id. Nothing in the package imports
the CLI modules; they import this one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import shutil
import sys
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from changecam.atomic import DiskFullError, disk_full_error, remove_stale_temporaries, write_text
from changecam.cli.config_checks import (
    ConfigError,
    check_config,
    check_device,
    no_cuda,
    resolved,
)
from changecam.cli.launch import Stopped, config_dir, is_multirun, log_to_file
from changecam.data.io import read_label
from changecam.data.layout import forget_named_files
from changecam.environment import configure_environment
from changecam.explain import ExplainSettings
from changecam.metrics import THRESHOLD_RANGE, is_threshold, mean_of
from changecam.models import SlidingWindow, is_external
from changecam.training.checkpoint import read_checkpoint, read_external_checkpoint
from changecam.training.input_scale import (
    DATA_KEY,
    describe_protocol,
    eval_remedy,
    resize_factors,
    scale_warning,
)

log = logging.getLogger("changecam")


def failure_message(
    failed: list[dict[str, str]], total: int, what: str, see: Path | None = None
) -> str:
    """The error of a run where some inputs failed: ``"2 of 5 <what>, with no output from this
    run (a, b)"``, where to read more (``see``), and the first error. (A scene refused for a
    setting keeps an earlier run's finished outputs, so not "no outputs".)"""
    names = ", ".join(f["name"] for f in failed)
    where = f"; see 'failed' in {see}" if see is not None else ""
    return (
        f"{len(failed)} of {total} {what}, with no output from this run ({names}){where}. "
        f"First error: {failed[0]['error']}"
    )


# what a bad input raises; any other error of a pair is named by its type and logged with its
# traceback (a fault of the code rather than of the pair, but still one pair's)
INPUT_ERRORS = (ValueError, OSError, RuntimeError)


def failed_pair(pair: Any, err: Exception) -> dict[str, str]:
    """The entry of a pair (a :class:`~changecam.data.layout.Triplet`) that failed alone,
    logged; call it in the ``except`` block. A full disk is no pair's fault: it is raised as
    :class:`DiskFullError` instead."""
    full = disk_full_error(err)
    if full is not None:
        raise full from err
    expected = isinstance(err, INPUT_ERRORS)
    text = str(err) if expected else f"{type(err).__name__}: {err}"
    log.error("pair %s failed: %s", pair.name, text, exc_info=not expected)
    return {"name": pair.name, "pre": str(pair.pre), "post": str(pair.post), "error": text}


# The configs live beside the package in the repository (editable install: `make install`).
def compose_config(config_name: str, overrides: list[str], root: str | Path) -> DictConfig:
    """A command's config composed as its main composes it (the ``hydra`` node set), with every
    path under ``root`` (the run directory is ``root/run``): for tests, benchmarks, notebooks."""
    root = Path(root)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.log_dir = str(root / "logs")
        cfg.paths.data_dir = str(root / "data")
    return cfg


def close_wandb(exit_code: int = 0) -> None:
    """Finish the active W&B run, if W&B was imported and a run is open, with the command's
    ``exit_code`` (W&B shows a run that ends with one other than 0 as failed)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def stop_on_full_disk(err: DiskFullError) -> typing.NoReturn:
    """Print "no space left on device while writing <path>" once and exit with status 1.

    Nothing else can be written either (a multirun stops too), so no traceback is logged: the
    log file is most likely on the same device, and ``logging`` would print its own errors.
    """
    logging.raiseExceptions = False
    print(f"Error: {err}; free space (or quota) there and rerun", file=sys.stderr, flush=True)
    raise SystemExit(1) from err


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run a task with changecam's environment defaults and always close W&B, also when the task
    raises (multirun keeps going cleanly). A full disk (:class:`~changecam.atomic.DiskFullError`,
    or ``ENOSPC``/``EDQUOT`` anywhere in the exception chain) stops the command at once:
    :func:`stop_on_full_disk`. Reporting any other failure is the console entry's job
    (:func:`changecam.cli.launch.hydra_main`): once, with the traceback in the log file."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        configure_environment()
        exit_code = 1  # W&B's own exit hook has not seen the exception yet: it would say 0
        try:
            result = task(cfg)
            exit_code = 0
            return result
        except SystemExit as err:
            # Lightning ends its loops on SIGTERM with a SystemExit of status 0
            if type(err).__name__ != "SIGTERMException":
                exit_code = err.code if isinstance(err.code, int) else int(err.code is not None)
                raise
            exit_code = Stopped.exit_code
            raise Stopped(f"stopped by SIGTERM; {resume_hint(cfg)}") from None
        except Exception as err:
            full = disk_full_error(err)
            if full is not None:
                stop_on_full_disk(full)
            raise
        finally:
            close_wandb(exit_code)

    return wrapped


STARTED = time.time()  # the command's start, about: when its modules were imported


def resume_hint(cfg: DictConfig) -> str:
    """How to resume this run from its last checkpoint: in its run folder, or in a sweep, its
    sweep folder (``hydra.run.dir`` is not read under ``-m``). Only a fitting ``train.py``
    run that wrote its ``last.ckpt`` resumes; other commands (eval.py, ``train=false``) are run
    again. (A sweep resumes its jobs without one anew.)"""
    if not cfg.get("train"):
        return "run it again"
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    # an earlier run's last.ckpt in this folder is not this run's to resume from, unless it
    # resumed from it (a new run replaces it at its first checkpoint)
    ours = last.is_file() and (last.stat().st_mtime >= STARTED or cfg.get("ckpt_path") is not None)
    if not is_multirun() and not ours:
        return (
            "run it again (it stopped before its first checkpoint, so there is nothing to resume)"
        )
    if is_multirun() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower():
        # its trials start in new folders: ckpt_path=last would resume none of them, and the
        # same sampler seed would propose the interrupted trial's point again
        return (
            f"continue its study with the same command, hydra.sweep.dir="
            f"{HydraConfig.get().sweep.dir} and another hydra.sweeper.sampler.seed (the "
            "interrupted trial is not resumed)"
        )
    if is_multirun():
        return (
            f"resume its sweep with the same command and ckpt_path=last "
            f"hydra.sweep.dir={HydraConfig.get().sweep.dir}"
        )
    return (
        f"resume it with the same command and ckpt_path=last hydra.run.dir={cfg.paths.output_dir}"
    )


def remove_earlier_results(output_dir: Path, names: Iterable[str]) -> None:
    """Remove the result files (or folders) ``names`` an earlier run left in ``output_dir``,
    with a warning (a run into the same ``hydra.run.dir`` that failed would leave them looking
    like its own)."""
    for name in names:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # (every DDP rank runs this)
        elif path.is_file():
            path.unlink(missing_ok=True)
        else:
            continue
        log.warning("removed %s, written by an earlier run in this folder", path)


def prepare_run(
    cfg: DictConfig,
    results: tuple[str, ...] = (),
    history: bool = True,
    checks: Callable[[DictConfig], None] | None = None,
    one_device: bool = False,
) -> Path:
    """The set-up every command starts with; returns the run directory.

    ``checks`` (the command's own refusals) runs after the config guards and the config's log
    lines, before anything else is written or an earlier run's results are removed.

    ``history=False`` leaves the W&B run id (:func:`configure_wandb`) and an earlier run's
    panels (:func:`start_history`) to the caller, who knows only later whether the run
    resumes one (train.py).

    Runs the config guards (unknown keys, invalid choices, switches this machine cannot honour)
    before anything is built, then (``print_config``) writes the whole config to the log file
    and a one-line summary to the console, removes the temporary files a killed run left in the
    run directory (:func:`~changecam.atomic.remove_stale_temporaries`) and the ``results``
    files an earlier run left there (a run into the same ``hydra.run.dir`` that failed would
    leave them looking like its own), and fills in the W&B run id and sweep group.
    """
    check_config(cfg)
    check_device(cfg, one_device)  # one_device: eval.py's process on cfg.device
    forget_named_files()  # each run's log names the files it does not read (a sweep's jobs too)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config"):  # before the command's own refusals: its log says what it was asked
        # the job's config, without the hydra node (whose hydra.job.num is unset outside a
        # sweep when a config is composed in code, by a benchmark or a notebook)
        log_to_file(logging.INFO, "config:\n" + OmegaConf.to_yaml(resolved(cfg)))
        log.info("%s (whole config: %s)", config_summary(), output_dir / ".hydra" / "config.yaml")
    if checks is not None:
        checks(cfg)
    for path in remove_stale_temporaries(output_dir):
        log.info("removed %s, a temporary file of a killed run", path)
    remove_earlier_results(output_dir, results)
    if history:
        configure_wandb(cfg, output_dir, resumes=False)
    return output_dir


def start_history(
    output_dir: Path, resumes: bool, folders: tuple[str, ...], new_run_id: str | None
) -> None:
    """Continue the run directory's history when the run ``resumes`` one, else start a new
    one: the ``folders`` of the earlier run's history (train's ``cam/`` panels) removed and
    ``new_run_id`` (the W&B run id ``configure_wandb(..., record=False)`` chose, if it chose a
    new one) recorded. Called once the run is built: a refusal before leaves the earlier run's
    history as it was."""
    for name in () if resumes else folders:
        if (output_dir / name).is_dir() and rank_zero_only.rank == 0:
            shutil.rmtree(output_dir / name)
            log.warning("removed %s, written by an earlier run in this folder", output_dir / name)
    if new_run_id is not None:
        record_wandb_run_id(output_dir, new_run_id)


def config_summary() -> str:
    """The command's config choices and overrides on one line, e.g.
    ``train: experiment=quickstart model=siamese_unet data=synthetic | trainer.max_epochs=1``
    or ``predict: | ckpt_path=best.ckpt input.dir=pairs``."""
    if not HydraConfig.initialized():
        return "config"
    hydra_cfg = HydraConfig.get()
    shown = (
        "experiment",
        "data",
        "model",
        "module",
        "trainer",
        "logger",
        "debug",
        "hparams_search",
    )
    choices = [f"{k}={v}" for k, v in hydra_cfg.runtime.choices.items() if k in shown and v]
    overrides = [o for o in hydra_cfg.overrides.task if override_key(o) not in shown]
    text = f"{hydra_cfg.job.config_name}:" + "".join(f" {c}" for c in choices)
    return text + (" | " + " ".join(overrides) if overrides else "")


def override_key(override: str) -> str:
    """The config key a command-line override names: ``a.b=1``, ``+a.b=1``, ``++a.b=1`` and
    ``~a.b`` all name ``a.b``."""
    return override.lstrip("+~").split("=", 1)[0]


def instantiate_group(
    cfg: DictConfig | None,
    kind: type,
    arguments: Callable[[DictConfig], dict[str, Any]] | None = None,
) -> list:
    """Instantiate every ``_target_`` entry of a config group dict (callbacks or loggers),
    each with the keyword ``arguments`` of its entry, if given."""
    objects = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a config dict of {kind.__name__}s, got {type(cfg).__name__}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            obj = hydra.utils.instantiate(conf, **(arguments(conf) if arguments else {}))
            if not isinstance(obj, kind):
                raise TypeError(
                    f"config entry {name!r} built a {type(obj).__name__}, not a {kind.__name__}"
                )
            objects.append(obj)
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return instantiate_group(cfg, Callback)


def instantiate_loggers(cfg: DictConfig | None, job_type: str) -> list[Logger]:
    """The loggers of a ``logger`` config group; a W&B logger whose ``job_type`` is null gets
    ``job_type`` (the command: ``train``, ``eval``, ``study``), so W&B can tell them apart."""

    def job_type_of(conf: DictConfig) -> dict[str, Any]:
        wandb = is_wandb_logger(conf.get("_target_"))
        return {"job_type": job_type} if wandb and conf.get("job_type") is None else {}

    return instantiate_group(cfg, Logger, job_type_of)


def log_hyperparameters(
    loggers: list[Logger], cfg: DictConfig, used: Mapping[str, Any] | None = None
) -> None:
    """The resolved job config (without the ``hydra`` node) to every logger, with ``used``'s
    top-level entries in place of the config's (the values a run resolved: e.g. eval.py's
    threshold and loss, which its config leaves to the checkpoint)."""
    hparams = {**resolved(cfg), **(used or {})}
    for logger in loggers:
        logger.log_hyperparams(hparams)


@contextlib.contextmanager
def unlogged(trainer: Any) -> Iterator[None]:
    """Run a loop of ``trainer`` without its loggers (restored after)."""
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.loggers = loggers


def log_summary(loggers: list[Logger], metrics: Mapping[str, float]) -> None:
    """``metrics`` as the run's summary values where a logger keeps a summary (W&B's, which
    otherwise shows each key's last logged value); call it on rank zero."""
    for logger in loggers:
        summary = getattr(getattr(logger, "experiment", None), "summary", None)
        if summary is not None and hasattr(summary, "update"):
            summary.update(dict(metrics))


def to_float_dict(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metric tensors/numbers -> plain floats, sorted by key."""
    return {k: float(v) for k, v in sorted(metrics.items())}


DEFAULT_THRESHOLD = 0.5


def run_threshold(given: float | None, hparams: dict[str, Any]) -> float:
    """The decision threshold of eval, predict and explain: ``threshold`` as given, else the
    ``module.threshold`` the checkpoint was trained and scored with (0.5 for a checkpoint that
    records none, e.g. a plain state_dict). A given one that differs from the checkpoint's is
    warned about, as it scores otherwise than train.py did."""
    trained = hparams.get("threshold")
    trained = float(trained) if isinstance(trained, (int, float)) else None
    if given is None:
        threshold = DEFAULT_THRESHOLD if trained is None else trained
        where = (
            "the checkpoint's module.threshold"
            if trained is not None
            else "the checkpoint records no module.threshold"
        )
        log.info("threshold=%s (%s)", threshold, where)
        return threshold
    if trained is not None and trained != given:
        log.warning(
            "the checkpoint was trained and scored with module.threshold=%s; this run uses "
            "threshold=%s as given (threshold=null scores it as train did)",
            trained,
            given,
        )
    return given


def checked_threshold(value: Any, key: str = "threshold") -> float | None:
    """A probability threshold in [0, 1), ``None`` for ``null``, or a :class:`ValueError`
    naming ``key``."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        threshold = float(value)
    except (TypeError, ValueError):  # text, a list, a mapping
        raise ValueError(f"{key}={value!r} must be a probability in [0, 1) or null") from None
    if not is_threshold(threshold):
        raise ValueError(f"{key}={threshold} must be {THRESHOLD_RANGE}")
    return threshold


def checked_choice(value: Any, choices: Any, key: str) -> Any:
    """``value`` if it is one of the ``Literal`` type ``choices``, else a :class:`ValueError`."""
    allowed = typing.get_args(choices)
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; expected one of {', '.join(allowed)}")
    return value


def resolve_device(name: str) -> torch.device:
    """``device`` config value -> :class:`torch.device`; ``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={name!r} is not a device: use auto, cpu, cuda or cuda:<index>"
        ) from err
    if device.type not in ("cpu", "cuda"):  # the trainer and the windows take these two
        raise ValueError(f"device={name!r}: use auto, cpu, cuda or cuda:<index>")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(no_cuda(name))
    return device


def load_model(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The network of ``ckpt_path`` (with ``model=`` for plain state dicts), in eval mode, on
    the CPU, and the checkpoint's module hyper-parameters (empty for a state dict)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    if is_external(model_cfg):  # model=external: a plain state_dict of the user's own network
        return read_external_checkpoint(cfg.ckpt_path, model_cfg)
    return read_checkpoint(cfg.ckpt_path, model_cfg)


def warn_training_scale(
    path: Any,
    hparams: Mapping[str, Any],
    command: str,
    remedy: str,
    run_factors: list[float] | None = None,
    run_protocol: str | None = None,
) -> str | None:
    """Log (and return) :func:`~changecam.training.input_scale.scale_warning` for the checkpoint
    at ``path`` run at another pixel scale than it was trained at (default: the images' own)."""
    message = scale_warning(hparams.get(DATA_KEY), path, command, remedy, run_factors, run_protocol)
    if message is not None:
        log.warning(message)
    return message


def warn_split_scale(
    path: Any, hparams: Mapping[str, Any], datamodule: Any, split: str, command: str, windows: bool
) -> str | None:
    """:func:`warn_training_scale` for a data module's ``split`` scored by ``command`` (with
    ``windows``: whole images, sliding windows, at their own resolution). Call it after
    ``datamodule.prepare_data()``: it lists the split's files. Returns the warning, if any."""
    record = hparams.get(DATA_KEY)
    protocol = getattr(datamodule, "eval_protocol", None)
    patch_size = getattr(datamodule, "patch_size", None)
    image_sizes = getattr(datamodule, "image_sizes", None)
    if not isinstance(record, Mapping) or None in (protocol, patch_size, image_sizes):
        return None  # a data module of the user's own: its scale is unknown
    protocol, patch_size = "full" if windows else protocol, int(patch_size)
    try:
        resized = protocol == "resize" or record.get("train_protocol") == "resize"
        sizes = image_sizes(split) if resized else []
    except (OSError, ValueError):  # the scoring itself names the missing or bad files
        return None
    return warn_training_scale(
        path,
        hparams,
        command,
        eval_remedy(record, sizes, windows),
        resize_factors(patch_size, sizes) if protocol == "resize" else [1.0],
        "whole images at their own resolution (sliding_window.enabled=true, scale 1)"
        if windows
        else describe_protocol("eval", protocol, patch_size, sizes),
    )


NATIVE_SCALE_REMEDY = (
    "Resample the inputs by its training scale first (a GeoTIFF: gdalwarp -tr with its pixel "
    "size divided by that scale), or use a network trained with data.train_protocol=tiles."
)


def sliding_window_spec(cfg: DictConfig) -> SlidingWindow | None:
    """The ``sliding_window`` group as a :class:`~changecam.models.SlidingWindow`, or ``None``
    when it is absent or ``enabled: false``."""
    block = cfg.get("sliding_window")
    if not block or not block.get("enabled", True):
        return None
    fields = OmegaConf.to_container(block, resolve=True)
    fields.pop("enabled", None)
    allowed = set(SlidingWindow.__dataclass_fields__)
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(
            f"sliding_window.{unknown[0]}: unknown key; allowed keys: enabled, "
            + ", ".join(SlidingWindow.__dataclass_fields__)
        )
    return SlidingWindow(**fields)


def instantiate_refusing(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with the built object's own refusals (a ``ValueError``
    such as a ``CheckpointError``, or a ``FileNotFoundError``) raised as they are, not inside
    Hydra's ``InstantiationException`` (which prints them as one multi-line repr)."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError | FileNotFoundError):
            raise err.__cause__ from None
        raise


def explain_settings(cfg: DictConfig, threshold: float | None) -> ExplainSettings | None:
    """The ``explain`` group as :class:`~changecam.explain.ExplainSettings` with the run's
    ``threshold`` (``None``, the checkpoint's, not known yet: 0.5 until
    :func:`~changecam.explain.with_threshold` sets it), or ``None`` when
    ``explain.enabled=false``."""
    block = cfg.get("explain")
    if not block or not block.get("enabled", True):
        return None
    if "threshold" in block:  # the run's own is passed: this one would be ignored
        raise ConfigError(
            f"explain.threshold={block.threshold} is not read: the explanations use the run's "
            "threshold; set threshold= (the mask's and the explanation's) instead"
        )
    return instantiate_refusing(
        block, threshold=DEFAULT_THRESHOLD if threshold is None else threshold
    )


def explain_target_problem(
    pair: Any, size: tuple[int, int], settings: ExplainSettings, roi_size: tuple[int, int] | None
) -> str | None:
    """Why the explanation target cannot be met on a pair (a
    :class:`~changecam.data.layout.Triplet` of ``size``) it explains, or ``None``: no label
    under ``explain.target=ground_truth``, an ``explain.roi`` of another size."""
    if settings.target == "ground_truth" and pair.label is None:
        return (
            f"explain.target=ground_truth but pair {pair.name!r} ({pair.pre}) has no label "
            "(put it in label/ next to A/ and B/, or use explain.target=predicted)"
        )
    if roi_size is not None and tuple(roi_size) != tuple(size):
        return (
            f"explain.roi is {roi_size[0]}x{roi_size[1]} but pair {pair.name!r} is "
            f"{size[0]}x{size[1]}"
        )
    return None


def mean_post_shares(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The mean over pairs of every post share the rows hold, per layer: ``post_share``
    (HiResCAM) and ``post_share_<method>`` for each other method that ran."""
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith("post_share"))
    return {
        key: {
            layer: mean_of([r[key][layer] for r in rows if r.get(key)])
            for layer in dict.fromkeys(name for r in rows for name in (r.get(key) or {}))
        }
        for key in keys
    }


def read_roi(settings: ExplainSettings) -> Any:
    """The ``explain.roi`` mask (``None`` without one); ``target=roi`` requires it."""
    if settings.roi and not Path(settings.roi).is_file():
        raise FileNotFoundError(f"explain.roi={settings.roi}: no such file")
    roi = read_label(settings.roi) if settings.roi else None
    if settings.target == "roi" and roi is None:
        raise ValueError("explain.target=roi needs explain.roi=<mask image>")
    return roi


RUN_ID_FILE = Path("wandb") / "run_id.txt"


def is_wandb_logger(target: Any) -> bool:
    """Whether a ``_target_`` builds Lightning's W&B logger, however it is spelled
    (``lightning.pytorch.loggers.WandbLogger`` or ``...loggers.wandb.WandbLogger``), or a
    subclass of it whose name says so."""
    if not isinstance(target, str) or "WandbLogger" not in target:
        return False  # only what may be it is imported
    from lightning.pytorch.loggers.wandb import WandbLogger

    try:
        obj = hydra.utils.get_object(target)
    except Exception:  # the config checks name a target that cannot be imported
        return False
    return inspect.isclass(obj) and issubclass(obj, WandbLogger)


def wandb_run_id(output_dir: str | Path, resumes: bool, record: bool = True) -> tuple[str, bool]:
    """The W&B run id of a run directory and whether it is a new one: read from
    ``wandb/run_id.txt`` when the run ``resumes`` (or is a DDP rank started later), else made
    and stored (``record=False``: left to :func:`record_wandb_run_id`).

    Resuming in the same directory (``ckpt_path=last``) thus continues the same W&B run, and a
    new run there starts its own. Only global rank 0 writes the file.
    """
    path = Path(output_dir) / RUN_ID_FILE
    if path.is_file() and (resumes or rank_zero_only.rank != 0):
        return path.read_text().strip(), False
    from wandb.sdk.lib.runid import generate_id  # wandb is imported only where W&B is used

    run_id = generate_id()
    if record:
        record_wandb_run_id(output_dir, run_id)
    return run_id, True


def record_wandb_run_id(output_dir: str | Path, run_id: str) -> None:
    """Store a run directory's new W&B run id (global rank 0 only)."""
    if rank_zero_only.rank == 0:
        write_text(Path(output_dir) / RUN_ID_FILE, run_id + "\n")


def configure_wandb(
    cfg: DictConfig, output_dir: str | Path, resumes: bool = False, record: bool = True
) -> str | None:
    """Fill in the W&B logger's run id (kept on resume) and, in a sweep, a shared group.

    A value set in the config (``logger.wandb.id``/``group``) is kept. The runs of one
    multirun get the group ``<task_name>/<sweep folder>`` and the name ``<task_name>/<job folder>``.
    Returns a new run id that ``record=False`` left unrecorded (for :func:`start_history`),
    else ``None``. Call it once per run: in a sweep it extends the run's name.
    """
    unrecorded = None
    loggers = cfg.get("logger") or {}
    for conf in loggers.values():
        if not (isinstance(conf, DictConfig) and is_wandb_logger(conf.get("_target_"))):
            continue
        with open_dict(conf):
            if conf.get("id") is None:
                conf.id, new = wandb_run_id(output_dir, resumes, record)
                if new and not record:
                    unrecorded = conf.id
            if is_multirun():
                hydra_cfg = HydraConfig.get()
                if conf.get("group") is None:
                    conf.group = f"{cfg.task_name}/{Path(hydra_cfg.sweep.dir).name}"
                # the job's folder: <job number>, or <start time>_<job number> under Optuna,
                # whose continued study numbers its trials from 0 again
                conf.name = f"{conf.get('name') or cfg.task_name}/{Path(output_dir).name}"
    return unrecorded

"""Hydra callbacks (``hydra.callbacks`` in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

SWEEP_STARTED = "CHANGECAM_SWEEP_STARTED"


class PinSweepStart(Callback):
    """Set ``$CHANGECAM_SWEEP_STARTED`` to this invocation's start time when a multirun starts.

    ``hparams_search=optuna`` names its trial folders ``<start time>_<job number>`` (Hydra
    numbers each invocation's jobs from 0, so a continued study would reuse the earlier
    folders). Each job resolves its folder itself, so the time must be fixed once: in the
    environment, which the launchers' workers and a SLURM job requeued by submitit inherit, so
    a requeued trial finds its own folder (and its ``last.ckpt``) again.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_STARTED] = time.strftime("%Y-%m-%d_%H-%M-%S")


# set for each rank of a job that several processes run (torchrun, Lightning's own children,
# MPI): each resolves the time-named folder itself, and they must agree on it
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "TORCHELASTIC_RUN_ID",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
)
# how many processes run the job (SLURM's srun, LSF's jsrun, MPI): a rank when above 1
SIZE_VARIABLES = (
    "WORLD_SIZE",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "JSM_NAMESPACE_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
)
# the last part of the default hydra.run.dir (conf/hydra/default.yaml): a folder per start
# second, the only folder name claimed (a coarser time, or a name given, is meant to be shared)
TIME_NAME = "${now:%Y-%m-%d_%H-%M-%S}"


def launched_as_a_rank() -> bool:
    """Whether this process may be one of several that run one job (a launcher's rank
    variables are set, even to the first rank, or a world of more than one)."""
    return any(os.environ.get(name, "").strip() for name in RANK_VARIABLES) or one_of_several()


def one_of_several() -> bool:
    """Whether this process is known to be one of several that run one job: a world of more
    than one process, or a rank other than the first (``torchrun --nproc_per_node=1`` or
    ``srun -n 1`` is one process)."""
    if any(os.environ.get(name, "1").strip() not in ("", "1") for name in SIZE_VARIABLES):
        return True
    ranks = (name for name in RANK_VARIABLES if name != "TORCHELASTIC_RUN_ID")  # an id
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in ranks)


def claims_its_folder(node: DictConfig) -> bool:
    """Whether a run's or sweep's folder (``hydra.run`` or ``hydra.sweep``) is claimed: the
    default one named by the start second (:data:`TIME_NAME`, as written, not resolved), in a
    process that is not one rank of several."""
    given = OmegaConf.to_container(node, resolve=False).get("dir")
    return str(given).endswith("/" + TIME_NAME) and not launched_as_a_rank()


def claim_folder(folder: Path) -> Path:
    """Create ``folder``, or the first of ``folder_1``, ``folder_2``, ... that does not exist
    yet (``mkdir`` is atomic: two processes never claim the same one); returns it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = folder if n == 0 else folder.with_name(f"{folder.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{folder} and 9999 numbered folders beside it exist already")


class ClaimRunDir(Callback):
    """Give a single run its own folder when another run took its time-named one: runs started
    in the same second (a shell loop of ``python predict.py ... &``, or one run right after
    another) were written into one folder. The folder named by the start second
    (:data:`TIME_NAME`, the default) is created here; if it exists, the run gets ``<time>_1``
    (``_2``, ...). Any other ``hydra.run.dir`` (a folder given by name for a resume or
    ``ckpt_path=last``, or a coarser time such as ``${now:%Y-%m-%d}``) is used as it is, and so
    is the time-named folder of a process that is one rank of several (torchrun, srun, jsrun,
    MPI, Lightning's DDP children), whose ranks must agree on it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not claims_its_folder(config.hydra.run):
            return
        folder = Path(str(config.hydra.run.dir))
        claimed = claim_folder(folder)
        if claimed != folder:
            with read_write(config.hydra):
                config.hydra.run.dir = str(claimed)


def sweep_dir_override(folder: Path) -> str | None:
    """The Hydra override that sets ``hydra.sweep.dir`` to ``folder`` for every job of a sweep,
    or None where a path cannot be written as one (a backslash, or ``${``, which Hydra would
    resolve)."""
    text = str(folder)
    if "\\" in text or "${" in text:
        return None
    override = "hydra.sweep.dir='" + text.replace("'", "\\'") + "'"
    parsed = OverridesParser.create().parse_override(override)
    return override if parsed.value() == text else None


class CheckSweepObjective(Callback):
    """Refuse an ``optimized_metric`` the sweep cannot optimise (unknown, none under Optuna's
    sweeper, or a loss under a sweeper that maximises) when the multirun starts: inside the first job it came after the
    Optuna sweeper had stored its study, whose direction then cannot be set right in that
    sweep folder."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from changecam.cli.config_checks import ConfigError
        from changecam.cli.launch import exit_reporting
        from changecam.cli.train import check_optimized_metric

        if "hydra" not in config:
            return
        try:
            check_optimized_metric(config)
        except ConfigError as err:  # Hydra would only warn about a callback's exception
            exit_reporting(err)


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a multirun gives several values: its sweep overrides (``a=1,2``,
    ``range(...)``) and its sweeper's ``params`` (Optuna's search space). The overrides are
    read as given (``${paths.output_dir}`` in one cannot be resolved before a job runs)."""
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    overrides = OverridesParser.create().parse_overrides([str(o) for o in task])
    keys = {o.key_or_group for o in overrides if o.is_sweep_override()}
    params = config.hydra.sweeper.get("params") or {}
    return keys | {str(k) for k in params}


def runs_jobs_at_once(config: DictConfig) -> bool:
    """Whether the multirun's jobs may run at the same time: not under Hydra's basic launcher,
    joblib's ``n_jobs=1``, SLURM's ``array_parallelism=1`` or an Optuna sweeper asking for one
    trial at a time (``n_jobs=1``)."""
    hydra = config.hydra
    launcher = hydra.launcher
    if str(launcher.get("_target_", "")).endswith("BasicLauncher"):
        return False
    one_at_a_time = (
        launcher.get("n_jobs") == 1
        or launcher.get("array_parallelism") == 1
        or hydra.sweeper.get("n_jobs") == 1
    )
    return not one_at_a_time


class CheckSweepData(Callback):
    """Refuse a multirun whose jobs run at the same time and give ``data.synthetic.*`` several
    values in one ``data.root``: each job's generator replaces the set there with its own,
    under the jobs training on it (they failed, missing files, or trained on another job's
    images under the same names). A ``data.root`` that interpolates every swept key (or the
    whole ``${data.synthetic}``) gives each setting its own folder."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from changecam.cli.config_checks import ConfigError
        from changecam.cli.launch import exit_reporting

        if "hydra" not in config:
            return
        swept = swept_keys(config)
        synthetic = sorted(k for k in swept if k.split(".")[:2] == ["data", "synthetic"])
        if not synthetic or not runs_jobs_at_once(config):
            return
        data = config.get("data")
        root = str(OmegaConf.to_container(data, resolve=False).get("root") if data else None)
        own = "${data.synthetic}" in root or all("${" + key + "}" in root for key in synthetic)
        if own and "data.root" not in swept:  # (a swept root would share each of its values)
            return
        suggested = "_".join("${" + key + "}" for key in synthetic)
        exit_reporting(
            ConfigError(
                f"this sweep gives {', '.join(synthetic)} several values, and its jobs run at the "
                f"same time with one data.root ({root}): each job would replace the synthetic "
                "set the others train on; give each its own folder, e.g. "
                f"data.root='${{paths.data_dir}}/synthetic_{suggested}', or run the "
                "jobs one after another (the default launcher)"
            )
        )


class MakeSweepDir(Callback):
    """Create the sweep folder when a multirun starts, before the sweeper runs (the Optuna
    sweeper opens ``<sweep dir>/optuna.db`` before a launcher would create it).

    As :class:`ClaimRunDir` does for a run, the default folder named by the start second
    (:data:`TIME_NAME`) is claimed: a multirun started in the same second as another (a shell
    loop, a SLURM array whose tasks each start a sweep) gets ``<time>_1`` (``_2``, ...), where
    its jobs ``0``, ``1``, ... would have been written over the other's. Each job's config is
    composed again from the sweep's overrides, so the claimed folder is added to them
    (``hydra.overrides.hydra``). Any other ``hydra.sweep.dir`` (an Optuna study continued in
    its old folder, a coarser time) is used as it is, and so is the folder of a rank.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        if not claims_its_folder(config.hydra.sweep):
            folder.mkdir(parents=True, exist_ok=True)
            return
        claimed = claim_folder(folder)
        if claimed == folder:
            return
        override = sweep_dir_override(claimed)
        if override is None:  # shared, as before the claim
            claimed.rmdir()
            return
        with read_write(config.hydra):
            config.hydra.sweep.dir = str(claimed)
            config.hydra.overrides.hydra.append(override)

"""Does the model look at the right date? The attribution study (Hydra, ``conf/study.yaml``).

``python study.py study.checkpoints=[a.ckpt,b.ckpt]`` or ``python study.py study.train_zoo=true``
(which first trains every architecture of ``conf/model/`` with the quickstart recipe, reusing a
finished run of the same settings) explains every changed object of a split with every method
at every per-date layer and scores the maps (:mod:`changecam.evaluation.study`). It writes, in
the run directory:

* ``study.json``: every number with its 95 % interval, keyed architecture -> ``results`` ->
  method -> layer -> metric (written last, atomically: its presence means the study finished);
* ``report.md`` with its plots in ``plots/``: the headline table, date accuracy with intervals,
  post share per layer, deletion and randomisation curves, and a best and a worst panel per
  architecture;

and logs its config, the table and plots to the configured logger (a W&B ``Table`` and
images).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from changecam.atomic import write_json
from changecam.cli.common import (
    NATIVE_SCALE_REMEDY,
    instantiate_loggers,
    instantiate_refusing,
    log,
    log_hyperparameters,
    override_key,
    prepare_run,
    resolve_device,
    task_wrapper,
    warn_training_scale,
)
from changecam.cli.config_checks import OPEN_MAPS, ConfigError
from changecam.cli.launch import CONF_DIR
from changecam.data.io import ImageReadError, read_change_type, read_image, read_label
from changecam.data.layout import SPLITS, Triplet, find_triplets
from changecam.data.synthetic import CHANGE_TYPE_DIR, GENERATOR_VERSION
from changecam.evaluation.study import StudyImage, StudySettings, study_model
from changecam.evaluation.study_report import log_study, write_report
from changecam.explain.hirescam import per_date_layers, resolve_taps
from changecam.models.taps import TapError
from changecam.training.checkpoint import CheckpointError, read_checkpoint
from changecam.training.model_match import build_on_meta, read_presets
from changecam.values import is_count

NOT_IN_ZOO = ("external",)
# study keys that may be {default: x, <arch>: y}
PER_ARCHITECTURE = tuple(sorted(key.removeprefix("study.") for key in OPEN_MAPS))


def as_list(value: Any) -> list[Any]:
    """A list setting given as one unbracketed value (``study.names=bit``, ``=2020``) as a
    list of it."""
    return list(value) if isinstance(value, list | tuple | ListConfig) else [value]


def zoo_architectures(requested: list[str] | str | None) -> list[str]:
    """``conf/model/*.yaml`` that describe a network on their own (or the ``requested`` ones).

    Raises:
        ConfigError: a requested name has no ``conf/model/<name>.yaml``.
    """
    known = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
    available = [name for name in known if name not in NOT_IN_ZOO]
    if requested is None:
        return available
    requested = as_list(requested)
    bad = [name for name in requested if name not in available]
    if bad:
        raise ConfigError(f"study.zoo: unknown architecture(s) {bad}; available: {available}")
    if not requested:  # a study of no model would look finished
        raise ConfigError(f"study.zoo=[] names no architecture; available: {available}")
    return list(requested)


def per_architecture(value: Any, arch: str, key: str) -> Any:
    """A study value for one architecture: a plain value, or ``{default: x, <arch>: y}``."""
    if not isinstance(value, Mapping):
        return value
    if arch in value:
        return value[arch]
    if "default" not in value:
        raise ConfigError(f"study.{key} gives no value for {arch} and no default: {dict(value)}")
    return value["default"]


def data_overrides() -> list[str]:
    """This command's own ``data`` overrides, passed on to the training runs of the zoo, so the
    models are trained on the dataset the study reads."""
    if not HydraConfig.initialized():
        return []
    task = HydraConfig.get().overrides.task
    return [o for o in task if override_key(o).split(".")[0] == "data"]


def zoo_run(cfg: DictConfig, arch: str) -> tuple[Path, list[str]]:
    """The run directory of one architecture's training and the overrides it is trained with;
    the directory name holds a hash of everything that changes the result."""
    overrides = [
        *as_list(cfg.study.train_overrides or []),
        f"model={arch}",
        f"trainer.max_epochs={per_architecture(cfg.study.epochs, arch, 'epochs')}",
        *data_overrides(),
    ]
    data_dir = str(Path(cfg.paths.data_dir).resolve())  # passed to train.py (train_zoo)
    key = json.dumps(
        {"overrides": overrides, "generator": GENERATOR_VERSION, "data_dir": data_dir},
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    # resolved: train.py runs in paths.root_dir (CHANGECAM_ROOT), not in this process's folder
    return Path(cfg.study.zoo_dir).resolve() / f"{arch}-{digest}", overrides


def train_zoo(cfg: DictConfig, architectures: list[str]) -> dict[str, Path]:
    """Train each architecture (``train.py`` in a subprocess) unless a finished run with the
    same settings exists; return the best checkpoint of each.

    Raises:
        RuntimeError: a training run failed (its log is named).
    """
    checkpoints = {}
    for arch in tqdm(architectures, desc="zoo: training", unit="model"):
        run_dir, overrides = zoo_run(cfg, arch)
        best = run_dir / "checkpoints" / "best.ckpt"
        if (run_dir / "metrics.json").is_file() and best.is_file():
            log.info("[%s] reusing the finished run %s", arch, run_dir)
            checkpoints[arch] = best
            continue
        log.info("[%s] training: train.py %s", arch, " ".join(overrides))
        command = [
            sys.executable,
            str(Path(CONF_DIR).parent / "train.py"),
            *overrides,
            f"paths.data_dir={Path(cfg.paths.data_dir).resolve()}",
            f"hydra.run.dir={run_dir}",
        ]
        done = subprocess.run(command, cwd=cfg.paths.root_dir, check=False)
        if done.returncode != 0 or not best.is_file():
            logs = sorted(run_dir.glob("*.log"))  # <task_name>.log, e.g. quickstart.log
            raise RuntimeError(
                f"training {arch} for the study failed (exit status {done.returncode}); see "
                f"{logs[0] if logs else run_dir} and the output above"
            )
        checkpoints[arch] = best
    return checkpoints


def given_checkpoints(cfg: DictConfig) -> dict[str, Path]:
    """``study.checkpoints`` named by ``study.names`` (default: each file's run directory)."""
    paths = [Path(p) for p in as_list(cfg.study.checkpoints or [])]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"study.checkpoints: no such file(s): {missing}")
    given_names = cfg.study.get("names")
    names = [str(n) for n in as_list(given_names)] if given_names not in (None, []) else None
    if names is not None and len(names) != len(paths):
        raise ConfigError(f"study.names has {len(names)} names for {len(paths)} study.checkpoints")
    if names is None:
        names = [p.parent.parent.name if p.parent.name == "checkpoints" else p.stem for p in paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"study: two checkpoints have the same name {names}; set study.names")
    return dict(zip(names, paths, strict=True))


def study_root(cfg: DictConfig) -> Path:
    """The dataset the study reads: ``study.data`` (checked by :func:`study_checks`), or the
    ``data`` group's (generated if it is the synthetic set)."""
    if cfg.study.get("data"):
        return Path(cfg.study.data)
    datamodule = instantiate_refusing(cfg.data, splits=[cfg.study.split])
    datamodule.prepare_data()
    datamodule.triplets(cfg.study.split)  # a synthetic split of no pairs is named as such
    return Path(datamodule.root)


def labelled_triplets(root: Path, split: str) -> list[Triplet]:
    """The triplets of one split of ``root``, refusing a split without any."""
    triplets = find_triplets(root, split)
    if not triplets:
        raise FileNotFoundError(f"no labelled pairs in split {split!r} of {root}")
    return triplets


def check_change(labels: Iterable[np.ndarray], split: str, root: Path) -> None:
    """Refuse a study whose pairs' ``labels`` hold no change: it scores changed objects, and
    would write a finished-looking ``study.json`` that measured nothing.

    Raises:
        ValueError: naming the split and its folder.
    """
    if not any(label.any() for label in labels):
        raise ValueError(
            f"the labels of the pairs studied in split {split!r} of {root} hold no change: the "
            "study scores changed objects; study a split (or study.max_images) with labelled "
            "change"
        )


def read_split(root: Path, split: str, limit: int | None = None) -> list[StudyImage]:
    """The labelled pairs of one split (the first ``limit``, at least one), with
    ``change_type/`` when the folder has it."""
    images = []
    for triplet in labelled_triplets(root, split)[:limit]:
        types_path = triplet.label.parent.parent / CHANGE_TYPE_DIR / triplet.label.name
        label = read_label(triplet.label)
        change_type = read_change_type(types_path) if types_path.is_file() else None
        if change_type is not None and change_type.shape != label.shape:
            raise ImageReadError(
                f"{types_path} is {change_type.shape} but its label {triplet.label} is {label.shape}"
            )
        images.append(
            StudyImage(
                name=triplet.name,
                pre=read_image(triplet.pre),
                post=read_image(triplet.post),
                label=label,
                change_type=change_type,
            )
        )
    return images


COMMAND_KEYS = (
    "checkpoints",
    "names",
    "train_zoo",
    "zoo",
    "train_overrides",
    "epochs",
    "zoo_dir",
    "data",
    "split",
    "max_images",
)


def study_settings(cfg: DictConfig, arch: str) -> StudySettings:
    """The :class:`StudySettings` of one architecture.

    Raises:
        ConfigError: an unknown ``study`` key (the message lists the known ones).
    """
    block = OmegaConf.to_container(cfg.study, resolve=True)
    known = (*COMMAND_KEYS, *StudySettings.__dataclass_fields__)
    unknown = sorted(set(block) - set(known) - {"seed"})
    if unknown:
        raise ConfigError(f"study.{unknown[0]}: unknown key; known keys: {', '.join(known)}")
    fields = {k: v for k, v in block.items() if k in StudySettings.__dataclass_fields__}
    for key in PER_ARCHITECTURE:
        if key in fields:
            fields[key] = per_architecture(fields[key], arch, key)
    fields["seed"] = cfg.seed
    return StudySettings(**fields)


def study_checks(cfg: DictConfig) -> None:
    """study.py's own refusals, before anything is written (an earlier study's results in the
    same folder included): the models asked for, every study value, the studied pairs (found,
    with labelled change; a synthetic set is written later), every checkpoint."""
    if bool(cfg.study.train_zoo) == bool(cfg.study.checkpoints):
        raise ConfigError(
            "study: give either study.checkpoints=[a.ckpt,...] or study.train_zoo=true (not both)"
        )
    resolve_device(cfg.device)  # a device this machine lacks, before the results go
    if cfg.study.split not in SPLITS:
        raise ConfigError(f"study.split={cfg.study.split!r}: expected one of {', '.join(SPLITS)}")
    limit = cfg.study.get("max_images")
    if limit is not None and not is_count(limit):
        raise ConfigError(f"study.max_images={limit!r} must be a whole number >= 1 or null (all)")
    given = {} if cfg.study.train_zoo else given_checkpoints(cfg)
    names = zoo_architectures(cfg.study.get("zoo")) if cfg.study.train_zoo else list(given)
    known = {"default", *names, *zoo_architectures(None)}
    for key in PER_ARCHITECTURE:  # a mistyped name would leave its value unread
        value = cfg.study.get(key)
        unknown = sorted(set(value) - known) if isinstance(value, Mapping) else []
        if unknown:
            raise ConfigError(
                f"study.{key}.{unknown[0]}: no model of this study nor architecture is named "
                f"{unknown[0]!r} (the study's models: {', '.join(names)})"
            )
    for name in names:  # bad study values fail here, before any training
        study_settings(cfg, name)
    data = cfg.study.get("data")
    if data:  # a mistyped folder failed after the earlier study's results were removed
        if not Path(data).is_dir():
            raise FileNotFoundError(f"study.data={data} is not a folder")
        root: Path | None = Path(data)
        found = labelled_triplets(root, cfg.study.split)
    else:  # the data group's folder (its layout); a synthetic set is written later, with change
        datamodule = instantiate_refusing(cfg.data, splits=[cfg.study.split])
        root = Path(datamodule.root) if datamodule.synthetic is None else None
        found = datamodule.triplets(cfg.study.split) if root is not None else []
    if root is not None:
        studied = found[:limit]
        check_change((read_label(t.label) for t in studied), cfg.study.split, root)
    for name, path in given.items():  # a bad checkpoint fails here, not after the models before it
        try:
            net, hparams = read_checkpoint(path)
        except CheckpointError as err:
            if "without a network config" not in str(err):
                raise
            raise CheckpointError(  # its advice, model=..., is eval's and predict's, not study's
                f"{path} holds weights without a network config: study.py reads checkpoints "
                "that record their network (train.py's .ckpt files), and has no model= key to "
                "build one for a plain state_dict"
            ) from None
        warn_training_scale(path, hparams, "study.py", NATIVE_SCALE_REMEDY)  # whole images
        check_layers(cfg, name, net)
    if cfg.study.train_zoo:  # each architecture as the zoo would train it, before it is
        presets, overrides = (
            read_presets(),
            model_overrides(as_list(cfg.study.train_overrides or [])),
        )
        for name in names:
            config = {**presets.get(name, {}), **overrides}
            net = build_on_meta(config) if "_target_" in config else None
            if net is not None:
                check_layers(cfg, name, net)


def model_overrides(overrides: Any) -> dict[str, Any]:
    """The ``model.<key>=<value>`` overrides among ``study.train_overrides`` (``+`` and ``++``
    forms too), parsed and typed by Hydra's own override parser as ``train.py`` reads them."""
    found = {}
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or ()])
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.is_sweep_override() or not key.startswith("model."):
            continue
        if "." not in key[len("model.") :]:
            found[key[len("model.") :]] = override.value()
    return found


def check_layers(cfg: DictConfig, name: str, net: Any) -> None:
    """Refuse ``study.layers`` that the network ``name`` lacks (before any model is trained
    or studied: a zoo with one such model failed after training every one).

    Raises:
        ConfigError: naming the layers, the model and the ones it has.
    """
    layers = study_settings(cfg, name).layers
    if not layers:
        return
    try:
        taps = resolve_taps(net, list(layers))  # unknown, or shared by two taps: not explainable
    except TapError as err:
        raise ConfigError(f"study.layers={list(layers)} does not fit {name}: {err}") from None
    per_date = per_date_layers(taps)
    joint = [layer for layer in layers if layer not in per_date]
    if joint:  # e.g. a layer after the dates are fused: no pre and post maps to compare
        available = per_date_layers(resolve_taps(net, shared=True))
        raise ConfigError(
            f"study.layers={list(layers)}: {', '.join(joint)} "
            f"{'is' if len(joint) == 1 else 'are'} not among {name}'s per-date layers (the study "
            f"compares the two dates' maps of one layer): {', '.join(available)}"
        )


@task_wrapper
def study(cfg: DictConfig) -> dict[str, Any]:
    """Train (optionally), study every model, write ``study.json`` and ``report.md``."""
    started = time.perf_counter()
    output_dir = prepare_run(cfg, results=("study.json", "report.md", "plots"), checks=study_checks)
    given = {} if cfg.study.train_zoo else given_checkpoints(cfg)
    names = zoo_architectures(cfg.study.get("zoo")) if cfg.study.train_zoo else list(given)
    device = resolve_device(cfg.device)
    root = study_root(cfg)
    images = read_split(root, cfg.study.split, cfg.study.get("max_images"))
    check_change((image.label for image in images), cfg.study.split, root)
    models = train_zoo(cfg, names) if cfg.study.train_zoo else given
    seconds: dict[str, Any] = {"setup_and_training": time.perf_counter() - started, "study": {}}
    results: dict[str, Any] = {}
    for name, path in tqdm(models.items(), desc="study: models", unit="model"):
        begun = time.perf_counter()
        net, _ = read_checkpoint(path)
        results[name] = {
            "checkpoint": str(path),
            **study_model(
                net,
                images,
                study_settings(cfg, name),
                name=name,
                device=device,
                progress=log.info,
            ),
        }
        seconds["study"][name] = time.perf_counter() - begun
    record = {
        "data": {"root": str(root), "split": cfg.study.split, "images": len(images)},
        # the seed draws the random maps and curve orders, the re-initialisations, the bootstrap
        "settings": {**OmegaConf.to_container(cfg.study, resolve=True), "seed": cfg.seed},
        # study.json is written with sorted keys; "order" keeps the order the models were given
        "order": list(results),
        "architectures": results,
    }
    loaders = {name: (lambda p=path: read_checkpoint(p)[0]) for name, path in models.items()}
    plots = write_report(output_dir, record, images, loaders, device)
    loggers = instantiate_loggers(cfg.get("logger"), "study")
    # what was studied: checkpoints, settings and data (study.data: the data group is unused)
    log_hyperparameters(loggers, cfg, {"data": None} if cfg.study.get("data") else None)
    log_study(loggers, record, plots)
    seconds["total"] = time.perf_counter() - started
    record["seconds"] = seconds  # wall time: data and zoo training, each model's study, all
    write_json(output_dir / "study.json", record)
    log.info(
        "study: %s and %s in %.1f min (%.1f min data and training)",
        output_dir / "study.json",
        output_dir / "report.md",
        seconds["total"] / 60,
        seconds["setup_and_training"] / 60,
    )
    return record

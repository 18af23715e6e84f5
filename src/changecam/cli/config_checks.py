"""Config guards run before anything is built: typos and invalid choices fail at start.

Every ``_target_`` node of the config is checked against the signature of the class or
function it names: an unknown key is reported with the allowed keys (and a close match), a
value outside a ``Literal[...]`` annotation with the allowed values, a scalar of the wrong
type with the expected type. The allowed values come from the annotations themselves
(``changecam.models.siamese_unet.Fusion``, ``changecam.training.module.Loss``, Lightning's
``precision`` ...), so no list of choices is repeated here.

The check runs twice per command. First, before the heavy imports (torch, Lightning), with
``import_targets=False``: changecam's own targets are read from their source with :mod:`ast`
(:func:`static_signature`), so a typo in ``model.``/``data.``/``module.`` keys or a value outside
a ``Literal`` fails in about a second; other targets wait. Then in full, with every target
imported, in :func:`changecam.cli.common.prepare_run`.

:func:`check_device` then checks the switches that depend on the machine (mixed precision,
``torch.compile``, synchronised batch norm) and says why one cannot work here.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import operator
import os
import re
import shutil
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import hydra
from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/changecam

HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


class ConfigError(ValueError):
    """The composed config names an unknown key or a value that is not allowed."""


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The job config as plain, resolved Python containers (without the ``hydra`` node)."""
    return {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }


# maps read by key, whose keys a command adds (+study.epochs.fc_ef=3: one architecture's
# value); the command that reads one checks its keys
OPEN_MAPS = frozenset({"study.epochs", "study.max_objects"})


def check_config(cfg: DictConfig, import_targets: bool = True) -> None:
    """Raise :class:`ConfigError` listing every unknown key and invalid value of the config;
    then put numbers given as text (``seed=${oc.env:SLURM_ARRAY_TASK_ID}``) into it as numbers.

    Args:
        cfg: the composed config.
        import_targets: import every ``_target_`` to read its signature; ``False`` checks only
            changecam's own targets, from their source, without importing anything heavy.
    """
    missing = missing_values(cfg)
    if missing:
        raise ConfigError("required value(s) not set:\n  " + "\n  ".join(missing))
    tree = resolved(cfg)
    errors = [
        message
        for path, node in target_nodes(tree)
        for message in check_node(path, node, import_targets)
    ]
    errors += added_key_problems(cfg, tree)
    errors += number_path_problems(tree)
    problems, numbers = plain_value_problems(tree)
    errors += problems
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    for key, number in numbers.items():  # as a number: its consumers need not convert text
        OmegaConf.update(cfg, key, number, merge=False)


def added_key_problems(cfg: DictConfig, tree: dict[str, Any]) -> list[str]:
    """Keys a ``+key=``/``++key=`` override adds outside every ``_target_`` node (whose
    signatures are checked) that the command's config does not have and no interpolation
    reads: a typo nothing would read (Hydra itself suggests ``+treshold=`` for ``treshold=``).

    Needs the run's Hydra config (its overrides, config name and group choices); without one,
    or when the config cannot be composed again without those overrides, nothing is checked.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    groups = set(hydra_cfg.runtime.choices)  # every config group of this composition
    targets = {path for path, _ in target_nodes(tree)}
    unresolved = OmegaConf.to_yaml(cfg)
    added = []
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as typed
    for override in OverridesParser.create().parse_overrides(task):
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.startswith("hydra"):
            continue
        if key in groups or "/" in key:  # a config group (+hparams_search=optuna)
            continue
        parts = key.split(".")
        if any(".".join(parts[:i]) in targets for i in range(1, len(parts) + 1)):
            continue  # inside (or making) a _target_ node: its signature is checked
        if ".".join(parts[:-1]) in OPEN_MAPS:
            continue  # read by key: its command checks the names
        # an interpolation reads it (+run_label=x task_name=${run_label}), or a part of it
        # (${run.label}, ${labels[0]}), also as a resolver's argument (${oc.select:run_label,x})
        # or relatively (${..run_label}); not one whose path only ends in its name
        # (${trainer.max_epochs} reads no top-level max_epochs)
        path = r"\$\{(?:[^}]*[:,\s]|\.+)?" + re.escape(key) + r"(?=[\s,:}.\[])"
        if re.search(path, unresolved):
            continue
        added.append((override, key))
    if not added:
        return []
    dropped = {o.input_line for o, _ in added}
    kept = [o for o in task if o not in dropped]
    try:
        base = OmegaConf.to_container(
            _compose_again(
                hydra_cfg.job.config_name,
                [*OmegaConf.to_container(hydra_cfg.overrides.hydra, resolve=False), *kept],
            ),
            resolve=False,
        )
    except Exception:  # cannot tell which keys the config has: the other checks still run
        return []
    problems = []
    for _, key in added:
        *parents, name = key.split(".")
        node: Any = base
        for part in parents:
            node = _child(node, part)
        if _child(node, name) is not _ABSENT:
            continue  # ++ of a key the config has: an override like any other
        siblings = list(node) if isinstance(node, dict) else []
        close = difflib.get_close_matches(name, siblings, n=1)
        hint = f"; did you mean '{'.'.join([*parents, close[0]])}'?" if close else ""
        problems.append(f"{key}: unknown key (+/++ added it, but nothing reads it{hint})")
    return problems


def plain_value_problems(tree: dict[str, Any]) -> tuple[list[str], dict[str, int | float]]:
    """Overridden keys outside every ``_target_`` node whose value is not of the type of the
    command's own value: a switch given as ``predict.resume=no`` (a string, which Python would
    take as true) or a number as ``threshold=abc``. Keys whose own value is ``null``, a string
    or a container are left to their consumer.

    Text that reads as a number where the command's value is one (``seed='7'``, or
    ``seed=${oc.env:SLURM_ARRAY_TASK_ID}``, which OmegaConf gives as text) is returned as that
    number (an ``int`` where the command's is one and the text is whole), for
    :func:`check_config` to put in the config before anything reads it.

    Needs the run's Hydra config, like :func:`added_key_problems`.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return [], {}
    hydra_cfg = HydraConfig.get()
    groups = set(hydra_cfg.runtime.choices)
    targets = {path for path, _ in target_nodes(tree)}
    checked = []
    # unresolved: a ListConfig resolves the ${...} inside its strings when they are read
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    for override in OverridesParser.create().parse_overrides(task):
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra") or key in groups or "/" in key:
            continue
        parts = key.split(".")
        if any(".".join(parts[:i]) in targets for i in range(1, len(parts) + 1)):
            continue  # inside a _target_ node: its signature is checked
        value: Any = tree
        for part in parts:
            value = _child(value, part)
        if isinstance(value, (str, int, float)):  # bool is an int
            checked.append((override.input_line, key, value))
    if not checked:
        return [], {}
    dropped = {line for line, _, _ in checked}
    kept = [o for o in task if o not in dropped]
    hydra_overrides = OmegaConf.to_container(hydra_cfg.overrides.hydra, resolve=False)
    try:
        base = OmegaConf.to_container(
            _compose_again(hydra_cfg.job.config_name, [*hydra_overrides, *kept]),
            resolve=True,
        )
    except Exception:  # cannot tell the command's own values: the other checks still run
        return [], {}
    problems, numbers = [], {}
    for line, key, value in checked:
        own: Any = base
        for part in key.split("."):
            own = _child(own, part)
        if isinstance(own, bool) and not isinstance(value, bool):
            # ${oc.env:X} is text, which Python reads as true whatever it says
            hint = f" (from an environment variable: {key}='${{oc.decode:${{oc.env:NAME}}}}')"
            problems.append(f"{key}={value!r} must be true or false{hint if '${' in line else ''}")
        elif isinstance(own, (int, float)) and not isinstance(own, bool):
            if isinstance(value, str) and _number(value):
                number = float(value)
                whole = isinstance(own, int) and number.is_integer()
                numbers[key] = int(number) if whole else number
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{key}={value!r} must be a number (like its default, {own})")
    return problems, numbers


_ABSENT = object()

# paths outside every _target_ node (whose signatures are checked): null by default, so the
# value checks leave them to their consumer
PATH_KEYS = ("ckpt_path", "input.pre", "input.post", "input.dir", "explain.roi", "study.data")


def number_path_problems(tree: dict[str, Any]) -> list[str]:
    """Path keys Hydra read as numbers (``input.dir=2023``, a folder named by its year): a
    path cannot be one, and the text is not always kept (``2023_01`` reads as 202301)."""
    problems = []
    for key in PATH_KEYS:
        node: Any = tree
        for part in key.split("."):
            node = _child(node, part)
        if isinstance(node, int | float) and not isinstance(node, bool):
            problems.append(
                f"{key}={node} is read as a number, not a path: quote it ({key}=\"'<path>'\" "
                "on the command line)"
            )
    return problems


def _number(value: Any) -> bool:
    """Whether ``value`` is text its consumer reads as a number (``seed='7'``)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _child(node: Any, part: str) -> Any:
    """``node[part]`` of a config container (a list by its index), or :data:`_ABSENT`."""
    if isinstance(node, dict):
        return node.get(part, _ABSENT)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return _ABSENT


def _compose_again(config_name: str, overrides: list[str]) -> DictConfig:
    """The command's config composed with ``overrides`` (inside a Hydra app or outside one)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from changecam.cli.launch import config_dir  # launch imports this module

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


# What a required (``???``) value is, for the message when it is not given.
REQUIRED_HINTS = {
    "data.root": "a folder of labelled pairs in either LEVIR layout: "
    "<root>/{train,val,test}/{A,B,label}/*.png, or <root>/{A,B,label}/*.png with "
    "<root>/list/{train,val,test}.txt",
    "ckpt_path": "a checkpoint written by train.py (.ckpt) or a plain state_dict",
    "module.init_from": "the checkpoint to start from, e.g. make train's "
    "outputs/quickstart/runs/<time>/checkpoints/best.ckpt, or a plain state_dict",
}


def missing_values(cfg: DictConfig) -> list[str]:
    """One line per required value the config leaves unset, saying how to set it: every ``???``
    value, and ``data.root: null`` (an experiment cannot merge ``???`` over the data group's
    default root, so it sets ``null``: e.g. ``experiment=real_small``), and every key the
    config's ``required`` list names that is ``null`` (for the same reason: e.g.
    ``module.init_from`` in ``experiment=real_small_finetune``)."""
    keys = set()
    for key in cfg:
        if key == "hydra":  # Hydra's own node: interpolations only Hydra's run fills in
            continue
        if OmegaConf.is_missing(cfg, key):
            keys.add(str(key))
        elif OmegaConf.is_config(cfg[key]):
            keys |= {f"{key}.{k}" for k in OmegaConf.missing_keys(cfg[key])}
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "root" in data and data.get("root") is None:
        keys.add("data.root")
    for key in cfg.get("required") or []:
        if OmegaConf.select(cfg, str(key), throw_on_missing=False) is None:
            keys.add(str(key))
    keys = sorted(keys)
    return [
        f"{key} is required: set {key}=<value> on the command line"
        + (f" ({REQUIRED_HINTS[key]})" if key in REQUIRED_HINTS else "")
        for key in keys
    ]


def target_nodes(tree: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``(dotted path, node)`` of a resolved config tree that has a ``_target_``."""
    if isinstance(tree, dict):
        if "_target_" in tree:
            yield path, tree
        for key, value in tree.items():
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from target_nodes(value, f"{path}[{i}]")


@dataclass(frozen=True)
class Signature:
    """What a config node may hold: the named parameters, whether ``**kwargs`` takes any other
    key, and the parameter annotations that could be evaluated."""

    named: tuple[str, ...]
    takes_any_key: bool
    hints: dict[str, Any]


def imported_signature(target: str) -> Signature | str | None:
    """The signature of an imported target; an error message if it cannot be imported, ``None``
    for builtins without a signature."""
    try:
        obj = hydra.utils.get_object(target)
    except Exception as err:
        return f"cannot be imported: {err}"
    func = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return None
    signature = Signature(
        named=tuple(
            n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ),
        takes_any_key=any(p.kind is p.VAR_KEYWORD for p in params.values()),
        hints=annotations(func),
    )
    forwarded_to = KWARGS_FORWARDED_TO.get(f"{obj.__module__}.{obj.__qualname__}")
    if signature.takes_any_key and forwarded_to is not None:
        inner = imported_signature(forwarded_to)
        if isinstance(inner, Signature):  # its own keys' values stay with the first signature
            named = signature.named + tuple(n for n in inner.named if n not in signature.named)
            return Signature(named, inner.takes_any_key, signature.hints)
    return signature


# targets whose ``**kwargs`` go to another callable only when it first runs, after the run has
# begun (WandbLogger starts its W&B run lazily): their keys are judged against that callable
KWARGS_FORWARDED_TO = {"lightning.pytorch.loggers.wandb.WandbLogger": "wandb.init"}


def check_node(path: str, node: dict[str, Any], import_targets: bool = True) -> list[str]:
    """Problems of one ``_target_`` node (empty when it is fine, or when ``import_targets`` is
    false and the target is not changecam's own)."""
    target = node["_target_"]
    signature = imported_signature(target) if import_targets else static_signature(target)
    if isinstance(signature, str):
        return [f"{path}._target_={target!r} {signature}"]
    if signature is None:
        return []
    named, takes_any_key, hints = signature.named, signature.takes_any_key, signature.hints
    errors = []
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        where = f"{path}.{key}" if path else key
        if key not in named:
            if not takes_any_key:
                close = difflib.get_close_matches(key, named, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(
                    f"{where}: unknown key for {target}{hint}; allowed keys: {', '.join(named)}"
                )
            continue
        if key in hints:
            problem = check_value(value, hints[key])
            if problem:
                errors.append(f"{where}={value!r} is not allowed; expected {problem}")
    return errors


def annotations(func: Callable[..., Any]) -> dict[str, Any]:
    """Evaluated parameter annotations of ``func``; ones that cannot be evaluated are left out."""
    try:
        return typing.get_type_hints(func)
    except Exception:  # one unresolvable forward reference: evaluate the others one by one
        pass
    func = inspect.unwrap(func)
    namespace = getattr(func, "__globals__", {})
    hints = {}
    for name, ann in getattr(func, "__annotations__", {}).items():
        try:
            hints[name] = eval(ann, namespace) if isinstance(ann, str) else ann
        except Exception:
            continue
    return hints


def check_value(value: Any, annotation: Any) -> str | None:
    """``None`` if a scalar ``value`` fits ``annotation``, else a description of what fits.

    Only scalars are checked (lists and nested configs are left to the constructors), and
    an annotation that cannot be checked (``Any``, callables, forward references) accepts.
    """
    if not isinstance(value, str | int | float | bool | types.NoneType):
        return None
    literals: list[Any] = []
    classes: list[type] = []
    for member in union_members(annotation):
        origin = typing.get_origin(member)
        if origin is Literal:
            literals += typing.get_args(member)
        elif member is types.NoneType:
            classes.append(types.NoneType)
        elif inspect.isclass(origin or member):
            classes.append(origin or member)
        else:
            return None  # unknown kind of annotation: accept
    if any(type(x) is type(value) and x == value for x in literals):
        return None
    for cls in classes:
        if isinstance(value, cls) and not (isinstance(value, bool) and cls in (int, float)):
            return None
        if cls is float and isinstance(value, int) and not isinstance(value, bool):
            return None
    parts = []
    if literals:
        parts.append("one of " + ", ".join(repr(x) for x in literals))
    parts += [("None" if cls is types.NoneType else cls.__name__) for cls in classes]
    return " or ".join(parts)


def union_members(annotation: Any) -> list[Any]:
    """The members of a ``Union``/``X | Y`` annotation, flattened (the annotation itself otherwise)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in union_members(arg)]
    return [annotation]


def static_signature(target: str) -> Signature | None:
    """The signature of a changecam target read from its source without importing it, or
    ``None`` when it cannot be read that way (not changecam's, or defined dynamically)."""
    module, _, name = target.rpartition(".")
    if module != "changecam" and not module.startswith("changecam."):
        return None
    found = _find_definition(module, name)
    if found is None:
        return None
    definition, aliases = found
    if isinstance(definition, ast.ClassDef):
        init = next(
            (n for n in definition.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
            None,
        )
        if init is not None:
            return _function_signature(init, aliases, skip_first=True)
        decorators = [ast.unparse(d) for d in definition.decorator_list]
        if any(d.split("(")[0].rsplit(".", 1)[-1] == "dataclass" for d in decorators):
            fields = [
                n
                for n in definition.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            ]
            return Signature(
                named=tuple(f.target.id for f in fields),
                takes_any_key=False,
                hints={
                    f.target.id: h
                    for f in fields
                    if (h := _annotation(f.annotation, aliases)) is not None
                },
            )
        return None  # the constructor is inherited: only the import knows it
    return _function_signature(definition, aliases, skip_first=False)


@functools.cache
def _module_tree(module: str) -> ast.Module | None:
    relative = Path(*module.split(".")[1:])
    for path in (PACKAGE_DIR / relative.with_suffix(".py"), PACKAGE_DIR / relative / "__init__.py"):
        if path.is_file():
            return ast.parse(path.read_text(encoding="utf-8"))
    return None


def _find_definition(
    module: str, name: str, depth: int = 0
) -> tuple[ast.ClassDef | ast.FunctionDef, dict[str, Any]] | None:
    """The class or function ``name`` of ``module`` (following ``from changecam... import``
    re-exports, also lazy ones inside functions) and the names its annotations may use."""
    tree = _module_tree(module)
    if tree is None or depth > 4:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            return node, _aliases(module)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("changecam"):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_definition(node.module, alias.name, depth + 1)
    return None


@functools.cache
def _aliases(module: str) -> dict[str, Any]:
    """Module-level ``Name = <expr>`` assignments (``Fusion = Literal[...]``) and the names
    imported from other changecam modules (as ``(module, name)``, resolved when used)."""
    tree = _module_tree(module)
    names: dict[str, Any] = {}
    for n in tree.body if tree is not None else []:
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            names[n.targets[0].id] = n.value
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("changecam"):
            for alias in n.names:
                names[alias.asname or alias.name] = (n.module, alias.name)
    return names


def _function_signature(
    func: ast.FunctionDef, aliases: dict[str, Any], skip_first: bool
) -> Signature:
    args = func.args
    params = [*args.posonlyargs, *args.args][1 if skip_first else 0 :] + list(args.kwonlyargs)
    return Signature(
        named=tuple(a.arg for a in params),
        takes_any_key=args.kwarg is not None,
        hints={
            a.arg: h
            for a in params
            if a.annotation is not None and (h := _annotation(a.annotation, aliases)) is not None
        },
    )


_BUILTINS: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "None": None}


def _annotation(node: ast.expr, aliases: dict[str, Any], depth: int = 0) -> Any:
    """An annotation's value for :func:`check_value`, built from its source: ``Literal[...]``,
    builtin scalars, ``None``, unions of them and module-level aliases; ``None`` (meaning: do not
    check) for anything else."""
    if depth > 8:
        return None
    if isinstance(node, ast.Constant):
        if node.value is None:
            return types.NoneType
        if isinstance(node.value, str):  # a string annotation
            try:
                return _annotation(ast.parse(node.value, mode="eval").body, aliases, depth + 1)
            except SyntaxError:
                return None
        return None
    if isinstance(node, ast.Name):
        if node.id in _BUILTINS:
            value = _BUILTINS[node.id]
            return types.NoneType if value is None else value
        alias = aliases.get(node.id)
        if isinstance(alias, tuple):  # imported from another changecam module
            other = _aliases(alias[0])
            value = other.get(alias[1])
            return None if value is None else _annotation(ast.Name(alias[1]), other, depth + 1)
        if alias is not None:
            return _annotation(alias, aliases, depth + 1)
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left = _annotation(node.left, aliases, depth + 1)
        right = _annotation(node.right, aliases, depth + 1)
        return None if left is None or right is None else left | right
    if isinstance(node, ast.Subscript):
        head = ast.unparse(node.value).rsplit(".", 1)[-1]
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Literal":
            if not all(isinstance(i, ast.Constant) for i in items):
                return None
            return Literal[tuple(i.value for i in items)]  # type: ignore[misc]
        if head in ("Optional", "Union"):
            members = [_annotation(i, aliases, depth + 1) for i in items]
            if any(m is None for m in members):
                return None
            if head == "Optional":
                members.append(types.NoneType)
            return functools.reduce(operator.or_, members)
    return None


def uses_cuda(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` runs on a CUDA GPU on this machine."""
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def no_cuda(device: str) -> str:
    """Why ``device=<a CUDA device>`` cannot run here (eval's check and ``resolve_device``)."""
    return f"device={device} but CUDA is not available; use device=cpu or device=auto"


def check_device(cfg: DictConfig, one_device: bool = False) -> None:
    """Raise :class:`ConfigError` for switches this machine cannot honour, saying why.

    Checked: ``trainer.accelerator`` (a GPU must be there), ``trainer.precision`` (fp16 needs
    a CUDA GPU; bf16 runs on the CPU and on GPUs with bfloat16), ``module.compile``
    (TorchInductor on the CPU needs a C++ compiler) and ``trainer.sync_batchnorm``
    (synchronised batch norm runs on GPUs only).

    ``one_device``: the command runs one process on ``cfg.device`` whatever ``trainer=`` says
    (eval.py), so the precision is judged on that device and the trainer's accelerator and
    batch-norm switch are not.
    """
    import torch

    trainer = dict(cfg.get("trainer") or {})
    if one_device:
        name = str(cfg.get("device", "auto"))  # a name that is no device: resolve_device says so
        gpu = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
        if gpu and not torch.cuda.is_available():
            raise ConfigError(f"not possible on this machine:\n  {no_cuda(name)}")
        trainer.update(accelerator="cuda" if gpu else "cpu", sync_batchnorm=False)
    module = cfg.get("module") or {}
    cuda = uses_cuda(str(trainer.get("accelerator", "auto")))
    errors: list[str] = []
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        errors.append(
            f"trainer.accelerator={accelerator}: this machine has no usable CUDA GPU "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
            "use trainer=cpu (or trainer=ddp_cpu for DDP) or trainer.accelerator=auto"
        )
    precision = str(trainer.get("precision", "32-true"))
    if precision in ("16-mixed", "16", "16-true") and not cuda:
        why = (
            "whole float16 weights are not trained on the CPU here"
            if precision == "16-true"
            else "Lightning has no float16 mixed precision on the CPU and would train in "
            "bf16-mixed instead"
        )
        errors.append(
            f"trainer.precision={precision}: float16 needs a CUDA GPU and this run uses the CPU "
            f"({why}); use trainer.precision=bf16-mixed on the CPU"
        )
    if precision.startswith("bf16") and cuda and not torch.cuda.is_bf16_supported():
        errors.append(
            f"trainer.precision={precision}: {torch.cuda.get_device_name()} has no bfloat16 support; "
            "use trainer.precision=16-mixed"
        )
    if module.get("compile") and not cuda and not cpp_compiler():
        cxx = os.environ.get("CXX")
        found = (
            f"CXX={cxx!r}, the one it uses, is not a command on the PATH (correct or unset CXX)"
            if cxx is not None
            else "g++, the one it uses without CXX, was not found (install g++ or set CXX)"
        )
        errors.append(
            "module.compile=true: torch.compile (TorchInductor) on the CPU needs a C++ compiler: "
            f"{found}; use module.compile=false"
        )
    if trainer.get("sync_batchnorm") and not cuda:
        errors.append(
            "trainer.sync_batchnorm=true: torch.nn.SyncBatchNorm runs on GPUs only and this run uses "
            "the CPU; set trainer.sync_batchnorm=false (trainer=ddp_cpu does)"
        )
    if errors:
        raise ConfigError("not possible on this machine:\n  " + "\n  ".join(errors))


def cpp_compiler() -> str | None:
    """The C++ compiler TorchInductor would use on the CPU, if there is one: ``$CXX``, else
    ``g++`` (``clang++`` on macOS), as ``torch._inductor.config.cpp.cxx`` picks it (another
    compiler on the PATH, ``c++`` say, is not tried)."""
    name = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    return name if name and shutil.which(name) else None  # CXX set empty: Inductor fails too

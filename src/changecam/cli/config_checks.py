"""Config guards run before anything is built: typos and invalid choices fail at start.

Every ``_target_`` node of the config is checked against the signature of the class or
function it names: an unknown key is reported with the allowed keys (and a close match), a
value outside a ``Literal[...]`` annotation with the allowed values, a scalar of the wrong
type with the expected type. The allowed values come from the annotations themselves
(``changecam.models.siamese_unet.Fusion``, ``changecam.training.module.Loss``, Lightning's
``precision`` ...), so no list of choices is repeated here.

:func:`check_device` then checks the switches that depend on the machine (mixed precision,
``torch.compile``, synchronised batch norm) and says why one cannot work here.
"""

from __future__ import annotations

import difflib
import inspect
import os
import shutil
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

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


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every unknown key and invalid value of the config."""
    errors = [
        message for path, node in target_nodes(resolved(cfg)) for message in check_node(path, node)
    ]
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


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


def check_node(path: str, node: dict[str, Any]) -> list[str]:
    """Problems of one ``_target_`` node (empty when it is fine)."""
    target = node["_target_"]
    try:
        obj = hydra.utils.get_object(target)
    except Exception as err:
        return [f"{path}._target_={target!r} cannot be imported: {err}"]
    func = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return []
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any_key = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hints = annotations(func)
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


def uses_cuda(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` runs on a CUDA GPU on this machine."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_device(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for switches this machine cannot honour, saying why.

    Checked: ``trainer.accelerator`` (a GPU must be there), ``trainer.precision`` (fp16 needs
    a CUDA GPU; bf16 runs on the CPU and on GPUs with bfloat16), ``module.compile``
    (TorchInductor on the CPU needs a C++ compiler) and ``trainer.sync_batchnorm``
    (synchronised batch norm runs on GPUs only).
    """
    trainer = cfg.get("trainer") or {}
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
        errors.append(
            f"trainer.precision={precision}: float16 needs a CUDA GPU and this run uses the CPU "
            "(torch has no fp16 autocast for CPU training); use trainer.precision=bf16-mixed on the CPU"
        )
    if precision.startswith("bf16") and cuda and not torch.cuda.is_bf16_supported():
        errors.append(
            f"trainer.precision={precision}: {torch.cuda.get_device_name()} has no bfloat16 support; "
            "use trainer.precision=16-mixed"
        )
    if module.get("compile") and not cuda and not cpp_compiler():
        errors.append(
            "module.compile=true: torch.compile (TorchInductor) on the CPU needs a C++ compiler and "
            "none was found (set CXX or install g++); use module.compile=false"
        )
    if trainer.get("sync_batchnorm") and not cuda:
        errors.append(
            "trainer.sync_batchnorm=true: torch.nn.SyncBatchNorm runs on GPUs only and this run uses "
            "the CPU; set trainer.sync_batchnorm=false (trainer=ddp_cpu does)"
        )
    if errors:
        raise ConfigError("not possible on this machine:\n  " + "\n  ".join(errors))


def cpp_compiler() -> str | None:
    """The C++ compiler TorchInductor would use on the CPU, if there is one."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None

"""Start a run from another run's weights (``module.init_from``) and freeze named parts.

Initialising is not resuming: ``train.py ckpt_path=...`` continues a run (optimiser, epoch,
RNG states), whereas ``module.init_from=<file>`` copies only the network's weights into a new
run, which starts at epoch 0 with a fresh optimiser. The file goes through the checks of every
command that reads weights (:func:`changecam.training.checkpoint.read_network_state`:
``torch.load(weights_only=True)``, pickled code refused, non-finite weights refused), and an
architecture mismatch gets the message of eval and predict, with the ``model=`` that fits the
file (:func:`~changecam.training.checkpoint.mismatch_message`).

``module.init_strict=false`` loads every tensor whose name and shape agree and lists the rest.
``module.init_include=[...]`` loads only the named parts (e.g. the per-date encoders and the
bottleneck, leaving the decoder at its fresh initialisation); the file's other tensors are not
read into the network. ``module.freeze=[...]`` names parts of the network (:func:`freeze_parts`).
Both take module or parameter names in ``state_dict`` spelling, with shell wildcards.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from changecam.models import ExternalModel, network_config
from changecam.training.checkpoint import (
    CheckpointError,
    mismatch_message,
    own_prefix,
    read_network_state,
    state_differences,
    suggest_model,
)

log = logging.getLogger("changecam")


@dataclass(frozen=True)
class InitReport:
    """What :func:`load_initial_weights` loaded and what it left at its fresh initialisation.

    Attributes:
        path: the weights file.
        loaded: the network's tensors taken from the file.
        missing: the network's tensors the file lacks (left as initialised).
        unexpected: the file's tensors the network has no place for (ignored).
        shape_mismatches: ``name: file (..) vs model (..)`` (left as initialised).
        excluded: the network's tensors outside ``module.init_include`` (left as initialised).
        hint: when anything was skipped, the ``model=`` overrides that fit the whole file.
        prefix: where the loaded network lies in the run's network (``model.`` for a
            ``model=external`` user network read from its plain state dict), for
            :meth:`not_loaded`.
    """

    path: str
    loaded: list[str]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    hint: str | None = None
    prefix: str = ""

    def not_loaded(self) -> list[str]:
        """The run network's tensors left as initialised (its ``state_dict`` spelling)."""
        names = self.missing + [s.split(":")[0] for s in self.shape_mismatches] + self.excluded
        return sorted(self.prefix + n for n in set(names))

    @property
    def skipped(self) -> list[str]:
        """Every tensor name not loaded (the network's and the file's), sorted."""
        names = self.missing + self.unexpected + [s.split(":")[0] for s in self.shape_mismatches]
        return sorted(set(names))

    def summary(self) -> str:
        """One message: how many tensors were loaded, then every skipped one, by reason."""
        total = len(self.loaded) + len(self.missing) + len(self.shape_mismatches)
        total += len(self.excluded)
        lines = [f"module.init_from={self.path}: loaded {len(self.loaded)} of {total} tensors"]
        if self.excluded:
            lines.append(
                f"  left as initialised, outside module.init_include: {len(self.excluded)} "
                f"tensors ({', '.join(_parts(self.excluded))})"
            )
        for what, names in (
            ("not in the file (left as initialised)", self.missing),
            ("in the file but not in the network (ignored)", self.unexpected),
            ("shapes differ (left as initialised)", self.shape_mismatches),
        ):
            if names:
                lines.append(f"  skipped, {what}: " + ", ".join(names))
        if self.hint:
            lines.append(f"  a config that fits the whole file: {self.hint}")
        return "\n".join(lines)


def _target_network(net: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The module the file's keys belong to: ``net``, or the user's own network inside a
    ``model=external`` wrapper when the file is its plain state dict."""
    if isinstance(net, ExternalModel) and not set(state) & set(net.state_dict()):
        return net.model
    return net


def _counts(name: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor that fits by name and shape is evidence that the file fits: batch-norm
    step counters and one-element tensors (a one-channel head's bias) fit networks of any
    width."""
    return not name.endswith("num_batches_tracked") and tensor.numel() > 1


def load_initial_weights(
    net: nn.Module, path: str | Path, strict: bool = True, include: Sequence[str] = ()
) -> InitReport:
    """Copy the network weights of ``path`` (a changecam checkpoint or a plain state dict)
    into ``net``, in place.

    Args:
        net: the network the run's ``model`` config built.
        path: the weights file.
        strict: require exactly the keys and shapes of ``net`` (of its ``include``d parts);
            ``False`` loads those whose name and shape agree and reports the others (and,
            with shape mismatches, the ``model=`` that fits the whole file).
        include: load only these parts of ``net`` (module or parameter names, each covering
            everything under it, shell wildcards allowed; as :func:`freeze_parts`); empty:
            all. The other tensors of ``net`` stay as initialised, and the file's tensors
            outside them are ignored.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an ``include`` pattern names no part of ``net``.
        CheckpointError: unreadable file, pickled code, non-finite weights; with ``strict``, any
            mismatch (the message names it and the ``model=`` that fits the file); without,
            a file of which not one tensor fits (batch-norm step counters and one-element
            tensors do not count: they fit networks of any width).
    """
    path = Path(path)
    include = tuple(str(p) for p in include)
    if not path.is_file():
        raise FileNotFoundError(f"module.init_from={path} does not exist")
    try:
        _, state, stored_cfg = read_network_state(path)
        target = _target_network(net, state)
        prefix = "model." if target is not net else ""  # the user network's in the wrapper
        state = own_prefix(state, target.state_dict())
        check_patterns(target, include, "module.init_include")
        expected = target.state_dict()
        cfg = network_config(target) or {
            "_target_": f"{type(target).__module__}.{type(target).__qualname__}"
        }
        excluded: list[str] = []
        offered: Mapping[str, torch.Tensor] = state
        if include:
            excluded = [k for k in expected if not any(_matches(p, k) for p in include)]
            left_out = set(excluded)
            expected = {k: v for k, v in expected.items() if k not in left_out}
            offered = {k: v for k, v in state.items() if any(_matches(p, k) for p in include)}
        missing, unexpected, shapes = state_differences(expected, offered)
        if strict:
            if missing or unexpected or shapes:  # the hint reads the whole file
                raise CheckpointError(
                    mismatch_message(path, cfg, missing, unexpected, shapes, state, stored_cfg)
                )
            target.load_state_dict(offered, strict=not include)
            return InitReport(str(path), list(expected), excluded=excluded, prefix=prefix)
        fits = {k: v for k, v in offered.items() if k in expected and v.shape == expected[k].shape}
        if not any(_counts(k, v) for k, v in fits.items()):
            only = f" (only {', '.join(fits)}, which fit networks of any width)" if fits else ""
            raise CheckpointError(
                f"not one tensor fits{only} (module.init_strict=false loads those whose name "
                "and shape agree). "
                + mismatch_message(path, cfg, missing, unexpected, shapes, state, stored_cfg)
            )
        result = target.load_state_dict(fits, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys  # fits holds the net's keys only
        hint = suggest_model(state, stored_cfg, cfg) if missing or unexpected or shapes else None
    except CheckpointError as err:
        raise CheckpointError(f"cannot initialise from it (module.init_from): {err}") from None
    return InitReport(str(path), list(fits), missing, unexpected, shapes, excluded, hint, prefix)


def _names(net: nn.Module) -> list[str]:
    """Every module and parameter name of ``net`` (dotted, the ``state_dict`` spelling)."""
    return [n for n, _ in net.named_modules() if n] + [n for n, _ in net.named_parameters()]


def top_level_names(net: nn.Module) -> list[str]:
    """The direct children of ``net`` that hold parameters (what ``module.freeze`` usually names)."""
    return [n for n, child in net.named_children() if any(True for _ in child.parameters())]


def _parts(names: Sequence[str]) -> list[str]:
    """The top-level parts ``names`` lie in, in order (``encoder1.conv1.weight`` → ``encoder1``)."""
    return list(dict.fromkeys(n.split(".")[0] for n in names))


def _matches(pattern: str, name: str) -> bool:
    """``name`` is ``pattern`` or lies under it (``encoder1`` covers ``encoder1.conv1.bn``);
    ``pattern`` may hold shell wildcards (``encoder*``)."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


@dataclass(frozen=True)
class FrozenParts:
    """The result of :func:`freeze_parts`.

    Attributes:
        patterns: the ``module.freeze`` entries.
        modules: the frozen modules (whole subtrees), run in eval mode during training.
        parameters: every frozen parameter name.
    """

    patterns: tuple[str, ...]
    modules: tuple[str, ...]
    parameters: tuple[str, ...]


def check_patterns(net: nn.Module, patterns: Sequence[str], option: str) -> None:
    """Raise a ``ValueError`` naming ``option`` and the valid names unless every pattern names
    a part of ``net`` (:func:`_matches`)."""
    names = _names(net)
    unknown = [p for p in patterns if not any(_matches(p, n) for n in names)]
    if unknown:
        raise ValueError(
            f"{option}={list(patterns)}: {', '.join(map(repr, unknown))} names no part of "
            f"{type(net).__name__}; valid top-level names: {', '.join(top_level_names(net))} "
            "(or any dotted module or parameter name under them, e.g. "
            f"{next(n for n, _ in net.named_parameters())}; shell wildcards such as 'encoder*' "
            "are allowed)"
        )


def freeze_parts(net: nn.Module, patterns: Sequence[str]) -> FrozenParts:
    """Freeze the parts of ``net`` that ``patterns`` name: module or parameter names in
    ``state_dict`` spelling (``encoder1``, ``decoder1.upconv``, ``final_conv.weight``), each
    covering everything under it, with optional shell wildcards (``encoder*``).

    A frozen parameter gets ``requires_grad=False`` (the module leaves it out of the
    optimiser). A frozen module also runs in eval mode while training
    (:meth:`ChangeDetectionModule.train`), so its batch-norm running statistics (and dropout)
    stay as loaded too: its whole ``state_dict`` stays bit-identical. A parameter named on its
    own (not its module) is only kept out of the optimiser.

    Raises:
        ValueError: a pattern names nothing in ``net``; the message lists the valid top-level
            names.
    """
    patterns = tuple(str(p) for p in patterns)
    check_patterns(net, patterns, "module.freeze")
    covered = [n for n, _ in net.named_modules() if n and any(_matches(p, n) for p in patterns)]
    modules = [n for n in covered if not any(n.startswith(m + ".") for m in covered)]
    frozen = []
    for name, param in net.named_parameters():
        if any(_matches(p, name) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return FrozenParts(patterns, tuple(modules), tuple(frozen))


def set_frozen_eval(net: nn.Module, frozen: FrozenParts) -> None:
    """Put the frozen modules of ``net`` in eval mode (after ``net.train()``)."""
    found = dict(net.named_modules())
    for name in frozen.modules:
        found[name].eval()

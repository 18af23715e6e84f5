"""Explain a model changecam did not write: declare its layers by module path.

A network written elsewhere has no :class:`~changecam.models.taps.Tap` modules, and hooking one
of its modules directly is ambiguous: a shared encoder runs once per date, and a Siamese model
that stacks both dates on the batch axis runs it once for both. :class:`LayerTaps` wraps the
model; each declared layer says how the dates pass through it:

* ``calls``: the module runs once per date, the first call is the pre date and the second the
  post date (a shared encoder called twice);
* ``batch_halves``: it runs once on both dates stacked on the batch axis, the first B rows
  pre and the next B post (``torch.cat([pre, post])``);
* ``batch_interleaved``: the same, stacked ``(b t)``: rows ``pre₀, post₀, pre₁, post₁ ...``
  (``torch.stack([pre, post], 1).flatten(0, 1)``, torchgeo's FC-Siam style);
* ``pre`` / ``post``: it belongs to one date (e.g. one of two unshared encoders), runs once;
* ``fused``: it belongs to no date (after the dates are fused), runs once.

During each forward of the wrapper, hooks route every call or batch slice through its own Tap
(``pre/<name>``, ``post/<name>``, or ``<name>`` for ``fused``; the name is the module path
unless declared), so the explanation engine records it exactly like a changecam tap: one
forward, one backward, one map per date. The hooks exist only during that forward; a module
that runs another number of times than declared is an error after which nothing stays hooked.

``model=external`` (:class:`ExternalModel`) builds the user's network from a factory
(``model.target=pkg.module:make``) and wraps it, for the command-line tools.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from changecam.models.protocol import ChangeNetwork
from changecam.models.protocol import size_multiple as size_multiple_of
from changecam.models.taps import Tap, TapError, find_taps

LayerMode = Literal["calls", "batch_halves", "batch_interleaved", "pre", "post", "fused"]
LAYER_MODES: tuple[LayerMode, ...] = get_args(LayerMode)
Inputs = Literal["pair", "stacked"]
RESERVED_NAMES = frozenset({"input"})  # every model's input layer (changecam.explain)
_RUNS = {"calls": 2}  # runs per forward; every other mode runs once
_MODE_HELP = (
    "calls (once per date: first call pre, second post), batch_halves (both dates on the batch "
    "axis: first B rows pre, next B post), batch_interleaved ((b t) rows: pre, post, pre, post "
    "...), pre or post (one date's module), fused (after the dates are fused)"
)


@dataclass(frozen=True)
class LayerSpec:
    """One declared layer.

    Attributes:
        path: the module's path in the model (``dict(model.named_modules())`` key).
        mode: how the dates pass through it (see the module docs).
        name: public layer name (default the path); the maps are ``pre/<name>`` ...
    """

    path: str
    mode: LayerMode
    name: str

    @property
    def runs(self) -> int:
        """How many times the module must run per forward."""
        return _RUNS.get(self.mode, 1)

    @property
    def tap_names(self) -> tuple[str, ...]:
        """The map names this layer gives, in order."""
        if self.mode in ("pre", "post"):
            return (f"{self.mode}/{self.name}",)
        if self.mode == "fused":
            return (self.name,)
        return (f"pre/{self.name}", f"post/{self.name}")


def layer_specs(layers: Mapping[str, Any]) -> list[LayerSpec]:
    """Parse ``{path: mode}`` or ``{path: {mode: ..., name: ...}}`` declarations, in order.

    Raises:
        TapError: an unknown mode or key, a reserved or repeated name.
    """
    specs: list[LayerSpec] = []
    for path, value in layers.items():
        fields = dict(value) if isinstance(value, Mapping) else {"mode": value}
        unknown = sorted(set(fields) - {"mode", "name"})
        if unknown:
            raise TapError(f"layer {path!r}: unknown key(s) {unknown}; allowed: mode, name")
        mode, name = fields.get("mode"), str(fields.get("name") or path)
        if mode not in LAYER_MODES:
            raise TapError(f"layer {path!r}: mode {mode!r} is not one of: {_MODE_HELP}")
        if name in RESERVED_NAMES or "/" in name:
            raise TapError(
                f"layer {path!r}: the name {name!r} is reserved or contains '/'; give it another "
                f"with {{mode: {mode}, name: <name>}}"
            )
        specs.append(LayerSpec(str(path), mode, name))
    taken = [n for s in specs for n in s.tap_names]
    repeated = sorted({n for n in taken if taken.count(n) > 1})
    if repeated:
        raise TapError(f"declared layers give the same map name(s) {repeated}; name them apart")
    return specs


def find_module(model: nn.Module, path: str) -> nn.Module:
    """``model``'s submodule at ``path``, or a :class:`TapError` listing the nearest names."""
    modules = dict(model.named_modules())
    modules.pop("", None)  # the model itself is no layer
    if path in modules:
        return modules[path]
    close = difflib.get_close_matches(path, list(modules), n=5, cutoff=0.4)
    raise TapError(
        f"{type(model).__name__} has no module {path!r}; nearest names: {close or 'none'} "
        f"(all module paths: [n for n, _ in model.named_modules()], {len(modules)} of them)"
    )


class LayerTaps(nn.Module):
    """A model with declared layers tapped per date; explain it like a changecam network.

    Args:
        model: any ``nn.Module``; called ``model(pre, post)`` (``inputs="pair"``) or
            ``model(torch.stack([pre, post], 1))`` (``inputs="stacked"``, B×2×C×H×W, as
            torchgeo's change models take it); it must return B×1×H×W logits.
        layers: ``{module path: mode}`` in forward order (the last per-date one is the default
            layer), or ``{module path: {"mode": mode, "name": public name}}``; modes:
            ``calls``, ``batch_halves``, ``batch_interleaved``, ``pre``, ``post``, ``fused``.
        inputs: how the model takes the two dates.

    Raises:
        TapError: an unknown module path (with the nearest names), mode or key.
    """

    def __init__(
        self, model: nn.Module, layers: Mapping[str, Any] | None = None, inputs: Inputs = "pair"
    ) -> None:
        super().__init__()
        if inputs not in get_args(Inputs):
            raise ValueError(f"inputs={inputs!r} is not one of {get_args(Inputs)}")
        self.model = model
        self.inputs = inputs
        self.specs = layer_specs(layers or {})
        # unknown paths fail here, not at the first forward
        self._modules_hooked = [find_module(model, spec.path) for spec in self.specs]
        own = set(find_taps(model))  # a changecam network's own taps
        clash = sorted(own & {n for s in self.specs for n in s.tap_names})
        if clash:
            raise TapError(
                f"declared layers give the map name(s) {clash}, which {type(model).__name__} "
                "already taps itself: name them apart with {mode: ..., name: <name>}"
            )
        self.taps = nn.ModuleList(Tap(n) for s in self.specs for n in s.tap_names)
        self._tap_of = {t.tap_name: t for t in self.taps}
        self.size_multiple = size_multiple_of(model)

    @property
    def tap_names(self) -> list[str]:
        """The map names of the declared layers, in declaration order."""
        return [t.tap_name for t in self.taps]

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        runs = {s.path: 0 for s in self.specs}
        handles = []
        try:
            for spec, module in zip(self.specs, self._modules_hooked, strict=True):
                handles.append(module.register_forward_hook(self._hook(spec, runs, len(pre))))
            if self.inputs == "stacked":
                logits = self.model(torch.stack([pre, post], 1))
            else:
                logits = self.model(pre, post)
        finally:
            for handle in handles:
                handle.remove()
        if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[1] != 1:
            got = (
                f"a tensor of shape {tuple(logits.shape)}"
                if isinstance(logits, Tensor)
                else f"a {type(logits).__name__}"
            )
            raise TapError(
                f"{type(self.model).__name__} returned {got}, not B×1×H×W change logits: "
                "return them from the factory's network (e.g. unwrap a dict output, or give a "
                "two-class output's class 1 − class 0 logits)"
            )
        wrong = [s for s in self.specs if runs[s.path] != s.runs]
        if wrong:
            raise TapError(
                "; ".join(
                    f"{s.path} was declared `{s.mode}` ({s.runs} per forward) but ran "
                    f"{runs[s.path]} time{'' if runs[s.path] == 1 else 's'}"
                    for s in wrong
                )
                + f". Modes: {_MODE_HELP}"
            )
        return logits

    def _hook(self, spec: LayerSpec, runs: dict[str, int], batch: int) -> Callable[..., Any]:
        """The forward hook of one declared module: route its output through the taps."""
        names = spec.tap_names

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            call = runs[spec.path]
            runs[spec.path] += 1
            if call >= spec.runs:  # counted; the forward fails once it is over
                return None
            if not isinstance(output, Tensor):
                raise TapError(
                    f"{spec.path} returned a {type(output).__name__}, not a tensor; declare a "
                    "submodule whose output is one tensor"
                )
            if output.ndim != 4:  # the maps sum over dim 1 and are drawn over dims 2 and 3
                raise TapError(
                    f"{spec.path} returned a tensor of shape {tuple(output.shape)}; a declared "
                    "layer must output B×C×h×w feature maps, channels first: declare a module "
                    "that reshapes a token (B×N×C) or channels-last (B×h×w×C) output into them"
                )
            if spec.mode == "calls":
                return _through(self._tap_of[names[call]], output)
            if spec.mode in ("batch_halves", "batch_interleaved"):
                return self._split(spec, output, batch)
            return _through(self._tap_of[names[0]], output)

        return hook

    def _split(self, spec: LayerSpec, output: Tensor, batch: int) -> Tensor:
        """Pass each date's rows of a batch-stacked output through its tap; same values back."""
        if output.ndim < 1 or output.shape[0] != 2 * batch:
            raise TapError(
                f"{spec.path} was declared `{spec.mode}` (both dates on the batch axis: 2 × "
                f"{batch} = {2 * batch} rows) but its output is {tuple(output.shape)}"
            )
        tap_pre, tap_post = (self._tap_of[n] for n in spec.tap_names)
        if spec.mode == "batch_halves":
            return torch.cat([tap_pre(output[:batch]), tap_post(output[batch:])])
        rows = output.unflatten(0, (batch, 2))
        return torch.stack([tap_pre(rows[:, 0]), tap_post(rows[:, 1])], 1).flatten(0, 1)


def _through(tap: Tap, output: Tensor) -> Tensor:
    """``output`` through ``tap``; a copy goes on while the tap is recorded (it has hooks): the
    model may change its layer's output in place (ResNet's ``out += identity``,
    ReLU(inplace=True)), which must not reach the recorded activation."""
    out = tap(output)
    return out.clone() if tap._forward_hooks else out


def import_factory(target: str) -> Callable[..., Any]:
    """The callable at ``"package.module:name"`` (or ``"package.module.name"``).

    Raises:
        ValueError: ``target`` is empty, cannot be imported, or names nothing callable.
    """
    if not target:
        raise ValueError(
            "model=external needs model.target=<package.module>:<factory> (a class or function "
            "that builds the network from model.kwargs)"
        )
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"model.target={target!r}: cannot import {module_name!r} ({err}); put its folder on "
            "PYTHONPATH or install it"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = [n for n in vars(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        raise ValueError(
            f"model.target={target!r}: {module_name} has no callable {attr!r}"
            + (f" (did you mean {close}?)" if close else "")
        )
    return factory


def _plain(value: Any) -> Any:
    """Config containers (e.g. OmegaConf's) as plain dicts and lists, for checkpoints."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


class ExternalModel(LayerTaps, ChangeNetwork):
    """A network from a factory, with declared layers (``conf/model/external.yaml``).

    Args:
        target: ``"package.module:factory"``: a class or function returning the network.
        kwargs: the factory's keyword arguments.
        layers: the declared layers (see :class:`LayerTaps`).
        inputs: ``pair`` (``model(pre, post)``) or ``stacked`` (``model(B×2×C×H×W)``).
        size_multiple: input sides must be multiples of it; ``None``: the network's own
            ``size_multiple`` attribute, else 1.

    Raises:
        ValueError: the factory cannot be imported or returns no ``nn.Module``.
        TapError: a declared layer is unknown (nearest names listed) or badly declared.
    """

    def __init__(
        self,
        target: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        layers: Mapping[str, Any] | None = None,
        inputs: Inputs = "pair",
        size_multiple: int | None = None,
    ) -> None:
        net = import_factory(target or "")(**_plain(kwargs or {}))
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"model.target={target!r} returned a {type(net).__name__}, not an nn.Module"
            )
        super().__init__(net, _plain(layers or {}), inputs)
        if size_multiple is not None:
            self.size_multiple = int(size_multiple)

    def config(self) -> dict[str, Any]:
        """The constructor call, as plain containers (checkpoints store it)."""
        return _plain(super().config())


EXTERNAL_TARGETS = frozenset(
    {f"{ExternalModel.__module__}.{ExternalModel.__qualname__}", "changecam.models.ExternalModel"}
)


def is_external(model_cfg: Mapping[str, Any] | None) -> bool:
    """Whether a model config builds an :class:`ExternalModel` (``model=external``)."""
    return model_cfg is not None and model_cfg.get("_target_") in EXTERNAL_TARGETS


__all__ = [
    "EXTERNAL_TARGETS",
    "LAYER_MODES",
    "ExternalModel",
    "LayerMode",
    "LayerSpec",
    "LayerTaps",
    "find_module",
    "import_factory",
    "is_external",
    "layer_specs",
]

"""Which ``model=<name>`` fits a weights file: the suggestion of every architecture mismatch.

The candidates are the presets in ``conf/model/*.yaml`` (found anew each time, so a new
architecture needs no code here). A changecam checkpoint records its network config, whose
``_target_`` names the class: the preset of that class that differs least is suggested, with
``model.<key>=<value>`` for the file's values. A plain ``state_dict`` records nothing, so its
key names (which do not depend on the widths) are compared with those of each preset's network,
built on the ``meta`` device (no memory, no initialisation cost); the widths are then inferred
from the tensor shapes where they scale with ``base_channels`` and ``in_channels``, and kept
only if every shape then agrees.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf

from changecam.models import build_network, network_config

# The repository's configs (editable install), as changecam.cli.common.config_dir finds them.
REPO_CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
DEPTHS = range(1, 8)  # the depths tried when a preset's key names differ only by depth
WIDTH_KEYS = ("in_channels", "base_channels")  # inferred from the shapes where a preset has them


@dataclass(frozen=True)
class ModelMatch:
    """A preset and the config that fits the file (``None``: the widths could not be inferred)."""

    name: str
    preset: dict[str, Any]  # the preset's yaml values (without _target_)
    fitted: dict[str, Any] | None  # full constructor config that fits the file, or None
    defaults: dict[str, Any]  # the preset's full constructor config (yaml + defaults)

    @property
    def preset_target(self) -> Any:
        return self.defaults.get("_target_")

    def overrides(self, current: Mapping[str, Any] | None = None) -> str:
        """``model=<name>`` plus the ``model.<key>=<value>`` overrides that give ``fitted``.

        Equal to the preset: the name alone. Otherwise the values that differ from the preset
        and always its widths (``in_channels``, ``base_channels``: an ``experiment=`` may set
        them); ``+model.<key>`` for arguments the preset's yaml leaves at their default.
        ``current``: the network config of the command that failed; a value it set otherwise
        (``model.fusion=diff`` on its command line) is named too, or the hint would keep it.
        """
        same_class = current is not None and same_target(
            current.get("_target_"), self.preset_target
        )
        if self.fitted is None:
            return f"model={self.name}"
        at_defaults = self.fitted == self.defaults
        parts = [f"model={self.name}"]
        for key, value in self.fitted.items():
            if key == "_target_":
                continue
            set_otherwise = same_class and current is not None and current.get(key, value) != value
            differs = self.defaults.get(key) != value
            if at_defaults:
                named = set_otherwise
            elif key in self.preset:
                named = key in WIDTH_KEYS or differs or set_otherwise
            else:
                named = differs or set_otherwise
            if named:
                plus = "" if key in self.preset else "+"
                parts.append(f"{plus}model.{key}={hydra_value(value)}")
        return " ".join(parts)


def hydra_value(value: Any) -> str:
    """A value as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if isinstance(value, str) and any(c in text for c in " ,=[]{}:'\""):
        return repr(text)
    return text


def model_conf_dir() -> Path:
    """``$CHANGECAM_CONFIG_DIR/model`` or the repository's ``conf/model``."""
    root = os.environ.get("CHANGECAM_CONFIG_DIR")
    return (Path(root) if root else REPO_CONF_DIR) / "model"


def read_presets(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """``name -> config`` of every ``conf/model/*.yaml`` with a ``_target_``; values that are
    interpolations or missing (``???``) are left out (the constructor's defaults apply)."""
    folder = folder or model_conf_dir()
    presets: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            node = OmegaConf.load(path)
        except Exception:  # a broken preset is reported where it is used, not here
            continue
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            continue
        config = {}
        for key in node:
            if (
                key == "defaults"
                or OmegaConf.is_interpolation(node, key)
                or OmegaConf.is_missing(node, key)
            ):
                continue
            value = node[key]
            config[str(key)] = (
                OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            )
        presets[path.stem] = config
    return presets


def build_on_meta(config: Mapping[str, Any]) -> torch.nn.Module | None:
    """The network of ``config`` with meta tensors (shapes only; on the CPU for constructors
    that compute with their tensors), or ``None`` if it cannot be built."""
    try:
        with torch.device("meta"):
            return build_network(dict(config))
    except Exception:
        pass
    try:
        return build_network(dict(config))
    except Exception:  # e.g. external.yaml without the user's target
        return None


def _shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    net = build_on_meta(config)
    return None if net is None else {k: tuple(v.shape) for k, v in net.state_dict().items()}


@functools.lru_cache(maxsize=256)
def _cached_shapes(frozen: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, ...]] | None:
    return _shapes(dict(frozen))


def shapes_of(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """State-dict shapes of the network of ``config`` (cached), ``None`` if it cannot be built."""
    try:
        frozen = tuple(sorted((k, _freeze(v)) for k, v in config.items()))
    except TypeError:
        return _shapes(config)
    return _cached_shapes(frozen)


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    hash(value)
    return value


def full_config(preset: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preset's complete constructor config (its yaml plus the defaults), as a checkpoint
    records it; ``None`` for presets that do not build or cannot describe themselves."""
    net = build_on_meta(preset)
    config = network_config(net) if net is not None else None
    if config is None:
        return None
    return {**config, "_target_": preset["_target_"]}


def same_target(a: Any, b: Any) -> bool:
    """Whether two ``_target_`` strings name the same object (``changecam.models.SiameseUNet``
    and ``changecam.models.siamese_unet.SiameseUNet`` do)."""
    if a == b:
        return True
    try:
        return hydra.utils.get_object(str(a)) is hydra.utils.get_object(str(b))
    except Exception:
        return False


def match_config(
    config: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]] | None = None
) -> ModelMatch | None:
    """The preset of ``config``'s class that differs from it in the fewest values."""
    presets = read_presets() if presets is None else presets
    best: tuple[int, ModelMatch] | None = None
    for name, preset in presets.items():
        if not same_target(preset.get("_target_"), config.get("_target_")):
            continue
        defaults = full_config(preset)
        if defaults is None:
            continue
        fitted = {
            **{k: v for k, v in config.items() if k != "_target_"},
            "_target_": preset["_target_"],
        }
        differences = sum(defaults.get(k) != v for k, v in fitted.items())
        match = ModelMatch(name, _without_target(preset), fitted, defaults)
        if best is None or differences < best[0]:
            best = (differences, match)
    return None if best is None else best[1]


def _without_target(preset: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in preset.items() if k != "_target_"}


def _key_variants(preset: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The preset, and for presets with a ``depth`` the same at other depths."""
    variants = [dict(preset)]
    if isinstance(preset.get("depth"), int):
        variants += [{**preset, "depth": d} for d in DEPTHS if d != preset["depth"]]
    return variants


def _width_candidates(
    config: Mapping[str, Any],
    key: str,
    dim: int,
    shapes: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    tries: int,
) -> list[int]:
    """Values of ``config[key]`` that would give the file's size of dimension ``dim``, most
    frequent first (each tensor whose size there scales with ``key`` proposes one)."""
    counts: Counter[int] = Counter()
    for name, model_shape in shapes.items():
        file_shape = tuple(state[name].shape) if name in state else ()
        if len(file_shape) != len(model_shape) or len(model_shape) <= max(dim, 1):
            continue
        if model_shape[dim] == 0 or file_shape[dim] == model_shape[dim]:
            continue
        value = config[key] * file_shape[dim] / model_shape[dim]
        if value == int(value) and value >= 1:
            counts[int(value)] += 1
    return [config[key]] + [v for v, _ in counts.most_common(tries)]


def _infer_widths(
    config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor]
) -> dict[str, Any] | None:
    """``config`` with ``in_channels``/``base_channels`` such that every shape of the network
    equals the file's, or ``None``. Output channels (dimension 0) scale with the width, input
    channels (dimension 1) with the bands; the few most frequent ratios are tried."""
    target = {k: tuple(v.shape) for k, v in state.items()}
    scaled = dict(zip(WIDTH_KEYS, (1, 0), strict=True))  # the dimension each width scales
    options = [
        [(key, v) for v in _width_candidates(config, key, dim, shapes, state, tries=3)]
        for key, dim in scaled.items()
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool)
    ]
    for choice in itertools.product(*options):
        fitted = {**config, **dict(choice)}
        if shapes_of(fitted) == target:
            return fitted
    return None


def match_state(
    state: Mapping[str, torch.Tensor], presets: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[ModelMatch | None, float]:
    """The preset whose network's key names fit ``state`` best, and the fraction that agree
    (1.0: the same key names); its ``fitted`` config is set when the shapes agree too."""
    presets = read_presets() if presets is None else presets
    names = set(state)
    if not names:
        return None, 0.0
    best: tuple[float, ModelMatch | None] = (0.0, None)
    for name, preset in presets.items():
        defaults = full_config(preset)
        if defaults is None:
            continue
        for variant in _key_variants(defaults):
            shapes = shapes_of(variant)
            if shapes is None:
                continue
            score = len(names & set(shapes)) / len(names | set(shapes))
            # the same key names tie (FC-EF and the FC-Siam networks): each is tried for widths
            if score < best[0] or (score == best[0] and score < 1.0):
                continue
            fitted = _infer_widths(variant, shapes, state) if score == 1.0 else None
            if fitted is not None:
                return ModelMatch(name, _without_target(preset), fitted, defaults), 1.0
            if score > best[0]:
                best = (score, ModelMatch(name, _without_target(preset), None, defaults))
    return best[1], best[0]

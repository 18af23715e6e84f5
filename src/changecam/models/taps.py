"""Named identity taps: the points where explanations hook a model.

A :class:`Tap` is an ``nn.Identity`` that remembers its public name (``"pre/enc1"``,
``"fuse2"``, ``"head_in"`` ...). A module that runs twice per forward (a shared encoder)
cannot be hooked per date, so the model routes each date's activation through its own tap.
"""

from __future__ import annotations

from torch import nn


class TapError(ValueError):
    """A tap or a declared layer is missing, unknown, or does not run as many times as it must."""


class Tap(nn.Identity):
    """Identity module marking a named activation.

    Args:
        name: public tap name, e.g. ``"post/enc3"``.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.tap_name = name

    def extra_repr(self) -> str:
        return f"name={self.tap_name!r}"


def tap_paths(model: nn.Module) -> dict[str, list[str]]:
    """Every tap name of ``model`` with the module paths of the :class:`Tap` modules that carry
    it, in forward order (two paths: two different taps share the name, as in a wrapper of two
    changecam networks)."""
    paths: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, Tap):
            paths.setdefault(module.tap_name, []).append(path)
    return paths


def find_taps(model: nn.Module) -> dict[str, Tap]:
    """Return every :class:`Tap` of ``model`` keyed by its public name, in forward order (of
    two that share a name, the first: :func:`tap_paths` tells them; the explanation engine
    refuses to explain such a name)."""
    taps: dict[str, Tap] = {}
    for module in model.modules():
        if isinstance(module, Tap):
            taps.setdefault(module.tap_name, module)
    return taps

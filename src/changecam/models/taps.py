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


def find_taps(model: nn.Module) -> dict[str, Tap]:
    """Return every :class:`Tap` of ``model`` keyed by its public name, in forward order.

    Raises:
        TapError: two different taps share a name (one of them would be explained under the
            other's name, or not at all).
    """
    taps: dict[str, Tap] = {}
    taps_path: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, Tap):
            continue
        if module.tap_name in taps:
            repeated.setdefault(module.tap_name, [taps_path[module.tap_name]]).append(path)
            continue
        taps[module.tap_name] = module
        taps_path[module.tap_name] = path
    if repeated:
        raise TapError(
            "two different Tap modules share a name: "
            + "; ".join(f"{name!r} at {', '.join(paths)}" for name, paths in repeated.items())
            + "; give each its own name"
        )
    return taps

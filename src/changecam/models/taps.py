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
    """Return every :class:`Tap` of ``model`` keyed by its public name, in forward order."""
    return {m.tap_name: m for m in model.modules() if isinstance(m, Tap)}

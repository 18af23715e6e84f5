"""Checks of plain config values shared by every layer's settings (a leaf: it imports nothing
from changecam)."""

from __future__ import annotations


def is_count(value: object) -> bool:
    """Whether ``value`` is a whole number >= 1 (a ``bool`` is not one: ``true`` is no count,
    nor a float such as ``2.0`` or ``1e3``)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1

"""changecam.environment.frozen_gc: full collections skip the objects that existed on entry, the
objects made inside are collected as before, and everything is collectable again on exit."""

from __future__ import annotations

import gc
import weakref

import pytest

from changecam.environment import frozen_gc


class Node:
    """A GC-tracked object that can refer to itself (a cycle only the collector frees)."""


def unreachable_cycle() -> weakref.ref:
    node = Node()
    node.me = node
    return weakref.ref(node)


def test_frozen_gc_skips_what_existed_collects_what_is_new_and_restores():
    assert gc.get_freeze_count() == 0
    kept = Node()
    kept.me = kept
    with frozen_gc():
        frozen = gc.get_freeze_count()
        assert frozen > 0 and gc.is_tracked(kept)
        with frozen_gc():  # nested: the outer one keeps them frozen
            pass
        # not equal: a frozen object freed meanwhile (by another thread too) leaves the count
        assert gc.get_freeze_count() > frozen // 2, "the nested exit unfroze the outer's objects"
        made_inside = unreachable_cycle()
        gc.collect()
        assert made_inside() is None, "a cycle made inside is still collected"
        before = weakref.ref(kept)
        del kept
        gc.collect()
        assert before() is not None, "a cycle that existed on entry is frozen"
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before() is None, "collectable again after the exit"


def test_frozen_gc_restores_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_gc():
            raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0

"""Run a script with one function made to pause after its Nth call, so that a kill-and-resume
test kills the run at a known point however slow the machine is (no timing window).

Usage: ``python pause_after.py MODULE:QUALNAME N SCRIPT [ARGS...]``, e.g.
``python pause_after.py changecam.geo.scene:BlockLog.add 3 predict.py ...``.
"""

from __future__ import annotations

import functools
import importlib
import runpy
import sys
import time

PAUSE_S = 600.0  # far longer than a test takes to notice the Nth call and kill the run


def pause_after(target: str, count: int) -> None:
    """Replace ``target`` (``module:Qual.name``) by a wrapper that sleeps after call ``count``."""
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def paused(*args, **kwargs):
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if calls == count:
            time.sleep(PAUSE_S)
        return result

    setattr(owner, name, paused)


if __name__ == "__main__":
    target, count, script, *args = sys.argv[1:]
    pause_after(target, int(count))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")

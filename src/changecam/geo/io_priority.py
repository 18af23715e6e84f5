"""The scheduling priority of the GeoTIFF path's reader and writer threads.

On a CPU the network's forward passes keep every core busy with torch's threads, which meet at
a barrier after each parallel step. A reader or writer thread at the same priority takes a core
from one of them in the middle of a step, and the others wait for it at the barrier: on the
2-core CPU of the README's "Speed" figures that cost the windowed path about 13 % of its
throughput at torch's two threads. At ``idle`` priority (Linux ``SCHED_IDLE``) the two threads
run only on a core nothing else wants, between the network's steps, and the windowed path
matched the PNG path. But an idle thread also yields to every other process: on a machine
whose cores other work keeps busy it can wait for minutes, and an unprivileged thread cannot
be raised again. So ``normal`` is the default and ``idle`` is for machines the run has to
itself (``predict.io_priority=idle``).
"""

from __future__ import annotations

import logging
import os
from typing import Literal, get_args

IoPriority = Literal["normal", "idle"]
IO_PRIORITIES: tuple[str, ...] = get_args(IoPriority)
log = logging.getLogger(__name__)


def check_io_priority(priority: str) -> None:
    """Raise ``ValueError`` for a value that is not one of :data:`IO_PRIORITIES`."""
    if priority not in IO_PRIORITIES:
        raise ValueError(
            f"predict.io_priority={priority!r} is not one of {', '.join(IO_PRIORITIES)}"
        )


def apply_io_priority(priority: IoPriority) -> bool:
    """Give the calling thread ``priority``; whether it now has it (``idle`` needs Linux's
    ``SCHED_IDLE``: elsewhere the thread keeps the normal priority and this returns False)."""
    check_io_priority(priority)
    if priority == "normal":
        return True
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    except (AttributeError, OSError) as err:  # not Linux, or refused
        log.warning("io_priority=idle is not available here (%s): normal priority", err)
        return False
    return True


__all__ = ["IO_PRIORITIES", "IoPriority", "apply_io_priority", "check_io_priority"]

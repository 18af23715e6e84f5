"""A SIGTERM handler that only takes the signal in, for Lightning's loops to act on.

Lightning 2.6's own handler broadcasts the signal to the other ranks from inside the handler,
which Python runs between two bytecodes of whatever the rank is doing: in the middle of a
step, that broadcast pairs with another collective on the other ranks (DDP's gradient
all-reduce, a metric's all-gather), and every rank waits for ever. Its training loop already
broadcasts the flag at a safe point, before each batch, and stops every rank there.
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import lightning as L


def take_sigterm_quietly(trainer: L.Trainer) -> None:
    """Make ``trainer``'s SIGTERM handler set its flag and pass the signal to the launcher's
    processes, with no collective (call it before ``fit``: Lightning registers the handler
    then). A Lightning without that handler is left as it is."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "_sigterm_notifier_fn"):
        return

    def take(signum: int, _frame: FrameType | None) -> Any:
        if not connector.received_sigterm:
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        connector.received_sigterm = True

    connector._sigterm_notifier_fn = take

"""A SIGTERM handler that only takes the signal in, for Lightning's loops to act on.

Lightning 2.6's own handler broadcasts the signal to the other ranks from inside the handler,
which Python runs between two bytecodes of whatever the rank is doing: in the middle of a
step, that broadcast pairs with another collective on the other ranks (DDP's gradient
all-reduce, a metric's all-gather), and every rank waits for ever. Its training loop already
broadcasts the flag at a safe point, before each batch, and stops every rank there.
"""

from __future__ import annotations

from types import FrameType

import lightning as L

try:
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
except ImportError:  # another Lightning: its own handler is left as it is
    _SignalConnector = None


if _SignalConnector is not None:

    class QuietSignalConnector(_SignalConnector):
        """Lightning's signal connector whose SIGTERM handler sets the flag and passes the
        signal to the launcher's processes, with no collective. A class of its own module (not
        a closure), so that a spawned DDP start can pickle the trainer."""

        def _sigterm_notifier_fn(self, signum: int, _frame: FrameType | None) -> None:
            if not self.received_sigterm:
                launcher = self.trainer.strategy.launcher
                if launcher is not None:
                    launcher.kill(signum)
            self.received_sigterm = True


def take_sigterm_quietly(trainer: L.Trainer) -> None:
    """Give ``trainer`` the quiet SIGTERM handler (call it before ``fit``: Lightning registers
    the handler then). A Lightning whose connector is another is left as it is."""
    connector = getattr(trainer, "_signal_connector", None)
    if _SignalConnector is not None and type(connector) is _SignalConnector:
        connector.__class__ = QuietSignalConnector

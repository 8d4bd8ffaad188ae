"""SIGTERM / SIGUSR1 / SIGINT: finish the step, checkpoint, exit, say "preempted".

The handler only sets a flag; the loop all-reduces it every step, so a signal that reached one
rank, every rank or the launcher (which forwards it) makes all ranks stop after the same step
and save together (a rank that saved alone would wait forever in a collective). Launchers
forward a signal too, so the same one often arrives twice within a moment: that is not a
second request. A second signal later than ``REPEAT_WINDOW`` seconds exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW = 5.0


class StopOnSignal:
    """Install with ``install(on_stop)``; ``on_stop(name)`` is called once."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self, on_stop: Callable[[str], None]) -> None:
        self._on_stop = on_stop
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first is None:
            self.first, self.name = now, name
            log.warning("%s: finishing this step, saving a checkpoint, then exiting", name)
            self._on_stop(name)
        elif now - self.first > REPEAT_WINDOW:
            log.error("%s again: exiting now without a checkpoint", name)
            os._exit(128 + signum)

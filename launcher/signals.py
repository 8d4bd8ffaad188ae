"""SIGTERM / SIGUSR1 / SIGINT: save a checkpoint of the last completed step, exit, requeue.

``STOP`` is installed as early as a process can (the launcher's worker start, the stage's
entry), so a signal that comes during set-up is remembered, not fatal. Its handler only
records the request; the loop all-reduces it every step, so a signal that reached one rank,
every rank or the launcher (which forwards it) makes all ranks stop at the same step and save
together (a rank that saved alone would wait forever in a collective). Inside
``STOP.interruptible()`` (waiting for data, writing the export) the handler also raises
``Interrupted``, so that a stalled wait cannot hold the save back past the grace time.
Launchers forward a signal too, so the same one often arrives twice within a moment: that is
not a second request. A second signal later than ``REPEAT_WINDOW`` seconds exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW = 5.0


class Interrupted(KeyboardInterrupt):
    """Raised by a stop signal inside ``StopSignals.interruptible()``. A KeyboardInterrupt,
    so that code which skips bad records on any other exception lets it through."""


class StopSignals:
    """The stop request of this process: which signal came first, and when."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.at: float | None = None  # time.monotonic() of the first signal
        self._depth = 0
        self._previous: dict[int, object] = {}
        self.listeners: list[Callable[[], None]] = []
        """Called once, in the handler, at the first request (e.g. the run directory's lock
        says "stopping"); a failing one is logged, never in the way of the stop."""

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Take over the stop signals (main thread only); False if already installed."""
        if self.installed:
            return False
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        """Give the signals back and forget any request (another run may follow in-process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.name = self.at = None

    @contextmanager
    def catching(self) -> Iterator[StopSignals]:
        """Installed for the block, unless something earlier installed it for the process."""
        mine = self.install()
        try:
            yield self
        finally:
            if mine:
                self.uninstall()

    def listen(self, listeners: Iterable[Callable[[], None]]) -> None:
        """Add ``listeners``; called at once if the request came already (a signal during
        set-up, before the caller had anything to say)."""
        listeners = list(listeners)
        self.listeners += listeners
        if self.name is not None:
            notify(listeners)

    def seconds_since(self) -> float | None:
        return None if self.at is None else time.monotonic() - self.at

    class _Interruptible:
        def __init__(self, owner: StopSignals):
            self.owner = owner

        def __enter__(self) -> None:
            if self.owner.name is not None:
                raise Interrupted(self.owner.name)
            self.owner._depth += 1

        def __exit__(self, *exc) -> None:
            self.owner._depth -= 1

    def interruptible(self) -> _Interruptible:
        """A block that a stop signal ends with ``Interrupted`` (raised at once if one is
        pending). The caller catches it around the whole ``with`` and gives up the block's
        work: the exception can surface anywhere inside it, its exit included."""
        return self._Interruptible(self)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.name is None:
            self.name, self.at = name, now
            log.warning("%s: saving a checkpoint of the last completed step, then exiting", name)
            notify(self.listeners)
            if self._depth:
                raise Interrupted(name)
        elif now - self.at > REPEAT_WINDOW:
            log.error("%s again: exiting now without a checkpoint", name)
            os._exit(128 + signum)


def notify(listeners: Iterable[Callable[[], None]]) -> None:
    for listener in listeners:
        try:
            listener()
        except Exception as exc:  # a signal handler: the stop must go on
            log.warning("at the stop request, %r failed: %s: %s", listener, type(exc).__name__, exc)


STOP = StopSignals()
"""The process's one stop request (signal handlers are per process)."""


PARENT_ENV = "KILN_PARENT_PID"
"""Set by a kiln process for a child that must not outlive it: the pid it expects as parent."""
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a child that ``follow_parent()`` ties to us."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def follow_parent() -> None:
    """Called first thing by a process that a kiln parent started (a pipeline's stage, the
    launcher's agent): when that parent dies, even by SIGKILL, this process gets SIGTERM, the
    ordinary stop (checkpoint, release of the run directory, exit). Without it the stage ran
    on as an orphan holding its run directory's lock, and re-running the killed pipeline
    failed with "in use by another launch". Linux only (prctl); elsewhere a no-op. The
    variable is removed so that this process's own children do not inherit it."""
    expected = os.environ.pop(PARENT_ENV, None)
    if expected is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process may outlive its "
                    "parent", ctypes.get_errno())  # fmt: skip
        return
    if os.getppid() != int(expected):  # the parent died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)

"""A JIT build lock left by a killed build, found and removed before DeepSpeed builds an op.

DeepSpeed compiles some ops on first use through torch's ``cpp_extension.load`` (``cpu_adam``
for ``dist.offload_optimizer``, about 40 s on 2 cores). torch serialises builds of one op with
a bare lock file in its build folder (``torch.utils.file_baton.FileBaton``): created with
O_EXCL, removed when the build ends. A build killed with SIGKILL (the OOM killer, a scheduler's
kill after its grace, ``kill -9`` on a stuck job) leaves it, and from then on every build of
that op waits for it forever, printing nothing: the run hangs at set-up.

The lock is stale when no process of this machine has it open (a live build holds its
descriptor until it removes the file) and nothing in the build folder changed for
``QUIET_SECONDS`` (a live build on another node of a shared file system writes its object
files and ninja's log there as it goes). Then it is removed, with a warning naming it. A lock
that is not stale by that rule is left alone and named, so that a wait is never silent.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

QUIET_SECONDS = 300.0
"""No file of the build folder changed for this long: no build is running there. One
compile step of a DeepSpeed op takes well under a minute; 5 minutes leave room for a
loaded machine."""


def build_folder(op: str) -> Path:
    """Where torch builds (or finds) the JIT extension ``op``: ``TORCH_EXTENSIONS_DIR`` or
    its default, by Python and CUDA version (torch's own rule, which it does not export)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op, verbose=False))


def clear_stale_lock(folder: Path, *, quiet_seconds: float = QUIET_SECONDS) -> bool:
    """Remove ``folder/lock`` when it is stale (see the module); True if it was removed."""
    lock = folder / "lock"
    try:
        created = lock.stat().st_mtime
    except FileNotFoundError:
        return False
    holders = _processes_holding(lock)
    quiet = time.time() - _last_change(folder)
    if holders or quiet < quiet_seconds:
        why = f"held by pid {', '.join(map(str, holders))}" if holders else "a build may be running"
        log.warning(  # every machine's first process says it, not only rank 0
            "%s exists (%s, created %.0f s ago): the build of %s waits until it is removed",
            lock,
            why,
            time.time() - created,
            folder.name,
        )
        return False
    lock.unlink(missing_ok=True)
    log.warning(
        "removed %s: left by a build of %s that was killed (no process holds it, nothing in "
        "the folder changed for %.0f s); without it every later build would wait forever",
        lock,
        folder.name,
        quiet,
    )
    return True


def _last_change(folder: Path) -> float:
    """The latest modification time of the folder and its files (not recursive)."""
    latest = folder.stat().st_mtime
    for entry in os.scandir(folder):
        try:
            latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:  # removed meanwhile
            continue
    return latest


def _processes_holding(path: Path) -> list[int]:
    """Pids of this machine's processes (those /proc lets us see) with ``path`` open."""
    target = os.path.realpath(path)
    found = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc (not Linux): nothing is known to hold it
        return []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(int(pid))
                    break
            except OSError:
                continue
    return found

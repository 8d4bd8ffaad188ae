"""The run directory's own bookkeeping: one launch at a time, and the PREEMPTED marker.

``RunLock`` is an exclusive ``flock`` on ``<run_dir>/.lock``, taken by the launcher (the main
node's, or global rank 0 when started without it) before any process touches the directory.
The kernel releases it when the holder dies, kill -9 included, so it never needs cleaning up;
the file says who holds it, for the error a second launch gets.

``PREEMPTED`` is written by the main rank when a run stops early and can resume; it carries
the launch's id (``KILN_LAUNCH_ID``: the Slurm job and restart, or one the launcher makes),
and the launch that holds the lock removes an older one first, so a batch script requeues
only for the launch it started, never for a stale file (launchers turn worker exit codes
into 1, so a file is how "requeue me" travels).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from launcher.errors import UserError

log = logging.getLogger(__name__)

LOCK = ".lock"
PREEMPTED = "PREEMPTED"
LAUNCH_ENV = "KILN_LAUNCH_ID"
"""This launch's id, inherited by every process of it (the sbatch script sets job.restart)."""
LOCKED_ENV = "KILN_RUN_LOCKED"
"""The run directory whose lock a parent process (the kiln launcher) holds for us."""


class RunDirBusy(UserError):
    """Another launch holds the run directory."""


def launch_id() -> str:
    """This launch's id, made (and exported to child processes) on first use."""
    if not os.environ.get(LAUNCH_ENV):
        os.environ[LAUNCH_ENV] = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.environ[LAUNCH_ENV]


class RunLock:
    """``acquire()`` raises ``RunDirBusy`` naming the holder's host and pid; the lock lasts
    until ``release()`` or the end of the process (or of children given ``fd``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirBusy(
                f"{self.run_dir} is in use by another launch ({_describe(holder)}); wait for "
                f"it to end or stop it, or choose another run.name (lock: {self.path})"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            log.warning(
                "%s: this filesystem cannot lock files (%s); a second launch on the same run "
                "directory will not be stopped",
                self.path,
                exc.strerror,
            )
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        info["launch"] = os.environ.get(LAUNCH_ENV)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def clear_marker(run_dir: Path) -> None:
    """A new launch starts: an older PREEMPTED marker describes another launch."""
    (Path(run_dir) / PREEMPTED).unlink(missing_ok=True)


def write_marker(run_dir: Path, info: dict) -> Path:
    """Say that this launch stopped early and can resume (main rank)."""
    path = Path(run_dir) / PREEMPTED
    tmp = path.with_name(PREEMPTED + ".tmp")
    tmp.write_text(json.dumps({**info, "launch": os.environ.get(LAUNCH_ENV)}) + "\n")
    tmp.replace(path)
    return path


def marker_launch(run_dir: Path) -> str | None:
    """The launch id in the run directory's PREEMPTED marker (None: no marker)."""
    path = Path(run_dir) / PREEMPTED
    try:
        return json.loads(path.read_text()).get("launch") or ""
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError):
        return ""


def main(argv: list[str]) -> int:
    """`python -m launcher.rundir preempted RUN_DIR LAUNCH_ID`: exit 0 when the marker is
    this launch's (the sbatch script then requeues), 1 otherwise."""
    if len(argv) != 3 or argv[0] != "preempted":
        print("usage: python -m launcher.rundir preempted RUN_DIR LAUNCH_ID", file=sys.stderr)
        return 2
    found = marker_launch(Path(argv[1]))
    if found is not None and found != argv[2]:
        print(f"[kiln] {Path(argv[1]) / PREEMPTED} is from launch {found or '?'}, not {argv[2]}")
    return 0 if found == argv[2] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

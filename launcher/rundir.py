"""The run directory's own bookkeeping: one launch at a time, and the PREEMPTED marker.

``RunLock`` is an exclusive ``flock`` on ``<run_dir>/.lock``, taken by the launcher (the main
node's, or global rank 0 when started without it) before any process touches the directory.
The kernel releases it when the holder dies, kill -9 included, so it never needs cleaning up;
the file says who holds it, for the error a second launch gets. A holder that was told to stop
says so in the file (``mark_stopping``: when, and its grace seconds); a launch that finds the
directory held by a stopping launch waits for it to save and let go (at most until that grace
is over, plus ``STOPPING_SLACK``) instead of failing: re-running a pipeline or job a moment
after stopping it is what users do.

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

from launcher import atomic
from launcher.errors import UserError

log = logging.getLogger(__name__)

LOCK = ".lock"
PREEMPTED = "PREEMPTED"
LAUNCH_ENV = "KILN_LAUNCH_ID"
"""This launch's id, inherited by every process of it (the sbatch script sets job.restart)."""
LOCKED_ENV = "KILN_RUN_LOCKED"
"""The run directory whose lock a parent process (the kiln launcher) holds for us."""
STOPPING_SLACK = 30.0
"""Seconds past a stopping holder's grace that a new launch still waits for the lock."""
POLL = 0.2


class RunDirBusy(UserError):
    """Another launch holds the run directory."""


def launch_id() -> str:
    """This launch's id, made (and exported to child processes) on first use."""
    if not os.environ.get(LAUNCH_ENV):
        os.environ[LAUNCH_ENV] = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.environ[LAUNCH_ENV]


class RunLock:
    """``acquire()`` raises ``RunDirBusy`` naming the holder's host and pid (after waiting
    for a holder that is stopping); the lock lasts until ``release()`` or the end of the
    process (or of children given ``fd``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.info: dict = {}

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's
        try:
            self._wait_for(fd)
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
        except BaseException:  # RunDirBusy, or Ctrl-C while waiting
            os.close(fd)
            raise
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self.info["launch"] = os.environ.get(LAUNCH_ENV)
        self.fd = fd
        self._write()
        return self

    def _wait_for(self, fd: int) -> None:
        """Take the flock; a holder that is stopping is waited for, any other one (or one
        stopping past its grace) is ``RunDirBusy``."""
        waiting_since = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if waiting_since is not None:
                    log.warning(
                        "%s: it let go after %.1f s", self.run_dir, time.time() - waiting_since
                    )
                return
            except BlockingIOError:
                pass
            holder = _holder(fd)
            until = _stopping_until(holder)
            now = time.time()
            if until is None or now > until:
                late = (
                    f"; it was told to stop {now - holder['stopping']:.0f} s ago and has not let go"
                    if until is not None
                    else ""
                )
                raise RunDirBusy(
                    f"{self.run_dir} is in use by another launch ({_describe(holder)}{late}); "
                    f"wait for it to end or stop it, or choose another run.name (lock: "
                    f"{self.path})"
                )
            if waiting_since is None:
                waiting_since = now
                log.warning(
                    "%s is held by a launch that is stopping (%s): waiting up to %.0f s for it "
                    "to save its checkpoint and let go",
                    self.run_dir,
                    _describe(holder),
                    until - now,
                )
            time.sleep(POLL)

    def mark_stopping(self, grace: float) -> None:
        """Say in the lock file that this launch was told to stop and has ``grace`` seconds
        to save (a new launch waits for it). Safe in a signal handler; idempotent."""
        if self.fd is not None and "stopping" not in self.info:
            self.info.update(stopping=time.time(), grace=float(grace))
            self._write()

    def _write(self) -> None:
        assert self.fd is not None
        data = (json.dumps(self.info) + "\n").encode()
        os.pwrite(self.fd, data, 0)  # then cut: a reader never sees an empty file
        os.ftruncate(self.fd, len(data))

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def _holder(fd: int) -> dict:
    """What the holder wrote (its first JSON object: a rewrite may briefly leave a tail)."""
    try:
        info, _ = json.JSONDecoder().raw_decode(os.pread(fd, 4096, 0).decode(errors="replace"))
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _stopping_until(holder: dict) -> float | None:
    """Until when a stopping holder is waited for (None: it is not stopping)."""
    stopping, grace = holder.get("stopping"), holder.get("grace")
    if not isinstance(stopping, int | float) or not isinstance(grace, int | float):
        return None
    return float(stopping) + float(grace) + STOPPING_SLACK


def _describe(info: dict) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def clear_marker(run_dir: Path) -> None:
    """A new launch starts: an older PREEMPTED marker describes another launch."""
    (Path(run_dir) / PREEMPTED).unlink(missing_ok=True)


def write_marker(run_dir: Path, info: dict) -> Path:
    """Say that this launch stopped early and can resume (main rank)."""
    info = {**info, "launch": os.environ.get(LAUNCH_ENV)}
    return atomic.write_text(Path(run_dir) / PREEMPTED, json.dumps(info) + "\n")


def read_marker(run_dir: Path) -> dict | None:
    """The run directory's PREEMPTED marker (None: no marker; {} when unreadable)."""
    path = Path(run_dir) / PREEMPTED
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def marker_launch(run_dir: Path) -> str | None:
    """The launch id in the run directory's PREEMPTED marker (None: no marker)."""
    info = read_marker(run_dir)
    return None if info is None else str(info.get("launch") or "")


ENDING_STATES = frozenset({"COMPLETING", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL"})
"""Slurm job states (as `scontrol show job` gives them to the batch script) that say Slurm
itself is ending the job: `scancel` shows COMPLETING by then. A stop it asked for to be
survived (the --signal before the time limit, a preemption's grace) leaves it RUNNING."""


def summary(
    run_dir: Path, launch: str, status: int | None = None, job_state: str = ""
) -> tuple[bool, str]:
    """Whether the launch ``launch`` (Slurm's "JOB.RESTART") stopped early with a checkpoint
    and should be requeued, and one line saying what happened, for the batch script's log.
    A job that Slurm is ending (``job_state`` in ENDING_STATES: `scancel`, the time limit
    passed) is not requeued even then: a user who cancels a job means it."""
    info = read_marker(run_dir)
    job, _, restart = launch.partition(".")
    exit_status = "" if status is None else f" (exit status {status})"
    if info is None or info.get("launch") != launch:
        why = (
            f"{Path(run_dir) / PREEMPTED} is from launch {info.get('launch') or '?'}, not {launch}"
            if info is not None
            else "the run finished"
            if status == 0
            else "the run failed before saving a stop checkpoint: see the errors above"
        )
        return False, f"[kiln] job {job} ended{exit_status}: {why}; not requeued"
    seconds = info.get("seconds_to_save")
    saved = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
    pending = f", before {info['pending']}" if info.get("pending") else ""
    again = f" as restart {int(restart) + 1}" if restart.isdigit() else ""
    stopped = f"[kiln] stopped at step {info.get('step', '?')} by {info.get('reason') or 'a stop'}"
    if job_state in ENDING_STATES:
        return False, (
            f"{stopped}, checkpoint saved{saved}; Slurm is ending job {job} ({job_state}: "
            "scancel, or the time limit passed): not requeued, submit it again to resume"
        )
    return True, f"{stopped}{pending}, checkpoint saved{saved}: requeueing job {job}{again}"


def main(argv: list[str]) -> int:
    """`python -m launcher.rundir preempted RUN_DIR LAUNCH_ID [STATUS [JOB_STATE]]`: print
    what happened to the launch and exit 0 when it stopped early with a checkpoint and should
    be requeued (the sbatch script then requeues it), 1 otherwise."""
    if len(argv) not in (3, 4, 5) or argv[0] != "preempted":
        usage = "usage: python -m launcher.rundir preempted RUN_DIR LAUNCH_ID [STATUS [JOB_STATE]]"
        print(usage, file=sys.stderr)
        return 2
    status = int(argv[3]) if len(argv) >= 4 and argv[3].lstrip("-").isdigit() else None
    state = argv[4].strip().upper() if len(argv) == 5 else ""
    requeue, line = summary(Path(argv[1]), argv[2], status, state)
    print(line, flush=True)
    return 0 if requeue else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

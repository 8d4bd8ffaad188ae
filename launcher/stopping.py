"""Ending a run before its horizon: stop requests, a task's finish, and every rank agreeing.

A *stop* (a signal, the time budget, ``train.stop_after``) is a preemption: the loop saves the
last completed step and ``mark`` writes PREEMPTED (the launch can resume). A *finish* (a task's
early stopping, a target reached) ends the run as if its last step were the horizon. Every
rank takes the same decision: flags are all-reduced (``agree``) after each step (so a stop
skips its evaluation) and before the next one's first collective (so a rank stuck waiting for
data, freed by the signal, is not left behind by ranks already inside a ZeRO collective).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import time

import torch

from launcher.run_config import RunConfig
from launcher.rundir import write_marker
from launcher.runtime import Runtime
from launcher.signals import STOP

log = logging.getLogger(__name__)

SAVE_NOW = "SAVE_NOW"
"""Create this file in the run directory to get a checkpoint at the next step (on demand)."""


class StopControl:
    """Stop and finish requests of this rank, and what every rank agreed on."""

    def __init__(self, cfg: RunConfig, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.reason: str | None = None
        self.stopped = False  # every rank agreed to stop before the horizon or the export
        self.save_requested = False  # a SAVE_NOW file: checkpoint after this step
        self.finish_reason: str | None = None
        self._requested = False
        self._agreed_at: float | None = None

    def request(self, reason: str) -> None:
        """Ask every rank to stop at the next agreement (before or after a step)."""
        self._requested = True
        self.reason = self.reason or reason

    def finish(self, reason: str) -> None:
        """Ask every rank to end the run after this step as a finished one (no preemption)."""
        self.finish_reason = self.finish_reason or reason

    def wanted(self) -> bool:
        """Whether this rank wants to stop (a signal it caught counts)."""
        if STOP.name is not None and not self._requested:
            self.request(f"signal {STOP.name}")
        return self._requested

    def agree(self, flags: list[bool]) -> list[bool]:
        """Any rank's flag, on every rank (one tiny all-reduce). The first flag is "stop"."""
        tensor = torch.tensor([float(f) for f in flags], device=self.runtime.device)
        self.runtime.all_reduce(tensor, "max")
        out = [bool(x) for x in tensor.tolist()]
        if out[0]:
            self._agreed_at = self._agreed_at or time.monotonic()
            self.reason = self.reason or "stop requested on another rank"
        return out

    def after_step(self, step: int, horizon: int, started: float, first_step: int) -> bool:
        """After a step: do all ranks stop (time budget, stop_after, a signal on any rank) or
        save now (a ``SAVE_NOW`` file in the run directory)? Returns whether to stop."""
        budget, stop_after = self.cfg.train.max_time, self.cfg.train.stop_after
        if step < horizon:  # reaching the horizon is no early stop
            if budget is not None and time.time() - started >= budget:
                self.request("time budget")
            if stop_after is not None and step - first_step >= stop_after:
                self.request(f"train.stop_after={stop_after}")
        save_now = self.runtime.is_main and (self.cfg.run_dir / SAVE_NOW).exists()
        stop, self.save_requested = self.agree([self.wanted(), save_now])
        if self.save_requested and self.runtime.is_main:
            (self.cfg.run_dir / SAVE_NOW).unlink(missing_ok=True)
        return stop

    def mark(self, step: int, horizon: int, pending: str | None = None) -> None:
        """Main rank: write PREEMPTED (this launch stopped early and can resume), with the
        seconds from the signal (or the agreement to stop) to the saved checkpoint."""
        self.stopped = True
        self.reason = self.reason or (f"signal {STOP.name}" if STOP.name else "stop")
        if not self.runtime.is_main:
            return
        since = STOP.seconds_since()
        if since is None and self._agreed_at is not None:
            since = time.monotonic() - self._agreed_at
        checkpoint = self.cfg.run_dir / "checkpoints" / f"step-{step:08d}"
        info = {"step": step, "reason": self.reason, "time": time.time()}
        info.update(checkpoint=str(checkpoint), seconds_to_save=since, pending=pending)
        if step >= horizon:
            info["pending"] = pending or "the final evaluation and export"
        write_marker(self.cfg.run_dir, info)
        timing = f", {since:.1f} s after the stop request" if since is not None else ""
        log.warning(
            "stopped at step %d (%s): checkpoint %s%s (grace %d s); resume with the same command",
            step,
            self.reason,
            checkpoint,
            timing,
            self.cfg.checkpoint.grace,
        )


def close_data(batches) -> None:
    """After a stop or an error: shut the data iterator down (its workers exit at once, a
    stalled one is given 5 s), then end the workers still there. They ignore stop signals
    (the trainer handles them), and at exit Python sends its daemonic children SIGTERM and
    waits for them: forever, for a reader that is stalled or never told."""
    if hasattr(batches, "close"):
        batches.close()
    del batches
    gc.collect()  # an abandoned iterator's frames hold it in a cycle
    try:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join(timeout=5)
    except RuntimeError as exc:  # torch's SIGCHLD check, if an iterator still watched one
        log.warning("ending the data workers: %s", exc)

"""What happens between steps, in the order the trainer lists them: evaluate, then log, then
(checkpoint). A callback decides *when*; the mechanism lives in the trainer or its own module."""

from __future__ import annotations

from launcher import persist
from launcher.loop import Callback, Trainer


class Evaluate(Callback):
    """Evaluate every ``every`` steps (if set) and at the end of training."""

    def __init__(self, every: int | None):
        self.every = every
        self._done_at = -1

    def on_step_end(self, trainer: Trainer) -> None:
        if self.every and trainer.state.step % self.every == 0:
            trainer.evaluate()
            self._done_at = trainer.state.step

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._done_at != trainer.state.step:
            trainer.evaluate()


class Log(Callback):
    """Reduce and write metrics every ``every`` steps, at evaluations and at the end."""

    def __init__(self, every: int):
        self.every = every
        self._done_at = -1

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step % self.every == 0 or trainer.eval_results:
            trainer.log_now()
            self._done_at = trainer.state.step
        elif trainer.runtime.is_main:
            trainer.progress_to(trainer.state.step)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._done_at != trainer.state.step or trainer.eval_results:
            trainer.log_now()


class Checkpoint(Callback):
    """Save every ``every`` steps, on demand (a ``SAVE_NOW`` file in the run directory), and
    at the end. (A stop saves first, in the trainer, before anything else runs.)"""

    def __init__(self, every: int | None):
        self.every = every

    def on_step_end(self, trainer: Trainer) -> None:
        if self.every and trainer.state.step % self.every == 0:
            persist.save(trainer, "every")
        elif trainer.save_requested:
            persist.save(trainer, "on demand")

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.last_saved_step != trainer.state.step:
            persist.save(trainer, trainer.stop_reason or "end")


def default_callbacks(cfg) -> list[Callback]:
    """Evaluate before logging, so an evaluation lands in the same metrics line; checkpoint
    last, so a checkpoint never misses what was logged before it."""
    return [Evaluate(cfg.eval.every), Log(cfg.metrics.log_every), Checkpoint(cfg.checkpoint.every)]

"""What happens between steps, in the order the trainer lists them: evaluate, then log, then
(checkpoint). A callback decides *when*; the mechanism lives in the trainer or its own module."""

from __future__ import annotations

from launcher import persist
from launcher.errors import UserError
from launcher.loop import Callback, Trainer
from launcher.run_config import BestSection


class Evaluate(Callback):
    """Evaluate every ``every`` steps (if set) and at the end of training; with
    ``checkpoint.best``, note a new best evaluation (the Checkpoint callback saves it)."""

    def __init__(
        self, every: int | str | None, best: BestSection | None = None, at_start: bool = False
    ):
        self.every, self.best, self.at_start = every, best, at_start
        self._done_at = -1

    def on_fit_start(self, trainer: Trainer) -> None:
        """The parent's scores, logged at step 0 (a fresh run only: a resumed one has them):
        every metric's first value is then the "before" of the stage."""
        if self.at_start and trainer.state.step == 0:
            trainer.evaluate()
            self._done_at = 0
            trainer.log_now()

    def on_step_end(self, trainer: Trainer) -> None:
        if self._due(trainer, trainer.state.step):
            self._evaluate(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._done_at != trainer.state.step:
            self._evaluate(trainer)

    def writes_line_at(self, trainer: Trainer, step: int) -> bool:
        return self._due(trainer, step) or step >= trainer.horizon

    def _due(self, trainer: Trainer, step: int) -> bool:
        every = trainer.steps_per_epoch if self.every == "epoch" else self.every
        return bool(every and step % every == 0)

    def _evaluate(self, trainer: Trainer) -> None:
        results = trainer.evaluate()
        self._done_at = trainer.state.step
        if self.best is None:
            return
        if self.best.metric not in results:
            raise UserError(
                f"checkpoint.best.metric: {self.best.metric!r} is not a metric of the "
                f"evaluation ({', '.join(sorted(results)) or 'it returned none'})"
            )
        value, state = float(results[self.best.metric]), trainer.state
        old = state.best_value
        if old is None or (value < old if self.best.mode == "min" else value > old):
            state.best_step, state.best_value = state.step, value
            trainer.new_best = True


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

    def writes_line_at(self, trainer: Trainer, step: int) -> bool:
        return step % self.every == 0 or step >= trainer.horizon


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
        self._best(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.last_saved_step != trainer.state.step:
            persist.save(trainer, trainer.stop_reason or "end")
        self._best(trainer)

    def _best(self, trainer: Trainer) -> None:
        if not getattr(trainer, "new_best", False):
            return
        trainer.new_best = False
        if trainer.last_saved_step != trainer.state.step:
            persist.save(trainer, "best")
        persist.mark_best(trainer)


def default_callbacks(cfg) -> list[Callback]:
    """Evaluate before logging, so an evaluation lands in the same metrics line; checkpoint
    last, so a checkpoint never misses what was logged before it."""
    return [
        Evaluate(cfg.eval.every, cfg.checkpoint.best, cfg.eval.at_start),
        Log(cfg.metrics.log_every),
        Checkpoint(cfg.checkpoint.every),
    ]

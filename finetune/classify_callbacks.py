"""Early stopping, and the best checkpoint by the same rule.

``EarlyStopping`` sits after ``Evaluate`` and before ``Log`` (``Trainer.log_now`` clears
``trainer.eval_results``). An evaluation is a new best when it beats the best so far by more
than ``min_delta``; that same rule marks the checkpoint to keep and export (``trainer.new_best``,
saved by the ``Checkpoint`` callback), so the exported model is the one early stopping calls
best: with ``min_delta: 1.0`` no later epoch replaces the first. After ``patience`` evaluations
without a new best the run ends with ``Trainer.finish`` (a finished run: no PREEMPTED marker,
no Slurm requeue). Its counters are the loop's own (``state.best_step``, ``best_value``), which
every checkpoint keeps, so a resumed run counts on where it stopped.
"""

from __future__ import annotations

from launcher.errors import UserError
from launcher.loop import Callback, Trainer


class EarlyStopping(Callback):
    def __init__(
        self,
        metric: str,
        mode: str = "max",
        patience: int | None = None,
        min_delta: float = 0.0,
    ):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.stopped_after: int | None = None
        """The evaluation (1-based, per epoch) after which the run was ended; None: it was not."""

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    def on_step_end(self, trainer: Trainer) -> None:
        self._check(trainer, can_finish=True)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._check(trainer, can_finish=False)

    def _check(self, trainer: Trainer, can_finish: bool) -> None:
        results = trainer.eval_results
        if not results:
            return
        if self.metric not in results:
            raise UserError(
                f"classify.best_metric: {self.metric!r} is not a metric of the evaluation "
                f"({', '.join(sorted(results))})"
            )
        value, state = float(results[self.metric]), trainer.state
        if self.improves(value, state.best_value):
            state.best_step, state.best_value = state.step, value
            trainer.new_best = True
            return
        per_eval = trainer.steps_per_epoch or 1
        since = (state.step - state.best_step) // per_eval  # evaluations since the best
        if can_finish and self.patience is not None and since >= self.patience:
            self.stopped_after = state.step // per_eval
            trainer.finish(
                f"early stopping: {self.metric} has not improved by more than "
                f"{self.min_delta} for {since} evaluation(s) (best {state.best_value:.6g} at "
                f"step {state.best_step})"
            )

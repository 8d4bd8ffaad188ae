"""What a step is: a task's own step (``Task.train_step``) and the optimizer steps it takes.

A *loop step* is one call of ``Task.train_step(step, batches)`` on the ``accum`` micro-batches
the loop drew for it. ``TrainState.step`` counts loop steps: ``train.max_steps``, logging,
evaluation and checkpoint cadence, stop agreement and the data stream's position follow them.

An *optimizer step* is one ``StepContext.optimize(batches)``: forward, loss and backward of
each micro-batch, then DeepSpeed reduces the gradients and calls our optimizer (clip, or skip
a non-finite step). The default task step takes one per loop step; a task may take several
(PPO: K passes over one rollout it generated). Per optimizer step: the learning rate (the
schedule follows ``TrainState.applied_steps``, the optimizer steps not skipped; its length is
the horizon times ``Task.optimizer_steps_per_step``), Adam's step count, item-loss
normalisation (``Task.items_in``: one all-reduce of the counts), skipping and its limit, the
tokens counted (each pass counts its micro-batches) and the ``train/*`` metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from launcher.errors import UserError
from launcher.metrics import record
from launcher.optim import lr_factor, set_lr

if TYPE_CHECKING:
    from launcher.loop import Trainer
    from launcher.runtime import Runtime
    from launcher.state import TrainState

log = logging.getLogger(__name__)


class TrainingError(UserError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: ``loss`` (this rank's, detached, no device sync: the mean of its
    micro-batch losses, which with ``Task.items_in`` is its share of the global item mean),
    whether it was ``skipped``, the gradient norm before clipping and the learning rate."""

    loss: torch.Tensor
    skipped: bool
    grad_norm: float
    lr: float


class StepContext:
    """What ``Task.train_step`` works with: the trained ``engine``, the ``runtime`` (e.g.
    ``with runtime.generating(engine) as model:``), the loop's counters ``state`` (to read),
    ``accum`` (micro-batches per optimizer step) and ``optimize``."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self.optimizer_steps = 0
        """Optimizer steps taken in this loop step so far."""

    @property
    def engine(self) -> torch.nn.Module:
        return self._trainer.engine

    @property
    def runtime(self) -> Runtime:
        return self._trainer.runtime

    @property
    def state(self) -> TrainState:
        return self._trainer.state

    @property
    def accum(self) -> int:
        return self._trainer.accum

    def optimize(self, batches: list[dict]) -> StepResult:
        """One optimizer step over ``batches``: exactly ``accum`` micro-batches of this rank
        (DeepSpeed steps at its accumulation boundary). Every rank must call it as many times
        in a loop step (gradients are reduced across ranks).

        Raises ``ValueError`` for another number of micro-batches and ``TrainingError`` when
        ``train.max_consecutive_skips`` optimizer steps in a row were skipped."""
        t = self._trainer
        if len(batches) != t.accum:
            raise ValueError(
                f"{type(t.task).__name__}.train_step: optimize() takes {t.accum} micro-batches "
                f"(train.global_batch_size / (micro_batch_size x ranks)), got {len(batches)}"
            )
        rt, opt, state, timer = t.runtime, t.optimizer, t.state, t.timer
        # a skipped step does not advance the schedule: the next step retries the same LR
        total = t.horizon * t.optimizer_steps_per_step
        lr = set_lr(opt, lr_factor(t.cfg.schedule, state.applied_steps, total))
        scale, step_tokens = item_scale(t, batches)
        losses, tokens = [], 0
        opt.step_called = False
        for micro, batch in enumerate(batches):
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            last = micro == t.accum - 1
            with timer.phase("forward_backward"):
                loss = t.task.loss(t.engine, batch)
                if scale is not None:
                    loss = loss * scale
                t.engine.backward(loss)
                losses.append(loss.detach().float())
            tokens += t.task.tokens_in(batch)
            # DeepSpeed counts micro-batches in step(); on the last one it reduces gradients
            # and runs our optimizer (clip, or skip when the global norm is not finite).
            with timer.phase("optimizer" if last else "forward_backward"):
                t.engine.step()
        if rt.own_clipping:
            skipped, grad_norm = opt.last_skipped, opt.last_grad_norm
        else:  # DeepSpeed clipped, and skipped a non-finite step before reaching our optimizer
            skipped = not opt.step_called
            grad_norm = _as_float(t.engine.get_global_grad_norm())
        self.optimizer_steps += 1
        loop_step = state.step + 1  # the loop step being taken
        # equal on every rank for packed pretraining; counted over the ranks for item losses
        state.tokens += tokens * rt.world_size if step_tokens is None else step_tokens
        if skipped:
            state.skipped_steps += 1
            state.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient norm; step skipped", loop_step)
        else:
            state.consecutive_skips = 0
            state.applied_steps += 1
        mean = torch.stack(losses).mean()
        record("train/loss", mean)
        record("train/lr", lr, reduce="last")
        record("train/grad_norm", grad_norm, reduce="max")
        record("train/skipped_steps", float(skipped), reduce="max")
        limit = t.cfg.train.max_consecutive_skips
        if state.consecutive_skips >= limit:
            raise TrainingError(
                f"{state.consecutive_skips} optimizer steps in a row (up to step {loop_step}) "
                "had a non-finite loss or gradient norm and were skipped; stopping. Lower "
                "optim.lr, check the data, or resume from the last checkpoint "
                f"(train.max_consecutive_skips={limit})"
            )
        return StepResult(loss=mean, skipped=skipped, grad_norm=grad_norm, lr=lr)


def item_scale(trainer: Trainer, batches: list[dict]) -> tuple[float | None, int | None]:
    """For a task whose loss is a sum over counted items (``Task.items_in``): the factor that
    turns each micro-batch's sum into its share of the optimizer step's global item mean.
    DeepSpeed divides every backward by the accumulation steps and averages gradients over
    the ranks, so the factor is accum x world / (items of every micro-batch of every rank).
    The logged loss (a mean over micro-batches and ranks) is then the global item mean too.
    Also the step's tokens over every rank (in the same all-reduce: with masked losses,
    ranks see different token counts). (None, None): the task's losses are means (the
    default). Raises ``TypeError`` when ``items_in`` counts some batches and not others."""
    task, rt = trainer.task, trainer.runtime
    counts = [task.items_in(batch) for batch in batches]
    if all(c is None for c in counts):
        return None, None
    if any(c is None for c in counts):
        raise TypeError(f"{type(task).__name__}.items_in returned None for some batches")
    tokens = sum(task.tokens_in(batch) for batch in batches)
    total = torch.tensor([float(sum(counts)), float(tokens)], device=rt.device)
    rt.all_reduce(total, "sum")
    items, tokens = total.tolist()
    return trainer.accum * rt.world_size / max(items, 1.0), int(tokens)


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)

"""THE training loop, shared by every stage: draw, step, agree, call back; stop or finish.

Per loop step: take the step's ``accum`` micro-batches, agree with every rank to go on, let
the task take its step (``Task.train_step``: by default one optimizer step over them; loop
steps and optimizer steps are told apart in ``launcher/stepping.py``), agree again
(``launcher/stopping.py``: stop requests are all-reduced before and after a step), then run
the callbacks in their list order (evaluate, log, checkpoint...). A stop saves the last
completed step first, with the data stream rewound to it, and writes PREEMPTED; no
evaluation, no export. A checkpoint holds the named states of ``checkpoint_states``
(``launcher/states.py``), written and read by ``launcher/persist.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from launcher import persist, snapshot
from launcher.errors import UserError
from launcher.flops import mfu, peak_flops
from launcher.metrics import Metrics, StepTimer, peak_memory_bytes, record
from launcher.optim import build_optimizer
from launcher.run_config import RunConfig
from launcher.rundir import PREEMPTED
from launcher.runtime import Runtime
from launcher.signals import STOP, Interrupted
from launcher.sinks import JsonlSink, ProgressBar, WandbSink
from launcher.sparsity import keep_zeros
from launcher.state import TrainState
from launcher.states import (
    LOOP_STATES,
    Held,
    RankJson,
    Rng,
    RunJson,
    State,
    Weights,
    as_state,
)
from launcher.stepping import StepContext, TrainingError
from launcher.stopping import StopControl, close_data
from launcher.task import Task

__all__ = ["Callback", "TrainState", "Trainer", "TrainingError"]
log = logging.getLogger(__name__)


class Callback:
    """Something that happens between steps. Order = position in the trainer's list."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass

    def writes_line_at(self, trainer: Trainer, step: int) -> bool:
        """Whether this callback writes a metrics line after ``step`` (a stop's save, which
        comes before the step's callbacks, asks: see ``Trainer.unwritten_metrics``)."""
        return False


class Trainer:
    def __init__(self, cfg: RunConfig, runtime: Runtime, task: Task, callbacks: list[Callback]):
        self.cfg, self.runtime, self.task = cfg, runtime, task
        self.callbacks = callbacks
        self.state = TrainState()
        self.timer = StepTimer(sync=runtime.device.type == "cuda")
        self.eval_results: dict[str, float] = {}
        self.last_logged: dict[str, float] = {}
        self.resumed_from: Path | None = None
        self.rng = Rng()  # a checkpoint's RNG, applied when training starts
        self.last_saved_step = -1
        self.control = StopControl(cfg, runtime)
        self.started_at: float | None = None
        self.parent_info: dict | None = None
        """The parent's path and weight digests (main rank; ``runner``), for checkpoints."""
        self._abandoned: BaseException | None = None
        self._fetched: list[dict] | None = None  # the next step's micro-batches, agreed on
        self._warned_steps = False
        self._saved_window: dict | None = None  # a checkpoint's unflushed metrics (``metrics``)

    @property
    def stopped(self) -> bool:
        """Every rank agreed to stop before the horizon or the export (no export follows)."""
        return self.control.stopped

    @property
    def stop_reason(self) -> str | None:
        return self.control.reason

    @property
    def save_requested(self) -> bool:
        """A ``SAVE_NOW`` file asked for a checkpoint after this step."""
        return self.control.save_requested

    # ------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Model, optimizer and DeepSpeed engine; the data stream; metrics sinks."""
        cfg, rt = self.cfg, self.runtime
        model = self.task.build_model()
        if cfg.train.activation_checkpointing:
            self.task.enable_activation_checkpointing(model)
        if cfg.init.keep_zeros:  # a pruned model's recovery: its zeros stay (launcher.sparsity)
            kept = keep_zeros(model)
            zeros = sum(kept.values())
            log.info("init.keep_zeros: %d zero weights in %d matrices stay 0", zeros, len(kept))
        base = None
        if cfg.dist.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            _clear_stale_build_lock(rt, "CPUAdamBuilder")  # built when first constructed
            base = DeepSpeedCPUAdam
        self.optimizer = build_optimizer(
            self.task.param_groups(model), cfg.optim, own_clipping=rt.own_clipping, base=base
        )
        self.engine, _ = rt.accelerator.prepare(model, self.optimizer)
        if rt.world_size == 1 and rt.zero_stage == 0:
            # Alone, there is nothing to all-reduce, but DeepSpeed's ZeRO-0 engine still
            # flattens every gradient into a bucket, "all-reduces" it and copies it back after
            # each backward: 5-6% of a step of `small` on CPU (benchmarks/loop_overhead.py).
            self.engine.enable_backward_allreduce = False
        if cfg.train.compile:
            self.engine.compile()
        self.task.on_engine(self.engine)  # companions (runtime.prepare_frozen), before any batch
        self.loader = self.task.train_batches()
        self.batches: Iterator | None = None  # workers start at the first batch, after resume
        self.accum = cfg.grad_accum_steps
        self.optimizer_steps_per_step = self.task.optimizer_steps_per_step()
        if self.optimizer_steps_per_step < 1:
            raise ValueError(f"{type(self.task).__name__}.optimizer_steps_per_step must be >= 1")
        tokens_per_step = cfg.train.global_batch_size * self.task.tokens_per_sequence()
        tokens_per_step *= self.optimizer_steps_per_step  # every pass counts its tokens
        self.steps_per_epoch = self.task.steps_per_epoch()
        wants = {
            "train.epochs": cfg.train.epochs is not None,
            "eval.every": cfg.eval.every == "epoch",
        }
        for key in (k for k, v in wants.items() if v and self.steps_per_epoch is None):
            raise UserError(
                f"{key}: {type(self.task).__name__} streams its data (no epoch length: "
                "Task.steps_per_epoch is None); use train.max_steps and a number of steps"
            )
        self.horizon = cfg.train.horizon(tokens_per_step, self.steps_per_epoch)
        self.peak, self.peak_source = peak_flops(rt.device, rt.dtype, cfg.metrics.peak_flops)
        snapshot.undo_initial_step(self.optimizer, self.engine)  # ZeRO-0 + bf16 (it says why)
        snapshot.ensure_moments(self.optimizer, self.engine)
        self.checkpoint_states()  # a task's bad state names fail here, not at the first save
        self.resumed_from = persist.resume(self)
        if self.state.finished_at is not None:  # a run a task finished early stays finished
            self.horizon = self.state.finished_at
        if self.resumed_from is None and rt.is_main:
            _set_aside(self.cfg.run_dir / "metrics.jsonl")  # a fresh run: its own metrics file
        self.metrics = Metrics(
            run_dir=cfg.run_dir,
            is_main=rt.is_main,
            world_size=rt.world_size,
            all_reduce=rt.all_reduce if rt.world_size > 1 else None,
            sinks=self._sinks(),
        )
        self.metrics.activate()
        if self._saved_window:
            self.metrics.restore(self._saved_window)
            self._saved_window = None

    def _sinks(self) -> list:
        if not self.runtime.is_main:
            return []
        cfg = self.cfg
        sinks: list = [JsonlSink(cfg.run_dir / "metrics.jsonl")]
        if cfg.metrics.resolved_wandb_mode() != "disabled":
            sinks.append(WandbSink.from_run_config(self.runtime.accelerator, cfg))
        if cfg.metrics.progress_bar:
            self.progress = ProgressBar(total=0)
            sinks.append(self.progress)
        return sinks

    # ------------------------------------------------------------------------------- steps

    def train_step(self) -> None:
        """One loop step: the task's step (``Task.train_step``) over ``accum`` micro-batches,
        those ``fit`` fetched for it or (called on its own, e.g. by benchmarks) the next ones
        of ``batches``. Raises ``TrainingError`` after too many skipped steps in a row."""
        batches, self._fetched = self._fetched, None
        if batches is None:
            with self.timer.phase("data_wait"):
                batches = [next(self.batches) for _ in range(self.accum)]
        step = StepContext(self)
        self.task.train_step(step, batches)
        self.state.step += 1
        if step.optimizer_steps != self.optimizer_steps_per_step and not self._warned_steps:
            self._warned_steps = True
            log.warning(
                "step %d: %s.train_step took %d optimizer steps, but the LR schedule assumes "
                "%d per step (Task.optimizer_steps_per_step)",
                self.state.step,
                type(self.task).__name__,
                step.optimizer_steps,
                self.optimizer_steps_per_step,
            )

    def checkpoint_states(self) -> dict[str, State]:
        """What a checkpoint holds, by name, in load order: the loop's own (``LOOP_STATES``:
        weights and moments, Adam's step count, the loop counters, ``Task.state_dict`` per
        rank, RNG), then the task's (``Task.states``). Raises ``ValueError`` when the task
        reuses one of the loop's names, ``TypeError`` for a value that is no state."""
        opt, engine = self.optimizer, self.engine

        def set_adam_step(step: float) -> None:
            snapshot.set_adam_step(opt, engine, step)

        states: dict[str, State] = {
            "weights": Weights(engine.module, opt, engine),
            "adam_step": RunJson(Held(lambda: snapshot.adam_step(opt, engine), set_adam_step)),
            "train_state": RunJson(self.state),
            "task": RankJson(self.task),
            "rng": self.rng,
            # what was recorded since the last metrics line; optional: older checkpoints
            # have none, and their resumed run's first line covers the steps after the resume
            "metrics": RankJson(Held(self.unwritten_metrics, self._load_window), optional=True),
        }
        owner = type(self.task).__name__
        for name, value in self.task.states().items():
            if name in states:
                raise ValueError(
                    f"{owner}.states(): {name!r} is one of the loop's own states "
                    f"({', '.join(LOOP_STATES)}); name it otherwise"
                )
            states[name] = as_state(value, name, owner)
        return states

    def unwritten_metrics(self) -> dict:
        """This rank's values recorded since the last metrics line, for a checkpoint. A stop
        saves before the step's callbacks run: when they would have written a line at this
        step (a log or evaluation step, the last step), the stop's own line is that line, and
        nothing is left over for the resumed run."""
        step = self.state.step
        if self.control.stopped and any(c.writes_line_at(self, step) for c in self.callbacks):
            return {}
        return self.metrics.state_dict()

    def _load_window(self, saved: list[dict]) -> None:
        """Keep this rank's unflushed metrics of the checkpoint for ``setup`` to restore; on
        another world size they describe other ranks' shares, and the next line covers only
        the steps after the resume."""
        rt = self.runtime
        if len(saved) == rt.world_size:
            self._saved_window = saved[rt.rank]
        elif any(saved) and rt.is_main:
            log.info(
                "the checkpoint's metrics since its last line (saved by %d ranks) are not "
                "restored on %d ranks: the next line covers the steps after the resume",
                len(saved),
                rt.world_size,
            )

    def finish(self, reason: str) -> None:
        """End the run after this step as if it were the last one (early stopping, a target
        reached): every rank agrees after the step, then the end-of-training callbacks run
        (final evaluation, checkpoint) and the stage exports. Any rank may ask, at any moment
        of a step or its callbacks; all agree before the next step. Unlike a stop, this is no
        preemption: no PREEMPTED marker, nothing to requeue, and a resume stays finished."""
        self.control.finish(reason)

    def request_stop(self, reason: str) -> None:
        """Ask every rank to stop at the next agreement (before or after a step)."""
        self.control.request(reason)

    def _fetch(self) -> list[dict] | None:
        """The next step's micro-batches; None when a stop came first or while waiting (a
        stalled reader cannot hold the save back: the signal ends the wait)."""
        if self.control.wanted():
            return None
        batches: list[dict] = []
        try:
            with self.timer.phase("data_wait"), STOP.interruptible():
                for _ in range(self.accum):
                    batches.append(next(self.batches))
        except Interrupted as exc:
            # Keep the abandoned iterator until the save is done: shutting down a stalled
            # DataLoader worker waits seconds for it.
            self._abandoned = exc
            self.control.wanted()
            return None
        return batches

    def _data_position(self):
        position = getattr(self.loader, "position", None)
        return position() if position is not None else None

    def _rewind(self, position, fetched: bool) -> None:
        """Give back micro-batches taken for a step that will not run, so that the saved data
        state is the one of the last completed step."""
        if position is not None:
            self.loader.rewind(position)
        elif fetched:
            log.warning("the data stream cannot rewind: a batch taken but not trained is lost")

    # --------------------------------------------------------------------------------- fit

    def fit(self) -> dict[str, float]:
        """Train to the horizon, evaluate and save at the end; return the last metrics. On a
        stop (signal, time budget, train.stop_after): save the last completed step first,
        write PREEMPTED, evaluate nothing, and set ``stopped`` (the stage skips its export)."""
        started = self._last_log_time = time.time()
        self.started_at = started  # this launch's start (the export's lineage records it)
        self.batches = iter(self.loader)
        self.rng.apply(self.runtime.rank)  # after iter(): creating the iterator draws a seed
        self._first_step = self.state.step
        if self.runtime.is_main:  # the launcher removes it too, before any set-up
            (self.cfg.run_dir / PREEMPTED).unlink(missing_ok=True)
        self._last_log_tokens, self._last_log_step = self.state.tokens, self.state.step
        self.engine.train()
        if self.runtime.is_main and getattr(self, "progress", None) is not None:
            self.progress.reset(total=self.horizon, initial=self.state.step)
        try:
            with STOP.catching():
                for callback in self.callbacks:
                    callback.on_fit_start(self)
                self._run(started)
        except BaseException:
            self._close_data()  # else the exit waits forever for readers that ignore SIGTERM
            raise
        finally:
            self.metrics.close()
        return dict(self.last_logged)

    def _run(self, started: float) -> None:
        while self.state.step < self.horizon:
            position = self._data_position()
            batches = self._fetch()
            # before the step's first collective (ZeRO gathers parameters in forward)
            stop, finish = self.control.agree(
                [batches is None, self.control.finish_reason is not None]
            )
            if stop:
                self._rewind(position, fetched=batches is not None)
                return self._stop()
            if finish:  # asked for during the last step or its callbacks: it was the last
                self._rewind(position, fetched=batches is not None)
                log.info("finishing at step %d: %s", self.state.step, self.control.finish_reason)
                self.state.finished_at = self.horizon = self.state.step
                break
            self._fetched = batches
            self.train_step()
            if self.control.after_step(self.state.step, self.horizon, started, self._first_step):
                return self._stop()
            for callback in self.callbacks:
                callback.on_step_end(self)
        if self.control.agree([self.control.wanted()])[0]:  # came during the last callbacks
            return self._stop()
        for callback in self.callbacks:
            callback.on_fit_end(self)
        if self.control.agree([self.control.wanted()])[0]:  # came during the final ones
            return self._stop()

    def _stop(self) -> None:
        """Save first (the last completed step, unless it is saved already), then write
        PREEMPTED and the step's metrics line."""
        self.control.stopped = True
        log.info("stopping at step %d: %s", self.state.step, self.stop_reason)
        if self.last_saved_step != self.state.step:
            persist.save(self, self.stop_reason or "stop")
        self.mark_stopped()
        if self._last_log_step != self.state.step:
            self.log_now()
        self._close_data()

    def _close_data(self) -> None:
        batches, self.batches, self._abandoned = self.batches, None, None
        close_data(batches)

    def mark_stopped(self, pending: str | None = None) -> None:
        """Main rank: write PREEMPTED (this launch stopped early and can resume), with the
        seconds from the signal (or the agreement to stop) to the saved checkpoint."""
        self.control.mark(self.state.step, self.horizon, pending)

    # ------------------------------------------------------------------------------ helpers

    def progress_to(self, step: int) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.update(step)

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        with torch.no_grad():
            results = self.task.evaluate(self.engine)
        self.engine.train()
        self.eval_results = results
        return results

    def log_now(self) -> dict[str, float]:
        """Reduce and write everything recorded since the last call (every rank calls it)."""
        rt, now = self.runtime, time.time()
        interval = max(now - self._last_log_time, 1e-9)
        tokens = self.state.tokens - self._last_log_tokens  # global: same on every rank
        steps = max(1, self.state.step - self._last_log_step)
        self._last_log_time, self._last_log_tokens = now, self.state.tokens
        self._last_log_step = self.state.step
        for name, seconds in self.timer.pop().items():  # seconds per step, slowest rank
            record(f"time/{name}", seconds / steps, reduce="max")
        record("memory/peak_bytes", float(peak_memory_bytes(rt.device)), reduce="max")
        self.task.on_log()
        per_device = tokens / interval / rt.world_size
        extra = {
            "dist/world_size": float(rt.world_size),
            "dist/zero_stage": float(rt.zero_stage),
            "train/tokens_seen": float(self.state.tokens),
        }
        if tokens:  # not for a line that only adds the final evaluation
            extra["throughput/tokens_per_s"] = tokens / interval
            extra["throughput/tokens_per_s_per_device"] = per_device
            fpt = self.task.flops_per_token()
            if fpt:
                extra["throughput/mfu"] = mfu(per_device, fpt, self.peak)
        out = self.metrics.flush(self.state.step, extra={**extra, **self.eval_results})
        self.eval_results = {}
        self.last_logged = out
        return out


def _clear_stale_build_lock(rt: Runtime, builder: str) -> None:
    """Before DeepSpeed JIT-builds an op: a lock a killed build left would make it wait
    forever (``launcher.build_lock``). One process per machine looks: a second could take
    the lock the first one's build has just created for stale; the others wait for it."""
    from deepspeed.accelerator import get_accelerator

    from launcher.build_lock import build_folder, clear_stale_lock

    op = get_accelerator().create_op_builder(builder)
    if op is not None and rt.local_rank == 0:
        clear_stale_lock(build_folder(op.NAME))
    rt.barrier()


def _set_aside(path: Path) -> None:
    if path.exists():
        path.rename(path.with_name(f"{path.stem}-{int(path.stat().st_mtime)}{path.suffix}"))

"""THE training loop, shared by every stage: step, accumulate, clip, schedule, skip, stop.

Per optimizer step: take the step's ``accum`` micro-batches, agree with every rank to go on,
set the learning rate from the schedule, run the micro-batches (forward, loss, backward:
DeepSpeed accumulates and, on the last one, reduces and calls our optimizer, which clips or
skips), count tokens, agree again, then run the callbacks in their list order (evaluate, log,
checkpoint...). Every rank takes the same decisions: skips are decided on an all-reduced
gradient norm, and stop requests (time budget, signals) are all-reduced twice a step: after
the step (so a stop skips its evaluation) and before the next one's first collective (so a
rank stuck waiting for data, freed by the signal, is not left behind by ranks already inside
a ZeRO collective). A stop saves the last completed step first, with the data stream rewound
to it, and writes PREEMPTED; no evaluation, no export.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from launcher import persist, snapshot
from launcher.errors import UserError
from launcher.flops import mfu, peak_flops
from launcher.metrics import (
    JsonlSink,
    Metrics,
    ProgressBar,
    StepTimer,
    WandbSink,
    peak_memory_bytes,
    record,
)
from launcher.optim import build_optimizer, lr_factor, set_lr
from launcher.run_config import RunConfig
from launcher.rundir import PREEMPTED, write_marker
from launcher.runtime import Runtime
from launcher.signals import STOP, Interrupted
from launcher.state import TrainState
from launcher.task import Task

log = logging.getLogger(__name__)


class TrainingError(UserError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


class Callback:
    """Something that happens between steps. Order = position in the trainer's list."""

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass


class Trainer:
    def __init__(self, cfg: RunConfig, runtime: Runtime, task: Task, callbacks: list[Callback]):
        self.cfg, self.runtime, self.task = cfg, runtime, task
        self.callbacks = callbacks
        self.state = TrainState()
        self.timer = StepTimer(sync=runtime.device.type == "cuda")
        self.eval_results: dict[str, float] = {}
        self.last_logged: dict[str, float] = {}
        self.resumed_from: Path | None = None
        self.rng_from: Path | None = None  # a checkpoint's RNG, set when training starts
        self.last_saved_step = -1
        self.save_requested = False
        self.stop_reason: str | None = None
        self.stopped = False  # every rank agreed to stop before the horizon or the export
        self._stop_requested = False
        self._finish_requested: str | None = None
        self._stop_agreed: float | None = None
        self._abandoned: BaseException | None = None
        self._fetched: list[dict] | None = None  # the next step's micro-batches, agreed on

    # ------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Model, optimizer and DeepSpeed engine; the data stream; metrics sinks."""
        cfg, rt = self.cfg, self.runtime
        model = self.task.build_model()
        if cfg.train.activation_checkpointing:
            self.task.enable_activation_checkpointing(model)
        base = None
        if cfg.dist.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

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
        tokens_per_step = cfg.train.global_batch_size * self.task.tokens_per_sequence()
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
        """One optimizer step over ``accum`` micro-batches: those ``fit`` fetched for it, or
        (called on its own, e.g. by benchmarks) the next ones of ``batches``."""
        rt, opt = self.runtime, self.optimizer
        batches, self._fetched = self._fetched, None
        if batches is None:
            with self.timer.phase("data_wait"):
                batches = [next(self.batches) for _ in range(self.accum)]
        # a skipped step does not advance the schedule: the next step retries the same LR
        lr = set_lr(opt, lr_factor(self.cfg.schedule, self.state.applied_steps, self.horizon))
        scale, step_tokens = self._item_scale(batches)
        losses, tokens = [], 0
        opt.step_called = False
        for micro, batch in enumerate(batches):
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            last = micro == self.accum - 1
            with self.timer.phase("forward_backward"):
                loss = self.task.loss(self.engine, batch)
                if scale is not None:
                    loss = loss * scale
                self.engine.backward(loss)
                losses.append(loss.detach().float())
            tokens += self.task.tokens_in(batch)
            # DeepSpeed counts micro-batches in step(); on the last one it reduces gradients
            # and runs our optimizer (clip, or skip when the global norm is not finite).
            with self.timer.phase("optimizer" if last else "forward_backward"):
                self.engine.step()
        if rt.own_clipping:
            skipped, grad_norm = opt.last_skipped, opt.last_grad_norm
        else:  # DeepSpeed clipped, and skipped a non-finite step before reaching our optimizer
            skipped = not opt.step_called
            grad_norm = _as_float(self.engine.get_global_grad_norm())
        self.state.step += 1
        # equal on every rank for packed pretraining; counted over the ranks for item losses
        self.state.tokens += tokens * rt.world_size if step_tokens is None else step_tokens
        if skipped:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient norm; step skipped", self.state.step)
        else:
            self.state.consecutive_skips = 0
            self.state.applied_steps += 1
        record("train/loss", torch.stack(losses).mean())
        record("train/lr", lr, reduce="last")
        record("train/grad_norm", grad_norm, reduce="max")
        record("train/skipped_steps", float(skipped), reduce="max")
        if self.state.consecutive_skips >= self.cfg.train.max_consecutive_skips:
            raise TrainingError(
                f"{self.state.consecutive_skips} optimizer steps in a row (up to step "
                f"{self.state.step}) had a non-finite loss or gradient norm and were skipped; "
                "stopping. Lower optim.lr, check the data, or resume from the last checkpoint "
                f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips})"
            )

    def _item_scale(self, batches: list[dict]) -> tuple[float | None, int | None]:
        """For a task whose loss is a sum over counted items (``Task.items_in``): the factor
        that turns each micro-batch's sum into its share of the step's global item mean.
        DeepSpeed divides every backward by the accumulation steps and averages gradients
        over the ranks, so the factor is accum x world / (items of every micro-batch of every
        rank). The logged loss (a mean over micro-batches and ranks) is then the global item
        mean too. Also the step's tokens over every rank (in the same all-reduce: with
        masked losses, ranks see different token counts). (None, None): the task's losses are
        means (the default)."""
        counts = [self.task.items_in(batch) for batch in batches]
        if all(c is None for c in counts):
            return None, None
        if any(c is None for c in counts):
            raise TypeError(f"{type(self.task).__name__}.items_in returned None for some batches")
        tokens = sum(self.task.tokens_in(batch) for batch in batches)
        total = torch.tensor([float(sum(counts)), float(tokens)], device=self.runtime.device)
        self.runtime.all_reduce(total, "sum")
        items, tokens = total.tolist()
        return self.accum * self.runtime.world_size / max(items, 1.0), int(tokens)

    def finish(self, reason: str) -> None:
        """End the run after this step as if it were the last one (early stopping, a target
        reached): every rank agrees after the step, then the end-of-training callbacks run
        (final evaluation, checkpoint) and the stage exports. Any rank may ask, at any moment
        of a step or its callbacks; all agree before the next step. Unlike a stop, this is no
        preemption: no PREEMPTED marker, nothing to requeue, and a resume stays finished."""
        self._finish_requested = self._finish_requested or reason

    def request_stop(self, reason: str) -> None:
        """Ask every rank to stop at the next agreement (before or after a step)."""
        self._stop_requested = True
        self.stop_reason = self.stop_reason or reason

    def _stop_wanted(self) -> bool:
        if STOP.name is not None and not self._stop_requested:
            self.request_stop(f"signal {STOP.name}")
        return self._stop_requested

    def _agree(self, flags: list[bool]) -> list[bool]:
        """Any rank's flag, on every rank (one tiny all-reduce)."""
        tensor = torch.tensor([float(f) for f in flags], device=self.runtime.device)
        self.runtime.all_reduce(tensor, "max")
        out = [bool(x) for x in tensor.tolist()]
        if out[0]:
            self._stop_agreed = self._stop_agreed or time.monotonic()
            self.stop_reason = self.stop_reason or "stop requested on another rank"
        return out

    def _sync_control(self, started: float) -> bool:
        """After a step: do all ranks stop (time budget, stop_after, a signal on any rank) or
        save now (a `SAVE_NOW` file in the run directory)? Returns whether to stop."""
        budget, stop_after = self.cfg.train.max_time, self.cfg.train.stop_after
        if self.state.step < self.horizon:  # reaching the horizon is no early stop
            if budget is not None and time.time() - started >= budget:
                self.request_stop("time budget")
            if stop_after is not None and self.state.step - self._first_step >= stop_after:
                self.request_stop(f"train.stop_after={stop_after}")
        save_now = self.runtime.is_main and (self.cfg.run_dir / SAVE_NOW).exists()
        stop, self.save_requested = self._agree([self._stop_wanted(), save_now])
        if self.save_requested and self.runtime.is_main:
            (self.cfg.run_dir / SAVE_NOW).unlink(missing_ok=True)
        return stop

    def _fetch(self) -> list[dict] | None:
        """The next step's micro-batches; None when a stop came first or while waiting (a
        stalled reader cannot hold the save back: the signal ends the wait)."""
        if self._stop_wanted():
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
            self._stop_wanted()
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
        self.batches = iter(self.loader)
        if self.rng_from is not None:  # after iter(): creating the iterator draws a seed
            snapshot.load_rng(self.rng_from, self.runtime.rank)
        self._first_step = self.state.step
        if self.runtime.is_main:  # the launcher removes it too, before any set-up
            (self.cfg.run_dir / PREEMPTED).unlink(missing_ok=True)
        self._last_log_tokens, self._last_log_step = self.state.tokens, self.state.step
        self.engine.train()
        if self.runtime.is_main and getattr(self, "progress", None) is not None:
            self.progress.reset(total=self.horizon, initial=self.state.step)
        try:
            with STOP.catching():
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
            stop, finish = self._agree([batches is None, self._finish_requested is not None])
            if stop:
                self._rewind(position, fetched=batches is not None)
                return self._stop()
            if finish:  # asked for during the last step or its callbacks: it was the last
                self._rewind(position, fetched=batches is not None)
                log.info("finishing at step %d: %s", self.state.step, self._finish_requested)
                self.state.finished_at = self.horizon = self.state.step
                break
            self._fetched = batches
            self.train_step()
            if self._sync_control(started):
                return self._stop()
            for callback in self.callbacks:
                callback.on_step_end(self)
        if self._agree([self._stop_wanted()])[0]:  # came during the last step's callbacks
            return self._stop()
        for callback in self.callbacks:
            callback.on_fit_end(self)
        if self._agree([self._stop_wanted()])[0]:  # came during the final evaluation or save
            return self._stop()

    def _stop(self) -> None:
        """Save first (the last completed step, unless it is saved already), then write
        PREEMPTED and the step's metrics line."""
        self.stopped = True
        log.info("stopping at step %d: %s", self.state.step, self.stop_reason)
        if self.last_saved_step != self.state.step:
            persist.save(self, self.stop_reason or "stop")
        self.mark_stopped()
        if self._last_log_step != self.state.step:
            self.log_now()
        self._close_data()

    def _close_data(self) -> None:
        """After a stop or an error: shut the data iterator down (its workers exit at once,
        a stalled one is given 5 s), then end the workers still there. They ignore stop
        signals (the trainer handles them), and at exit Python sends its daemonic children
        SIGTERM and waits for them: forever, for a reader that is stalled or never told."""
        batches, self.batches, self._abandoned = self.batches, None, None
        if hasattr(batches, "close"):
            batches.close()
        gc.collect()  # an abandoned iterator's frames hold it in a cycle
        try:
            for child in multiprocessing.active_children():
                if child.daemon:
                    child.kill()
                    child.join(timeout=5)
        except RuntimeError as exc:  # torch's SIGCHLD check, if an iterator still watched one
            log.warning("ending the data workers: %s", exc)

    def mark_stopped(self, pending: str | None = None) -> None:
        """Main rank: write PREEMPTED (this launch stopped early and can resume), with the
        seconds from the signal (or the agreement to stop) to the saved checkpoint."""
        self.stopped = True
        self.stop_reason = self.stop_reason or (f"signal {STOP.name}" if STOP.name else "stop")
        if not self.runtime.is_main:
            return
        since = STOP.seconds_since()
        if since is None and self._stop_agreed is not None:
            since = time.monotonic() - self._stop_agreed
        step = self.state.step
        checkpoint = self.cfg.run_dir / "checkpoints" / f"step-{step:08d}"
        info = {"step": step, "reason": self.stop_reason, "time": time.time()}
        info.update(checkpoint=str(checkpoint), seconds_to_save=since, pending=pending)
        if step >= self.horizon:
            info["pending"] = pending or "the final evaluation and export"
        write_marker(self.cfg.run_dir, info)
        timing = f", {since:.1f} s after the stop request" if since is not None else ""
        log.warning(
            "stopped at step %d (%s): checkpoint %s%s (grace %d s); resume with the same command",
            step,
            self.stop_reason,
            checkpoint,
            timing,
            self.cfg.checkpoint.grace,
        )

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


SAVE_NOW = "SAVE_NOW"
"""Create this file in the run directory to get a checkpoint at the next step (on demand)."""


def _set_aside(path: Path) -> None:
    if path.exists():
        path.rename(path.with_name(f"{path.stem}-{int(path.stat().st_mtime)}{path.suffix}"))


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)

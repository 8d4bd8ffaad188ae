"""THE training loop, shared by every stage: step, accumulate, clip, schedule, skip, stop.

Per optimizer step: set the learning rate from the schedule, run ``accum`` micro-batches
(forward, loss, backward: DeepSpeed accumulates and, on the last one, reduces and calls our
optimizer, which clips or skips), count tokens, then run the callbacks in their list order
(evaluate, log, checkpoint...). Every rank takes the same decisions: skips are decided on an
all-reduced gradient norm, and stop requests (time budget, signals) are all-reduced each step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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
from launcher.runtime import Runtime
from launcher.signals import StopOnSignal
from launcher.task import Task

log = logging.getLogger(__name__)


class TrainingError(UserError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class TrainState:
    """The loop's counters: part of every checkpoint."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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
        self.last_saved_step = -1
        self.save_requested = False
        self.stop_reason: str | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Model, optimizer and DeepSpeed engine; the data stream; metrics sinks."""
        cfg, rt = self.cfg, self.runtime
        model = self.task.build_model()
        if cfg.train.activation_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
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
        self.loader = self.task.train_batches()
        self.batches: Iterator | None = None  # workers start at the first batch, after resume
        self.accum = cfg.grad_accum_steps
        tokens_per_step = cfg.train.global_batch_size * self.task.tokens_per_sequence()
        self.horizon = cfg.train.horizon(tokens_per_step)
        self.peak, self.peak_source = peak_flops(rt.device, rt.dtype, cfg.metrics.peak_flops)
        snapshot.ensure_moments(self.optimizer, self.engine)
        self.resumed_from = persist.resume(self)
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
        """One optimizer step over ``accum`` micro-batches."""
        rt, opt = self.runtime, self.optimizer
        lr = set_lr(opt, lr_factor(self.cfg.schedule, self.state.step, self.horizon))
        losses, tokens = [], 0
        opt.step_called = False
        for micro in range(self.accum):
            with self.timer.phase("data_wait"):
                batch = next(self.batches)
                batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            last = micro == self.accum - 1
            with self.timer.phase("forward_backward"):
                loss = self.task.loss(self.engine, batch)
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
        self.state.tokens += tokens * rt.world_size
        if skipped:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient norm; step skipped", self.state.step)
        else:
            self.state.consecutive_skips = 0
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

    def request_stop(self, reason: str) -> None:
        """Ask every rank to stop after the current step (e.g. from a signal handler)."""
        self._stop_requested = True
        self.stop_reason = self.stop_reason or reason

    def _sync_control(self, started: float) -> bool:
        """One tiny all-reduce per step, so that all ranks agree to stop (time budget,
        stop_after, a signal on any rank) or to save now (a `SAVE_NOW` file in the run
        directory) at the same step. Returns whether to stop."""
        budget, stop_after = self.cfg.train.max_time, self.cfg.train.stop_after
        if budget is not None and time.time() - started >= budget:
            self.request_stop("time budget")
        if stop_after is not None and self.state.step - self._first_step >= stop_after:
            self.request_stop(f"train.stop_after={stop_after}")
        save_now = self.runtime.is_main and (self.cfg.run_dir / SAVE_NOW).exists()
        flags = torch.tensor(
            [float(self._stop_requested), float(save_now)], device=self.runtime.device
        )
        self.runtime.all_reduce(flags, "max")
        stop, self.save_requested = (bool(x) for x in flags.tolist())
        if self.save_requested and self.runtime.is_main:
            (self.cfg.run_dir / SAVE_NOW).unlink(missing_ok=True)
        if stop and self.stop_reason is None:
            self.stop_reason = "stop requested on another rank"
        return stop

    # --------------------------------------------------------------------------------- fit

    def fit(self) -> dict[str, float]:
        """Train to the horizon (or a stop); evaluate at the end; return the last metrics."""
        started = self._last_log_time = time.time()
        self.batches = iter(self.loader)
        self._first_step = self.state.step
        (self.cfg.run_dir / PREEMPTED).unlink(missing_ok=True)
        signals = StopOnSignal()
        signals.install(lambda name: self.request_stop(f"signal {name}"))
        self._last_log_tokens, self._last_log_step = self.state.tokens, self.state.step
        self.engine.train()
        if self.runtime.is_main and getattr(self, "progress", None) is not None:
            self.progress.reset(total=self.horizon, initial=self.state.step)
        try:
            while self.state.step < self.horizon:
                self.train_step()
                stop = self._sync_control(started)
                for callback in self.callbacks:
                    callback.on_step_end(self)
                if stop:
                    log.info("stopping at step %d: %s", self.state.step, self.stop_reason)
                    break
            for callback in self.callbacks:
                callback.on_fit_end(self)
            if self.stop_reason and self.state.step < self.horizon and self.runtime.is_main:
                _mark_preempted(self)
        finally:
            signals.uninstall()
            self.metrics.close()
        return dict(self.last_logged)

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
PREEMPTED = "PREEMPTED"
"""In the run directory while the run stopped early and can resume (launchers turn worker
exit codes into 1, so a file tells the batch script to requeue)."""


def _mark_preempted(trainer: Trainer) -> None:
    info = {"step": trainer.state.step, "reason": trainer.stop_reason, "time": time.time()}
    info["checkpoint"] = str(trainer.cfg.run_dir / "checkpoints" / f"step-{trainer.state.step:08d}")
    (trainer.cfg.run_dir / PREEMPTED).write_text(json.dumps(info) + "\n")
    log.warning(
        "run stopped at step %d (%s); resume with the same command", info["step"], info["reason"]
    )


def _set_aside(path: Path) -> None:
    if path.exists():
        path.rename(path.with_name(f"{path.stem}-{int(path.stat().st_mtime)}{path.suffix}"))


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)

"""The `pretrain` stage: prepare inputs on the main rank, then train with the shared loop."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from launcher.callbacks import default_callbacks
from launcher.loop import Trainer
from launcher.runtime import Runtime, build_runtime, seed_everything
from launcher.signals import STOP, Interrupted
from launcher.stages import Stage
from pretrain.config import PretrainConfig
from pretrain.export import export_checkpoint
from pretrain.prepare import prepare_inputs
from pretrain.task import PretrainTask

log = logging.getLogger(__name__)


def pretrain(cfg: PretrainConfig) -> dict[str, float]:
    """Train, evaluate, export ``runs/<name>/hf/``; returns the last logged metrics. A stop
    signal at any moment (set-up included) leads to a checkpoint and PREEMPTED, not the export.
    """
    with STOP.catching():  # the launcher's worker installed it already; in-process: from here
        wandb = cfg.metrics.resolved_wandb_mode() != "disabled"
        runtime = build_runtime(cfg, log_with="wandb" if wandb else None)
        try:
            return _pretrain(cfg, runtime)
        finally:
            runtime.close()  # leave the process group: another run may follow in-process


def _pretrain(cfg: PretrainConfig, runtime: Runtime) -> dict[str, float]:
    seed_everything(cfg.run.seed, runtime.rank)
    if runtime.is_main:
        prepare_inputs(cfg)  # corpus, tokenizer, resolved config: once, before the others read
    runtime.barrier()
    task = PretrainTask(cfg, runtime)
    trainer = Trainer(cfg, runtime, task, default_callbacks(cfg))
    trainer.setup()
    results = trainer.fit()
    if trainer.stopped:  # the grace time was for the checkpoint; the export comes on resume
        runtime.barrier()
        return results
    # Under ZeRO-3 the full weights exist nowhere: every rank takes part in gathering them.
    state = runtime.accelerator.get_state_dict(trainer.engine)
    if runtime.is_main:
        out = cfg.run_dir / "hf"
        try:
            with STOP.interruptible():  # the main rank alone: no collective to leave hanging
                _export(task, runtime.accelerator.unwrap_model(trainer.engine), state, out)
        except Interrupted:
            trainer.mark_stopped(pending="the export")
            runtime.barrier()
            return results
        bpb = results.get("eval/bits_per_byte")
        print(
            f"[kiln] trained {trainer.state.step} steps, {trainer.state.tokens:,} tokens; "
            f"validation loss {results.get('eval/loss', float('nan')):.4f}"
            + (f", bits per byte {bpb:.4f}" if bpb is not None else "")
        )
        print(f"[kiln] metrics         {cfg.run_dir / 'metrics.jsonl'}")
        print(f"[kiln] model           {out}/ (HF format)")
    runtime.barrier()
    return results


def _export(task: PretrainTask, model, state: dict | None, out: Path) -> None:
    """Write ``out`` whole or not at all: into ``out.tmp``, then renamed."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    task.export(model, state, tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


STAGE = Stage(
    name="pretrain",
    config_class=PretrainConfig,
    run=pretrain,
    help="pretrain the decoder on the configured corpus",
    distributed=True,
    export=export_checkpoint,
)

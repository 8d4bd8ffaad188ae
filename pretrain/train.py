"""The `pretrain` stage: prepare inputs on the main rank, then train with the shared loop."""

from __future__ import annotations

import logging

from launcher.callbacks import default_callbacks
from launcher.loop import Trainer
from launcher.runtime import build_runtime, seed_everything
from launcher.stages import Stage
from pretrain.config import PretrainConfig
from pretrain.export import export_checkpoint
from pretrain.prepare import prepare_inputs
from pretrain.task import PretrainTask

log = logging.getLogger(__name__)


def pretrain(cfg: PretrainConfig) -> dict[str, float]:
    """Train, evaluate, export ``runs/<name>/hf/``; returns the last logged metrics."""
    wandb = cfg.metrics.resolved_wandb_mode() != "disabled"
    runtime = build_runtime(cfg, log_with="wandb" if wandb else None)
    seed_everything(cfg.run.seed, runtime.rank)
    if runtime.is_main:
        prepare_inputs(cfg)  # corpus, tokenizer, resolved config: once, before the others read
    runtime.barrier()
    task = PretrainTask(cfg, runtime)
    trainer = Trainer(cfg, runtime, task, default_callbacks(cfg))
    trainer.setup()
    results = trainer.fit()
    # Under ZeRO-3 the full weights exist nowhere: every rank takes part in gathering them.
    state = runtime.accelerator.get_state_dict(trainer.engine)
    if runtime.is_main:
        out = cfg.run_dir / "hf"
        task.export(runtime.accelerator.unwrap_model(trainer.engine), state, out)
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


STAGE = Stage(
    name="pretrain",
    config_class=PretrainConfig,
    run=pretrain,
    help="pretrain the decoder on the configured corpus",
    distributed=True,
    export=export_checkpoint,
)

"""The `pretrain` stage: prepare inputs on the main rank, then train with the shared loop."""

from __future__ import annotations

from launcher.runner import run_stage
from launcher.stages import Stage
from pretrain.config import PretrainConfig
from pretrain.export import export_checkpoint
from pretrain.memory import main as plan_main
from pretrain.mlm import pretrain_task
from pretrain.prepare import prepare_inputs


def pretrain(cfg: PretrainConfig) -> dict[str, float]:
    """Train, evaluate, export ``runs/<name>/hf/``; returns the last logged metrics. A stop
    signal at any moment (set-up included) leads to a checkpoint and PREEMPTED, not the export.
    """
    return run_stage(cfg, pretrain_task, prepare=prepare_inputs)


STAGE = Stage(
    name="pretrain",
    config_class=PretrainConfig,
    run=pretrain,
    help="pretrain the decoder on the configured corpus",
    distributed=True,
    export=export_checkpoint,
    plan=plan_main,
)

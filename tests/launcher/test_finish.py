"""A task may end its run early on purpose (early stopping, a target reached): that is a
finished run, not a preemption: the end-of-training callbacks run, no PREEMPTED marker is
written, and resuming it trains nothing more."""

from __future__ import annotations

import pytest

from launcher.callbacks import default_callbacks
from launcher.errors import UserError
from launcher.loop import Callback, Trainer
from launcher.rundir import PREEMPTED
from launcher.runtime import build_runtime

from .test_item_loss import Toy, config


class FinishAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            trainer.finish("the target was reached")


def train(cfg, *callbacks: Callback) -> Trainer:
    runtime = build_runtime(cfg)
    try:
        trainer = Trainer(cfg, runtime, Toy(cfg, runtime), [*default_callbacks(cfg), *callbacks])
        trainer.setup()
        trainer.fit()
        return trainer
    finally:
        runtime.close()


def setup_fails(cfg, match: str) -> None:
    """The toy task's trainer refuses ``cfg`` at set-up with a UserError matching ``match``."""
    runtime = build_runtime(cfg)
    try:
        trainer = Trainer(cfg, runtime, Toy(cfg, runtime), default_callbacks(cfg))
        with pytest.raises(UserError, match=match):
            trainer.setup()
    finally:
        runtime.close()


def test_finish_at_step_3_of_10_ends_like_a_completed_run(tmp_path):
    cfg = config(tmp_path, "finish", 2, 1).model_copy(deep=True)
    cfg.train.max_steps = 10
    cfg.checkpoint.resume = "auto"
    trainer = train(cfg, FinishAt(3))
    assert trainer.state.step == 3 and trainer.state.finished_at == 3
    assert not trainer.stopped  # the stage goes on to its export
    assert not (cfg.run_dir / PREEMPTED).exists()
    saved = sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("step-*"))
    assert saved == ["step-00000003"]  # the final checkpoint, at the step it finished
    again = train(cfg)  # resuming a finished run: nothing more to train
    assert str(again.resumed_from).endswith("step-00000003") and again.state.step == 3


def test_activation_checkpointing_on_a_model_without_it_is_a_clear_error(tmp_path):
    cfg = config(tmp_path, "ckpt", 2, 1).model_copy(deep=True)
    cfg.train.activation_checkpointing = True
    setup_fails(cfg, r"activation_checkpointing: Toy builds a Linear")


def test_a_model_without_an_hf_config_trains_under_zero3(tmp_path):
    """ZeRO-3's buffer sizes come from the config's model_width(); a task whose config gives
    none (and whose model has no ``config`` for Accelerate to read) gets DeepSpeed's defaults
    instead of Accelerate's "Can't find `model.config` entry" at prepare."""
    cfg = config(tmp_path, "z3", 2, 1).model_copy(deep=True)
    cfg.dist.zero_stage = 3
    trainer = train(cfg)
    assert trainer.engine.zero_optimization_stage() == 3 and trainer.state.step == 2
    zero = trainer.runtime.ds_config["zero_optimization"]
    assert "auto" not in zero.values() and "reduce_bucket_size" not in zero


class ThreeStepEpochs(Toy):
    """A finite toy dataset: 3 optimizer steps per pass; evaluations note their step."""

    def steps_per_epoch(self) -> int:
        return 3

    def evaluate(self, model):
        self.evaluated = [*getattr(self, "evaluated", []), self.trainer_step()]
        return {"eval/loss": 1.0}


def test_epochs_set_the_horizon_and_evaluation_can_follow_them(tmp_path):
    cfg = config(tmp_path, "epochs", 2, 1).model_copy(deep=True)
    cfg.train.epochs, cfg.eval.every = 2, "epoch"
    cfg = type(cfg).model_validate(cfg.model_dump())
    runtime = build_runtime(cfg)
    try:
        task = ThreeStepEpochs(cfg, runtime)
        trainer = Trainer(cfg, runtime, task, default_callbacks(cfg))
        task.trainer_step = lambda: trainer.state.step
        trainer.setup()
        assert trainer.horizon == 6  # 2 epochs of 3 steps; max_steps (2) does not count
        trainer.fit()
        assert trainer.state.step == 6 and task.evaluated == [3, 6]
    finally:
        runtime.close()


def test_epochs_for_a_task_that_streams_are_a_clear_error(tmp_path):
    cfg = config(tmp_path, "stream", 2, 1).model_copy(deep=True)
    cfg.eval.every = "epoch"
    cfg = type(cfg).model_validate(cfg.model_dump())
    setup_fails(cfg, r"eval\.every: Toy streams its data")

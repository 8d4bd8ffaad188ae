"""A task may own its step: K optimizer passes over the micro-batches of one loop step (PPO's
epochs over a rollout) train exactly like K default steps over the same micro-batches, with
the schedule, Adam's step count and item normalisation following optimizer steps and the
loop's cadence following loop steps; a stop and resume in the middle changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from launcher import snapshot
from launcher.callbacks import default_callbacks
from launcher.loop import Trainer
from launcher.runtime import build_runtime
from launcher.states import RunJson

from .test_item_loss import GLOBAL, RowStream, Toy, config, row

K = 3


class GroupStream(RowStream):
    """Loop step s gets the rows of group s // repeat: with repeat K, each group K times."""

    def __init__(self, rank: int, world: int, micro: int, repeat: int):
        super().__init__(rank, world, micro)
        self.repeat = repeat

    def __iter__(self):
        per_rank = GLOBAL // self.world
        while True:
            step, j = divmod(self.next, per_rank // self.micro)
            first = (step // self.repeat) * GLOBAL + self.rank * per_rank + j * self.micro
            rows = [row(i) for i in range(first, first + self.micro)]
            self.next += 1
            yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class Repeated(Toy):
    """The default step, each group of micro-batches drawn K times in a row."""

    def train_batches(self):
        rt = self.runtime
        return GroupStream(rt.rank, rt.world_size, self.cfg.train.micro_batch_size, K)


class Passes(Toy):
    """K optimizer passes over each loop step's micro-batches; the stream's position is the
    task's state."""

    def train_batches(self):
        rt = self.runtime
        self.stream = GroupStream(rt.rank, rt.world_size, self.cfg.train.micro_batch_size, 1)
        return self.stream

    def state_dict(self) -> dict:
        return {"next": self.stream.next}

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.next = states[self.runtime.rank]["next"]

    def optimizer_steps_per_step(self) -> int:
        return K

    def train_step(self, step, batches) -> None:
        for _ in range(K):
            step.optimize(batches)


class Shift:
    """A run-wide value that a step changes and the loss uses (a KL controller's kind)."""

    def __init__(self):
        self.value = 0.0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptivePasses(Passes):
    """Passes whose targets move by a coefficient adapted after each loop step."""

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.shift = Shift()

    def states(self) -> dict:
        return {"shift": RunJson(self.shift)}

    def loss(self, model, batch):
        errors = (model(batch["x"]).squeeze(-1) - batch["y"] - self.shift.value) ** 2
        return (errors * batch["mask"]).sum()

    def train_step(self, step, batches) -> None:
        results = [step.optimize(batches) for _ in range(K)]
        self.shift.value += 0.1 * float(results[-1].loss)


def cfg_for(root, name: str, steps: int, **checkpoint):
    cfg = config(root, name, 2, 1).model_copy(deep=True)
    cfg.train.max_steps = steps
    cfg.optim.weight_decay, cfg.optim.grad_clip = 0.1, 1.0
    cfg.schedule.kind, cfg.schedule.warmup_steps = "cosine", 2
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def train(cfg, task_cls) -> tuple[Trainer, dict[str, torch.Tensor]]:
    runtime = build_runtime(cfg)
    try:
        trainer = Trainer(cfg, runtime, task_cls(cfg, runtime), default_callbacks(cfg))
        trainer.setup()
        trainer.fit()
        params = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
        return trainer, params
    finally:
        runtime.close()


def logged(cfg) -> list[dict]:
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return [x for x in map(json.loads, lines) if "train/loss" in x]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_k_passes_in_one_step_train_like_k_default_steps(tmp_path):
    steps = 2
    default, expected = train(cfg_for(tmp_path, "default", K * steps), Repeated)
    passes, got = train(cfg := cfg_for(tmp_path, "passes", steps), Passes)
    assert max_diff(got, expected) <= 1e-7
    assert (passes.state.step, passes.state.applied_steps) == (steps, K * steps)
    assert snapshot.adam_step(passes.optimizer, passes.engine) == K * steps
    assert passes.state.tokens == default.state.tokens  # every pass counts its tokens
    lines = logged(cfg)  # one line per loop step (metrics.log_every=1)
    assert [x["step"] for x in lines] == [1, 2]
    lrs = [x["train/lr"] for x in logged(cfg_for(tmp_path, "default", K * steps))]
    assert [x["train/lr"] for x in lines] == [lrs[K - 1], lrs[2 * K - 1]]  # the step's last


def test_optimize_refuses_another_number_of_micro_batches(tmp_path):
    class Half(Passes):
        def train_step(self, step, batches) -> None:
            step.optimize(batches[:1])

    with pytest.raises(ValueError, match=r"Half.train_step: optimize\(\) takes 4 micro-batches"):
        train(cfg_for(tmp_path, "half", 1), Half)


def test_a_task_step_stopped_and_resumed_at_loop_step_2_equals_an_uninterrupted_run(tmp_path):
    _, expected = train(cfg_for(tmp_path, "whole", 4), AdaptivePasses)
    cut = cfg_for(tmp_path, "cut", 4, every=2, resume="auto")
    cut.train.stop_after = 2
    first, _ = train(cut, AdaptivePasses)
    assert first.stopped and first.state.step == 2
    cut.train.stop_after = None
    again, got = train(cut, AdaptivePasses)
    assert again.resumed_from.name == "step-00000002" and again.state.step == 4
    assert max_diff(got, expected) == 0.0
    assert again.state.applied_steps == 4 * K


def test_an_accelerator_made_earlier_in_the_process_does_not_turn_deepspeed_off(tmp_path):
    """Accelerate's state is a process-wide singleton: a plain Accelerator made before ours
    (a TRL trainer in the same process) once made prepare() return the bare model."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator()  # DeepSpeed off, the state left behind
    try:
        trainer, _ = train(cfg_for(tmp_path, "after-plain", 2), Repeated)
        assert type(trainer.engine).__name__ == "DeepSpeedEngine"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

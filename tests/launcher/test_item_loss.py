"""Losses summed over counted items (SFT's assistant tokens, preference pairs): the gradient of
a step is the mean over every item of the step, whatever the split into micro-batches,
accumulation steps and ranks. A toy task: a linear model on rows of 9 positions, of which
between 1 and 9 are targets, so that micro-batches carry different numbers of items."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.callbacks import default_callbacks
from launcher.loop import Trainer
from launcher.run_config import RunConfig
from launcher.runtime import build_runtime
from launcher.task import Task

from .runs import torchrun_two

GLOBAL = 8  # rows per optimizer step
POSITIONS = 9
STEPS = 2


def row(index: int) -> dict[str, torch.Tensor]:
    """Row ``index`` of the endless toy stream: inputs, targets and a mask of 1-9 targets."""
    g = torch.Generator().manual_seed(index)
    targets = int(torch.randint(1, POSITIONS + 1, (1,), generator=g))
    mask = torch.zeros(POSITIONS)
    mask[torch.randperm(POSITIONS, generator=g)[:targets]] = 1.0
    return {"x": torch.randn(POSITIONS, 4, generator=g), "y": torch.randn(POSITIONS, generator=g),
            "mask": mask}  # fmt: skip


class RowStream:
    """This rank's micro-batches: step s takes rows s*8 .. s*8+7, split over the ranks."""

    def __init__(self, rank: int, world: int, micro: int):
        self.rank, self.world, self.micro, self.next = rank, world, micro, 0

    def __iter__(self):
        per_rank = GLOBAL // self.world
        while True:
            step, j = divmod(self.next, per_rank // self.micro)
            first = step * GLOBAL + self.rank * per_rank + j * self.micro
            rows = [row(i) for i in range(first, first + self.micro)]
            self.next += 1
            yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = state["next"]


class Toy(Task):
    name = "toy"

    def build_model(self) -> nn.Module:
        model = nn.Linear(4, 1)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.5, -1.0, 0.25, 2.0]]))
            model.bias.fill_(0.1)
        return model

    def train_batches(self):
        rt = self.runtime
        return RowStream(rt.rank, rt.world_size, self.cfg.train.micro_batch_size)

    def tokens_in(self, batch) -> int:
        return int(batch["mask"].numel())

    def items_in(self, batch) -> int:
        return int(batch["mask"].sum())

    def loss(self, model, batch) -> torch.Tensor:
        errors = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2
        return (errors * batch["mask"]).sum()


def config(root: Path, name: str, micro: int, world: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "run": {"name": name, "output_dir": str(root)},
            "train": {"global_batch_size": GLOBAL, "micro_batch_size": micro,
                      "max_steps": STEPS, "precision": "fp32"},
            "optim": {"lr": 0.01, "weight_decay": 0.0, "grad_clip": None},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "dist": {"zero_stage": 0, "num_processes": world},
            "eval": {"every": None},
            "checkpoint": {"every": None, "resume": "none"},
            "metrics": {"wandb": False, "progress_bar": False, "log_every": 1},
        }
    )  # fmt: skip


def run(cfg: RunConfig) -> None:
    """Train STEPS steps; the main rank writes each step's gradients to grads.json."""
    runtime = build_runtime(cfg)
    try:
        assert runtime.world_size == cfg.dist.num_processes
        seen = train(cfg, runtime)
        if runtime.is_main:
            (cfg.run_dir / "grads.json").write_text(json.dumps(seen))
    finally:
        runtime.close()  # as `run_stage`: the trainer is out of scope, its engine collectable


def train(cfg: RunConfig, runtime) -> list:
    """Each step's all-reduced, accumulated gradients (ZeRO-0), as the optimizer sees them."""
    trainer = Trainer(cfg, runtime, Toy(cfg, runtime), default_callbacks(cfg))
    trainer.setup()
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.flatten().tolist() for p in trainer.engine.module.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.fit()
    return seen


def reference() -> tuple[list, list]:
    """Each step's item-mean gradient and loss, in plain torch on the step's 8 rows, with the
    same optimizer (AdamW, constant lr, no decay, no clipping)."""
    model = Toy.build_model(None)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.0)
    grads, losses = [], []
    for step in range(STEPS):
        rows = [row(i) for i in range(step * GLOBAL, (step + 1) * GLOBAL)]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        loss = Toy.loss(None, model, batch) / batch["mask"].sum()
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.flatten().tolist() for p in model.parameters()])
        losses.append(loss.item())
        opt.step()
    return grads, losses


def logged(cfg: RunConfig) -> list[float]:
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


SPLITS = {"micro2-accum4": (2, 1), "micro8-accum1": (8, 1), "2ranks-micro2-accum2": (2, 2)}


@pytest.mark.slow
@pytest.mark.distributed
def test_the_step_gradient_is_the_global_item_mean_for_any_split(tmp_path):
    cfgs = {name: config(tmp_path, name, micro, world) for name, (micro, world) in SPLITS.items()}
    for cfg in cfgs.values():
        if cfg.dist.num_processes == 1:
            run(cfg)
    torchrun_two("-m", __name__, str(tmp_path), timeout=300)
    grads, losses = reference()
    for name, cfg in cfgs.items():
        got = json.loads((cfg.run_dir / "grads.json").read_text())
        assert len(got) == STEPS, name
        for step in range(STEPS):
            for ours, theirs in zip(got[step], grads[step], strict=True):
                assert ours == pytest.approx(theirs, abs=1e-6), (name, step)
        assert logged(cfg) == pytest.approx(losses, abs=1e-6), name  # sum / items
        lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
        seen = json.loads(lines[-1])["train/tokens_seen"]
        assert seen == STEPS * GLOBAL * POSITIONS, name  # summed over the ranks


def test_a_mean_of_micro_batch_means_would_be_another_gradient():
    """The guard of the test above: with these rows, weighing micro-batches equally (the
    loss mean per micro-batch, averaged) gives a gradient far from the item mean."""
    grads, _ = reference()
    model = Toy.build_model(None)
    means = []
    for first in range(0, GLOBAL, 2):
        rows = [row(i) for i in range(first, first + 2)]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        means.append(Toy.loss(None, model, batch) / batch["mask"].sum())
    torch.stack(means).mean().backward()
    other = [p.grad.flatten().tolist() for p in model.parameters()]
    assert max(abs(a - b) for a, b in zip(other[0], grads[0][0], strict=True)) > 1e-2


def _worker(root: Path) -> None:
    for name, (micro, world) in SPLITS.items():
        if world == 2:
            run(config(root, name, micro, world))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

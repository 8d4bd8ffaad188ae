"""`init.keep_zeros`: the zeros of a pruned model stay exactly 0 through training, under
ZeRO-0 and ZeRO-2 (fp32 master copies), with weight decay; without it they move."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.callbacks import default_callbacks
from launcher.config import ConfigError, load_config
from launcher.loop import Trainer
from launcher.run_config import RunConfig
from launcher.runtime import build_runtime
from launcher.sparsity import keep_zeros

from .runs import torchrun_two
from .test_item_loss import Toy, config

START = [[0.5, 0.0, 0.25, 0.0]]


class Pruned(Toy):
    """The toy regression with half of its weights pruned to 0."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        with torch.no_grad():
            model.weight.copy_(torch.tensor(START))
        return model


def train(root: Path, name: str, zero_stage: int, keep: bool, world: int = 1) -> list[float]:
    cfg = config(root, name, 2, world).model_dump()
    cfg["dist"]["zero_stage"] = zero_stage
    cfg["optim"]["weight_decay"] = 0.1  # decoupled decay must keep 0 at 0
    cfg["train"]["max_steps"] = 4
    cfg["init"]["keep_zeros"] = keep
    cfg = RunConfig.model_validate(cfg)
    runtime = build_runtime(cfg)
    try:
        assert runtime.world_size == world  # gloo: not a silent world of 1
        trainer = Trainer(cfg, runtime, Pruned(cfg, runtime), default_callbacks(cfg))
        trainer.setup()
        trainer.fit()
        with torch.no_grad():  # the engine's weights, after the last step's master -> model copy
            weight = trainer.engine.module.weight.detach().flatten().tolist()
        if runtime.is_main:
            (cfg.run_dir / "weight.json").write_text(json.dumps(weight))
        return weight
    finally:
        runtime.close()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_pruned_weights_stay_exactly_zero_and_the_others_train(tmp_path, zero_stage) -> None:
    kept = train(tmp_path, f"keep{zero_stage}", zero_stage, keep=True)
    assert kept[1] == 0.0 and kept[3] == 0.0
    assert kept[0] != 0.5 and kept[2] != 0.25
    moved = train(tmp_path, f"free{zero_stage}", zero_stage, keep=False)
    assert moved[1] != 0.0 and moved[3] != 0.0  # the guard: without masks they train
    assert moved[0] == pytest.approx(kept[0], abs=0.05)  # the kept weights train alike


@pytest.mark.slow
@pytest.mark.distributed
def test_pruned_weights_stay_zero_on_two_ranks_under_zero_2(tmp_path) -> None:
    torchrun_two("-m", __name__, str(tmp_path), timeout=300)
    weight = json.loads((tmp_path / "two" / "weight.json").read_text())
    assert weight[1] == 0.0 and weight[3] == 0.0 and weight[0] != 0.5


def test_keep_zeros_counts_the_zeros_of_matrices_only() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0, :2] = 0
        model[0].bias.zero_()  # vectors are not masked (norms, biases)
    assert keep_zeros(model) == {"0.weight": 2}


def test_keep_zeros_needs_a_starting_model_and_no_zero_3(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("init:\n  keep_zeros: true\ndist:\n  zero_stage: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, tmp_path / "c.yaml")
    keys = {p.key: p.message for p in info.value.problems}
    assert "set init.path too" in keys["init.keep_zeros"] or "ZeRO-3" in keys["init.keep_zeros"]
    assert sum(k == "init.keep_zeros" for k in (p.key for p in info.value.problems)) == 2


if __name__ == "__main__":
    train(Path(sys.argv[1]), "two", 2, keep=True, world=2)

"""A checkpoint is a set of named states: a task adds its own (a per-rank tensor, a run-wide
JSON value, a bare object with state_dict) without touching persist; they come back on the
same world size, and as every saving rank's list on another one; a checkpoint that lacks a
state the task asks for is a clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from launcher.callbacks import default_callbacks
from launcher.checkpoint import CheckpointError
from launcher.loop import Trainer
from launcher.runtime import build_runtime
from launcher.states import RankTensors, RunJson

from .runs import torchrun_two
from .test_item_loss import Toy, config

STEPS = 2


class Tracker:
    """A per-rank tensor that follows this rank's data (so it differs by rank)."""

    def __init__(self, rank: int):
        self.rank, self.value, self.loaded = rank, torch.full((3,), float(rank)), None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, states: list[dict]) -> None:
        self.loaded = [s["value"].tolist() for s in states]
        self.value = states[self.rank % len(states)]["value"].clone()


class Coefficient:
    """A run-wide JSON value (a KL controller's coefficient)."""

    def __init__(self):
        self.kl = 0.5

    def state_dict(self) -> dict:
        return {"kl": self.kl}

    def load_state_dict(self, state: dict) -> None:
        self.kl = state["kl"]


class Counter:
    """A bare object with state_dict: this rank's JSON (each rank's list on load)."""

    def __init__(self):
        self.passes, self.loaded = 0, None

    def state_dict(self) -> dict:
        return {"passes": self.passes}

    def load_state_dict(self, states: list[dict]) -> None:
        self.loaded = [s["passes"] for s in states]


class WithStates(Toy):
    name = "toy-states"

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.tracker, self.coef, self.counter = Tracker(runtime.rank), Coefficient(), Counter()

    def train_step(self, step, batches) -> None:
        step.optimize(batches)
        self.tracker.value += torch.stack([b["x"].sum() for b in batches]).sum()
        self.coef.kl *= 1.5
        self.counter.passes += 1

    def states(self) -> dict:
        return {"tracker": RankTensors(self.tracker), "coef": RunJson(self.coef),
                "counter": self.counter}  # fmt: skip

    def snapshot(self) -> dict:
        return {"value": self.tracker.value.tolist(), "kl": self.coef.kl,
                "passes": self.counter.passes}  # fmt: skip


def cfg_for(root: Path, name: str, world: int, resume: str = "none"):
    cfg = config(root, name, 2, world).model_copy(deep=True)
    cfg.checkpoint.every, cfg.checkpoint.resume = STEPS, resume
    return cfg


def saved_folder(root: Path, name: str) -> Path:
    return root / name / "checkpoints" / f"step-{STEPS:08d}"


def train_or_load(cfg, task_cls=WithStates) -> dict:
    """Train (a fresh run) or only load the checkpoint (resume); returns what the task holds
    (and, after a load, what it was given)."""
    runtime = build_runtime(cfg)
    try:
        assert runtime.world_size == cfg.dist.num_processes
        task = task_cls(cfg, runtime)
        trainer = Trainer(cfg, runtime, task, default_callbacks(cfg))
        trainer.setup()
        if trainer.resumed_from is None:
            trainer.fit()
        else:
            trainer.metrics.close()  # fit() would have
        out = {"rank": runtime.rank, **task.snapshot()}
        out.update(tracker_loaded=task.tracker.loaded, counter_loaded=task.counter.loaded)
        return out
    finally:
        runtime.close()


def _worker(root: Path, name: str) -> None:
    """2 ranks: train and save (w2), or resume that checkpoint (w2-on-w2). One run per
    process: a second process group in the same torchrun job can reuse the first one's store
    keys and hang."""
    resume = "none" if name == "w2" else str(saved_folder(root, "w2"))
    got = train_or_load(cfg_for(root, name, 2, resume))
    (root / f"{name}-rank{got['rank']}.json").write_text(json.dumps(got))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_task_state_per_rank_resumes_on_the_same_and_on_another_world_size(tmp_path):
    for name in ("w2", "w2-on-w2"):
        torchrun_two("-m", __name__, str(tmp_path), name, timeout=300)
    saved = [json.loads((tmp_path / f"w2-rank{r}.json").read_text()) for r in range(2)]
    assert saved[0]["value"] != saved[1]["value"]  # the state differs by rank
    assert saved[0]["kl"] == saved[1]["kl"] == 0.5 * 1.5**STEPS
    for r in range(2):
        back = json.loads((tmp_path / f"w2-on-w2-rank{r}.json").read_text())
        assert back["value"] == saved[r]["value"]  # its own rank's value, exactly
        assert back["tracker_loaded"] == [s["value"] for s in saved]
        assert back["kl"] == saved[r]["kl"] and back["counter_loaded"] == [STEPS, STEPS]
    alone = train_or_load(cfg_for(tmp_path, "w2-on-w1", 1, str(saved_folder(tmp_path, "w2"))))
    assert alone["tracker_loaded"] == [s["value"] for s in saved]  # every saving rank's
    assert alone["value"] == saved[0]["value"] and alone["kl"] == saved[0]["kl"]
    assert alone["counter_loaded"] == [STEPS, STEPS]


def test_a_checkpoint_without_a_state_the_task_asks_for_is_a_clear_error(tmp_path):
    train_or_load(cfg_for(tmp_path, "plain", 1), task_cls=PlainWithSnapshot)
    folder = saved_folder(tmp_path, "plain")
    assert json.loads((folder / "rank-00000.json").read_text()).keys() == {"task", "metrics"}
    with pytest.raises(CheckpointError) as caught:
        train_or_load(cfg_for(tmp_path, "more", 1, str(folder)))
    message = str(caught.value)
    assert str(folder) in message and "'tracker'" in message and "WithStates.states()" in message


def test_an_optional_state_missing_from_the_checkpoint_keeps_its_default(tmp_path):
    train_or_load(cfg_for(tmp_path, "plain", 1), task_cls=PlainWithSnapshot)
    got = train_or_load(cfg_for(tmp_path, "more", 1, str(saved_folder(tmp_path, "plain"))),
                        task_cls=OptionalStates)  # fmt: skip
    assert got["value"] == [0.0, 0.0, 0.0] and got["kl"] == 0.5 and got["tracker_loaded"] is None


def test_a_task_state_named_like_one_of_the_loops_is_refused_at_setup(tmp_path):
    class Clash(WithStates):
        def states(self) -> dict:
            return {"rng": self.counter}

    with pytest.raises(ValueError, match=r"Clash.states\(\): 'rng' is one of the loop's own"):
        train_or_load(cfg_for(tmp_path, "clash", 1), task_cls=Clash)


class PlainWithSnapshot(WithStates):
    """The same task without its extra states (as an older version of it saved them)."""

    def states(self) -> dict:
        return {}


class OptionalStates(WithStates):
    def states(self) -> dict:
        return {"tracker": RankTensors(self.tracker, optional=True),
                "coef": RunJson(self.coef, optional=True)}  # fmt: skip


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])

"""Checkpoints of a model with frozen parameters (a LoRA base, a frozen backbone, layers not yet
unfrozen): they have no optimizer state (ZeRO-1/2 have no fragment mapping for them, ZeRO-3
no optimizer link), so a checkpoint holds their values only. Saved on one world size and ZeRO
stage, loaded on the other world size and another stage, everything must come back exactly:
trained values and moments, frozen values."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import persist
from launcher.callbacks import default_callbacks
from launcher.config import CONFIG_ROOT, load_config
from launcher.loop import Callback, Trainer
from launcher.runtime import build_runtime
from pretrain.config import PretrainConfig
from pretrain.prepare import prepare_inputs
from pretrain.task import PretrainTask

from .runs import torchrun_two

TINY = CONFIG_ROOT / "pretrain" / "tiny.yaml"
STEPS = 2
STAGES = {0: 3, 2: 0, 3: 2}  # saved under -> loaded under


class HalfFrozen(PretrainTask):
    """Pretraining with the embedding and the first half of the layers frozen."""

    def build_model(self):
        model = super().build_model()
        half = model.config.num_hidden_layers // 2
        frozen = ("model.embed_tokens.", *(f"model.layers.{i}." for i in range(half)))
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith(frozen))
        return model


def config(root: Path, name: str, world: int, stage: int, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        TINY,
        [
            f"run.output_dir={root}",
            f"run.name={name}",
            f"data.builtin.dir={root / 'corpus'}",
            "data.seq_len=32",
            "train.global_batch_size=4",
            "train.micro_batch_size=1",
            "data.num_workers=0",
            f"train.max_steps={STEPS}",
            "schedule.warmup_steps=1",
            "optim.weight_decay=0.1",
            "checkpoint.every=2",
            "checkpoint.resume=none",
            "eval.every=null",
            "metrics.wandb=false",
            "metrics.progress_bar=false",
            f"dist.zero_stage={stage}",
            f"dist.num_processes={world}",
            *extra,
        ],
    )


def folder(cfg: PretrainConfig) -> Path:
    return cfg.run_dir / "checkpoints" / f"step-{STEPS:08d}"


def runs(root: Path, saver: int) -> list[tuple[PretrainConfig, PretrainConfig]]:
    """(trained on ``saver`` ranks, loaded from it on the other world size) per stage."""
    other = 3 - saver
    out = []
    for stage, load_stage in STAGES.items():
        trained = config(root, f"w{saver}-z{stage}", saver, stage)
        loaded = config(
            root,
            f"w{saver}-z{stage}-on-w{other}-z{load_stage}",
            other,
            load_stage,
            f"checkpoint.resume={folder(trained)}",
        )
        out.append((trained, loaded))
    return out


def train_or_reload(cfg: PretrainConfig) -> None:
    """Train and save (a fresh run), or load the checkpoint and save it again at once."""
    gc.freeze()
    runtime = build_runtime(cfg)
    try:
        assert runtime.world_size == cfg.dist.num_processes
        trainer = Trainer(cfg, runtime, HalfFrozen(cfg, runtime), default_callbacks(cfg))
        trainer.setup()
        if trainer.resumed_from is None:
            trainer.fit()
        else:
            assert trainer.state.step == STEPS
            persist.save(trainer, "check")
            trainer.metrics.close()  # fit() would have: no metrics left active for others
    finally:
        runtime.close()
        gc.unfreeze()


def tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob(f"{kind}-*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_frozen_and_trained_state_survive_a_change_of_world_size_and_zero_stage(tmp_path):
    for trained, loaded in runs(tmp_path, 1) + runs(tmp_path, 2):
        prepare_inputs(trained)
        prepare_inputs(loaded)
    for trained, _ in runs(tmp_path, 1):  # 1 rank, in this process
        train_or_reload(trained)
    torchrun_two("-m", __name__, str(tmp_path))
    for _, loaded in runs(tmp_path, 2):  # the 2-rank checkpoints, back on 1 rank
        train_or_reload(loaded)
    for trained, loaded in runs(tmp_path, 1) + runs(tmp_path, 2):
        for kind in ("model", "optimizer"):
            saved, again = tensors(folder(trained), kind), tensors(folder(loaded), kind)
            assert saved.keys() == again.keys() and saved, (loaded.run.name, kind)
            worst = max((saved[k] - again[k]).abs().max().item() for k in saved)
            assert worst == 0.0, (loaded.run.name, kind)
        weights, moments = tensors(folder(trained), "model"), tensors(folder(trained), "optimizer")
        frozen = {k for k in weights if f"{k}::exp_avg" not in moments}
        assert len(frozen) == 1 + 9 * 2  # the embedding and 2 layers of 9 tensors each
        # frozen values are where they started: no weight decay, no update
        initial = dict(HalfFrozen(trained, None).build_model().named_parameters())
        assert all(torch.equal(weights[k], initial[k].detach()) for k in frozen)


def _worker(root: Path) -> None:
    """Under torchrun, 2 ranks: load every 1-rank checkpoint, then train the 2-rank runs."""
    import torch.distributed as dist

    # a second gloo group in the same torchrun worker hangs: every run keeps the first one
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    for _, loaded in runs(root, 1):
        train_or_reload(loaded)
    for trained, _ in runs(root, 2):
        train_or_reload(trained)
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


class StillGroup(PretrainTask):
    """The attention matrices in a group of their own at ``lr_scale`` 0, with weight decay."""

    def param_groups(self, model):
        still = [p for n, p in model.named_parameters() if "self_attn" in n and p.ndim == 2]
        ids = {id(p) for p in still}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in ids]}
            for g in super().param_groups(model)
        ]
        return [*groups, {"params": still, "weight_decay": 0.1, "lr_scale": 0.0, "name": "still"}]


class UnfreezeAt(Callback):
    """Gradual unfreezing: at ``step``, note the still group's values and give it lr_scale 1."""

    def __init__(self, step: int):
        self.step, self.values = step, None

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            model = trainer.engine.module
            self.values = {n: p.detach().clone() for n, p in model.named_parameters()}
            for group in trainer.optimizer.param_groups:
                if group.get("name") == "still":
                    group["lr_scale"] = 1.0


@pytest.mark.parametrize("stage", [0, 2])
def test_a_group_at_lr_scale_zero_is_bitwise_unchanged_by_adamw_with_weight_decay(tmp_path, stage):
    cfg = config(tmp_path, f"still-{stage}", 1, stage, "train.max_steps=7", "checkpoint.every=100")
    prepare_inputs(cfg)
    runtime = build_runtime(cfg)
    unfreeze = UnfreezeAt(5)
    try:
        callbacks = [*default_callbacks(cfg), unfreeze]
        trainer = Trainer(cfg, runtime, StillGroup(cfg, runtime), callbacks)
        trainer.setup()
        model = trainer.engine.module
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.fit()
        assert trainer.state.applied_steps == 7
        after = dict(model.named_parameters())
        still = [n for n in before if "self_attn" in n and before[n].ndim == 2]
        assert len(still) == 4 * 4  # q, k, v, o of 4 layers
        # 5 AdamW steps with weight decay 0.1 at lr_scale 0: not one bit changed
        assert all(torch.equal(before[n], unfreeze.values[n]) for n in still)
        moved = [n for n in before if n not in still]
        assert all(not torch.equal(before[n], unfreeze.values[n]) for n in moved)
        # lr_scale is read at every step: set to 1 at step 5, the group trains from step 6
        assert all(not torch.equal(unfreeze.values[n], after[n].detach()) for n in still)
    finally:
        runtime.close()

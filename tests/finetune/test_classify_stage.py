"""The classify stage on the shared loop, in-process on a random tiny parent (a few seconds a
run): the loss split into micro-batches, layer-wise rates and gradual unfreezing step by
step, a frozen backbone through a checkpoint and a mid-epoch resume, a BERT with CLS pooling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.classify import ClassifyTask, callbacks, classify
from launcher.cli import main as cli_main
from launcher.config import save_config
from launcher.loop import Callback, Trainer
from launcher.rundir import PREEMPTED
from launcher.runtime import build_runtime, seed_everything

from .classify_fixtures import config, labelled, make_bert, metrics, tiny_parent

__all__ = ["labelled", "tiny_parent"]  # fixtures

pytestmark = pytest.mark.slow


def train(cfg, *extra: Callback) -> tuple[Trainer, ClassifyTask]:
    """The stage's trainer, with ``extra`` callbacks after its own (no export)."""
    runtime = build_runtime(cfg)
    seed_everything(cfg.run.seed, runtime.rank)
    try:
        task = ClassifyTask(cfg, runtime)
        listed, _ = callbacks(cfg)
        trainer = Trainer(cfg, runtime, task, [*listed, *extra])
        trainer.setup()
        trainer.fit()
        return trainer, task
    finally:
        runtime.close()


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def test_micro_2_by_accumulation_2_equals_micro_4(tmp_path, tiny_parent, labelled):
    runs = {}
    for micro in (2, 4):
        cfg = config(
            tmp_path, tiny_parent, labelled, f"micro{micro}",
            class_weights={"alpha": 2.0, "gamma": 0.5}, label_smoothing=0.1,
        )  # fmt: skip
        cfg.train.epochs, cfg.train.max_steps = None, 3
        cfg.train.global_batch_size, cfg.train.micro_batch_size = 4, micro
        cfg.eval.every = None
        trainer, _ = train(cfg)
        assert trainer.accum == 4 // micro
        runs[micro] = losses(cfg.run_dir), trainer.engine.module.score.weight.detach().clone()
    (a, head_a), (b, head_b) = runs[2], runs[4]
    assert sorted(a) == [1, 2, 3]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6
    assert (head_a - head_b).abs().max() < 1e-6


class Changes(Callback):
    """At the end of each epoch: the parameters that changed in it, and every group's lr."""

    def __init__(self):
        self.changed: list[set[str]] = []
        self.lrs: list[list[tuple[float, list[str]]]] = []
        self.last: dict[str, torch.Tensor] | None = None

    def on_step_end(self, trainer: Trainer) -> None:
        model = trainer.engine.module
        names = {id(p): n for n, p in model.named_parameters()}
        if self.last is None:
            self.last = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.lrs.append(
            [(g["lr"], [names[id(p)] for p in g["params"]]) for g in trainer.optimizer.param_groups]
        )
        if trainer.state.step % trainer.steps_per_epoch == 0:
            now = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.changed.append({n for n in now if not torch.equal(now[n], self.last[n])})
            self.last = now


def test_layer_rates_and_gradual_unfreezing_change_exactly_the_expected_layers(
    tmp_path, tiny_parent, labelled
):
    cfg = config(tmp_path, tiny_parent, labelled, "unfreeze", layer_decay=0.7, unfreeze_every=1)
    cfg.train.epochs = 3
    probe = Changes()
    trainer, _ = train(cfg, probe)
    spe = trainer.steps_per_epoch
    assert spe == 15 and trainer.state.step == 45

    def depth(name: str) -> int:  # the tiny parent: 2 blocks
        if name.startswith("model.layers."):
            return 2 - int(name.split(".")[2])
        return 3 if "embed_tokens" in name else 0

    names = [n for n, _ in trainer.engine.module.named_parameters()]
    for epoch, changed in enumerate(probe.changed):
        assert changed == {n for n in names if depth(n) <= epoch}, epoch
    for step, groups in enumerate(probe.lrs, start=1):
        epoch = (step - 1) // spe
        for lr, members in groups:
            [d] = {depth(n) for n in members}
            expected = cfg.optim.lr * 0.7**d if d <= epoch else 0.0
            assert abs(lr - expected) < 1e-12, (step, members, lr, expected)


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("score", "lm_head"))}


def test_frozen_backbone_stays_equal_through_a_stop_and_a_mid_epoch_resume(
    tmp_path, tiny_parent, labelled
):
    whole = config(tmp_path, tiny_parent, labelled, "whole", freeze="backbone")
    classify(whole)
    split = config(tmp_path, tiny_parent, labelled, "split", freeze="backbone")
    split.train.stop_after = 7  # mid-epoch: 15 steps an epoch
    classify(split)
    assert (split.run_dir / PREEMPTED).exists() and not (split.run_dir / "hf").exists()
    assert not (split.run_dir / "report.json").exists()
    split.train.stop_after = None
    classify(split)
    a, b = losses(whole.run_dir), losses(split.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert max(abs(a[s] - b[s]) for s in range(8, 31)) < 1e-6
    parent = load_file(tiny_parent / "model.safetensors")
    for run in (whole, split):
        exported = load_file(run.run_dir / "hf" / "model.safetensors")
        for name, value in backbone(parent).items():
            assert torch.equal(exported[name], value), name
        assert not torch.equal(exported["score.weight"], torch.zeros_like(exported["score.weight"]))
    assert not (split.run_dir / PREEMPTED).exists()
    report = (split.run_dir / "report.json").read_text()
    assert '"early_stopped_after_epoch": null' in report
    # `kiln export` of the exported checkpoint gives the same model, without the loop
    lineage = json.loads((split.run_dir / "hf" / "kiln.json").read_text())
    folder = lineage["weights_from"]
    if folder == "the last step":
        folder = str(split.run_dir / "checkpoints" / "step-00000030")
    out = tmp_path / "from-checkpoint"
    assert cli_main(["export", folder, "--out", str(out), "--dtype", "fp32"]) == 0
    again = load_file(out / "model.safetensors")
    exported = load_file(split.run_dir / "hf" / "model.safetensors")
    assert sorted(again) == sorted(exported)
    assert all(torch.equal(again[k], exported[k]) for k in again)
    assert json.loads((out / "config.json").read_text())["id2label"]["2"] == "gamma"


def test_a_tiny_bert_trains_with_cls_pooling(tmp_path, labelled):
    parent = make_bert(tmp_path / "bert")
    cfg = config(tmp_path, parent, labelled, "bert")
    cfg.tokenizer.eos_token = "[SEP]"
    cfg.train.epochs, cfg.optim.lr = 3, 1e-2  # a random BERT (0.02 init) needs a higher rate
    trainer, task = train(cfg)
    model = trainer.engine.module
    assert type(model).__name__ == "BertForSequenceClassification"
    first = task.sets.splits["train"][0].tokens
    assert first[0] == task.tokenizer.backend.token_to_id("[CLS]")
    assert first[-1] == task.tokenizer.backend.token_to_id("[SEP]")
    evaluations = [m for m in metrics(cfg.run_dir) if "eval/accuracy" in m]
    assert len(evaluations) == 3
    assert evaluations[-1]["eval/accuracy"] >= 0.9, evaluations


def test_lora_trains_adapters_and_head_and_exports_a_merged_plain_model(
    tmp_path, tiny_parent, labelled
):
    from transformers import AutoModelForSequenceClassification

    cfg = config(tmp_path, tiny_parent, labelled, "lora", peft={"method": "lora", "r": 4})
    cfg.optim.lr = 1e-2
    save_config(cfg, cfg.run_dir)  # as the stage does: checkpoints carry it, for `kiln export`
    trainer, task = train(cfg)
    model = trainer.engine.module
    parent = load_file(tiny_parent / "model.safetensors")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "modules_to_save" in n for n in trained)
    base = model.get_base_model().state_dict()
    for name, value in backbone(parent).items():  # the backbone under the adapters: unchanged
        assert torch.equal(base[name.replace(".weight", ".base_layer.weight")]
                           if name.replace(".weight", ".base_layer.weight") in base
                           else base[name], value), name  # fmt: skip
    out = tmp_path / "exported"
    task.export(model, None, out)
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = next(iter(task.stream))
    model.eval()
    with torch.no_grad():
        ours = task.logits(model, batch)
        theirs = task.logits(plain, batch)
    assert (ours - theirs).abs().max() < 1e-4
    again = tmp_path / "from-checkpoint"
    assert cli_main(["export", str(cfg.run_dir / "checkpoints"), "--out", str(again),
                     "--dtype", "fp32"]) == 0  # fmt: skip
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    steps = losses(cfg.run_dir)  # it learns (a random backbone: no accuracy to expect)
    first, last = (sum(steps[s] for s in range(a, a + 15)) / 15 for a in (1, 16))
    assert last < 0.8 * first, (first, last)

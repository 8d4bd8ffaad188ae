"""The training loop in one process: accumulation, skipped steps, bits per byte."""

from __future__ import annotations

import json
import math
import shutil
from typing import ClassVar

import pytest
import torch
from transformers import LlamaForCausalLM

from launcher.callbacks import default_callbacks
from launcher.config import CONFIG_ROOT, load_config
from launcher.data.documents import read_documents
from launcher.data.sources import is_held_out, resolve_corpus
from launcher.data.validation import IGNORE
from launcher.loop import Callback, Trainer, TrainingError, TrainState
from launcher.optim import lr_factor
from launcher.runtime import build_runtime
from pretrain.config import PretrainConfig
from pretrain.prepare import prepare_inputs
from pretrain.task import PretrainTask

TINY = CONFIG_ROOT / "pretrain" / "tiny.yaml"


def web_config(root, shared_data, *overrides: str) -> PretrainConfig:
    web = shared_data / "web"
    sources = f"[{{paths: ['{web}/*.jsonl.gz', '{web}/documents-000.json.gz']}}]"
    return load_config(
        PretrainConfig,
        TINY,
        [
            f"run.output_dir={root}",
            "data.builtin=null",
            f"data.sources={sources}",
            "data.seq_len=64",
            "data.num_workers=0",
            "data.validation.fraction=0.1",
            "tokenizer.vocab_size=1024",
            "metrics.wandb=false",
            "metrics.progress_bar=false",
            "metrics.log_every=1",
            "eval.every=null",
            "train.max_steps=3",
            "schedule.warmup_steps=1",
            "checkpoint.resume=none",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):  # the tokenizer is trained once per run directory
        prepare_inputs(web_config(root, shared_data, f"run.name={name}"))
    return root


class Snapshots(Callback):
    """The parameters after every step."""

    def __init__(self):
        self.params: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, trainer):
        module = trainer.engine.module
        self.params.append({k: v.detach().clone() for k, v in module.named_parameters()})


def train(cfg, task_cls=PretrainTask, extra: list | None = None):
    (cfg.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    runtime = build_runtime(cfg)
    try:
        task = task_cls(cfg, runtime)
        trainer = Trainer(cfg, runtime, task, [*default_callbacks(cfg), *(extra or [])])
        trainer.setup()
        trainer.fit()
        return trainer, task
    finally:
        runtime.close()


def losses(cfg) -> list[float]:
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


@pytest.mark.slow
def test_micro_batch_2_times_4_accumulation_equals_micro_batch_8(prepared, shared_data):
    runs = {}
    for name, micro in (("a", 2), ("b", 8)):
        cfg = web_config(
            prepared,
            shared_data,
            f"run.name={name}",
            "train.global_batch_size=8",
            f"train.micro_batch_size={micro}",
        )
        snaps = Snapshots()
        train(cfg, extra=[snaps])
        runs[name] = (losses(cfg), snaps.params[-1])
    (loss_a, params_a), (loss_b, params_b) = runs["a"], runs["b"]
    assert len(loss_a) == len(loss_b) == 3
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    # Summation order differs (4 micro-batch means vs one mean: gradients agree to ~1e-7
    # relative), and Adam's early updates are ~lr * g / |g|, which turns that rounding into up
    # to a few 1e-6 where a gradient is near zero. Bound: 1% of the largest possible movement
    # over 3 steps at lr 2e-3, and on average far less.
    for key in params_a:
        diff = (params_a[key] - params_b[key]).abs()
        assert diff.max() < 0.01 * 3 * 2e-3, key
        assert diff.mean() < 1e-7, key


@pytest.mark.slow
def test_zero0_alone_skips_the_all_reduce_and_trains_like_zero2(prepared, shared_data):
    """One rank, ZeRO-0: the loop turns off DeepSpeed's gradient all-reduce (nothing to
    reduce); with accumulation over 2 micro-batches it must still train exactly like ZeRO-2."""
    runs = {}
    for name, stage in (("a", 0), ("b", 2)):
        cfg = web_config(
            prepared,
            shared_data,
            f"run.name={name}",
            f"dist.zero_stage={stage}",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
        )
        snaps = Snapshots()
        trainer, _ = train(cfg, extra=[snaps])
        assert trainer.engine.enable_backward_allreduce is (stage != 0)
        runs[name] = (losses(cfg), snaps.params[-1])
    (loss_a, params_a), (loss_b, params_b) = runs["a"], runs["b"]
    assert len(loss_a) == 3
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for key in params_a:
        assert (params_a[key] - params_b[key]).abs().max() < 1e-5, key


@pytest.mark.slow
def test_zero3_keeps_weight_decay_on_matrices(prepared, shared_data):
    """ZeRO-3 builds the model inside zero.Init, where every parameter is an empty 1-D
    placeholder: the decay / no-decay split must use the real shapes."""
    cfg = web_config(prepared, shared_data, "run.name=a", "dist.zero_stage=3")
    runtime = build_runtime(cfg)
    try:
        task = PretrainTask(cfg, runtime)
        model = task.build_model()
        groups = task.param_groups(model)
        assert [g["name"] for g in groups] == ["decay", "no_decay"]
        assert groups[0]["weight_decay"] == cfg.optim.weight_decay > 0
        assert all(p.numel() == 0 and len(p.ds_shape) == 2 for p in groups[0]["params"])
        # 4 attention + 3 MLP matrices per layer; the tied embedding has no decay
        assert len(groups[0]["params"]) == 7 * cfg.model.n_layers
    finally:
        runtime.close()


class PoisonedTask(PretrainTask):
    """The loss of every micro-batch of the steps in ``bad_steps`` is NaN."""

    bad_steps: ClassVar[set[int]] = {1}

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.calls = 0

    def loss(self, model, batch):
        step = self.calls // self.cfg.grad_accum_steps
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if step in self.bad_steps else loss


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_a_nan_loss_skips_the_step_leaving_parameters_unchanged(prepared, shared_data, stage):
    cfg = web_config(
        prepared,
        shared_data,
        "run.name=a",
        f"dist.zero_stage={stage}",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
    )
    snaps = Snapshots()
    trainer, _ = train(cfg, PoisonedTask, [snaps])
    before, during, after = snaps.params
    for key in before:
        assert torch.equal(before[key], during[key]), key  # step 2 changed nothing
    assert any(not torch.equal(during[k], after[k]) for k in during)  # step 3 trained again
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["train/skipped_steps"] for x in lines if "train/loss" in x] == [0.0, 1.0, 0.0]
    assert trainer.state.skipped_steps == 1
    # The schedule follows applied steps (Megatron): step 3 gets the LR the skipped step had.
    peak = [cfg.optim.lr * lr_factor(cfg.schedule, i, 3) for i in range(3)]
    assert peak[1] != peak[2]
    lrs = [x["train/lr"] for x in lines if "train/loss" in x]
    assert lrs == pytest.approx([peak[0], peak[1], peak[1]], rel=1e-6)
    assert trainer.state.applied_steps == 2


def test_a_checkpoint_without_applied_steps_resumes_the_schedule_at_step_minus_skips():
    state = TrainState()
    state.load_state_dict({"step": 10, "tokens": 640, "skipped_steps": 3, "consecutive_skips": 0})
    assert (state.step, state.applied_steps) == (10, 7)
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state


@pytest.mark.slow
def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_a_clear_message(
    prepared, shared_data
):
    class AlwaysNaN(PoisonedTask):
        bad_steps: ClassVar[set[int]] = {1, 2, 3, 4}

    cfg = web_config(
        prepared, shared_data, "run.name=a", "train.max_steps=6", "train.max_consecutive_skips=2"
    )
    with pytest.raises(TrainingError, match=r"2 optimizer steps in a row .* step 3\)"):
        train(cfg, AlwaysNaN)


@pytest.mark.slow
def test_bits_per_byte_equals_an_independent_count_with_transformers(prepared, shared_data):
    cfg = web_config(prepared, shared_data, "run.name=a", "train.max_steps=2")
    trainer, task = train(cfg)
    reported = trainer.last_logged["eval/bits_per_byte"]
    model: LlamaForCausalLM = trainer.engine.module.eval()
    val = task.validation
    nats = 0.0
    with torch.no_grad():
        for ids, targets in zip(val.input_ids, val.targets, strict=True):
            valid = targets != IGNORE
            n = int(valid.sum())
            window = torch.tensor([*ids[:n], targets[n - 1]])[None]
            # transformers shifts labels itself: the mean over n predicted tokens, times n
            nats += model(input_ids=window, labels=window).loss.item() * n
    text_bytes = 0
    for source in resolve_corpus(cfg.data).sources:
        for path in source.files:
            held = [d for d in read_documents(path) if is_held_out(d, cfg.data.validation.fraction)]
            text_bytes += sum(len(d.text.encode("utf-8")) for d in held)
    assert val.text_bytes == text_bytes
    assert reported == pytest.approx(nats / text_bytes / math.log(2), rel=1e-5)


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses(prepared, shared_data):
    runs = []
    for flag in ("false", "true"):
        cfg = web_config(
            prepared,
            shared_data,
            "run.name=a",
            "train.max_steps=2",
            f"train.activation_checkpointing={flag}",
        )
        train(cfg)
        runs.append(losses(cfg))
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


@pytest.mark.slow
def test_a_save_now_file_gives_a_checkpoint_at_the_next_step(prepared, shared_data):
    cfg = web_config(prepared, shared_data, "run.name=b", "checkpoint.every=100")
    shutil.rmtree(cfg.run_dir / "checkpoints", ignore_errors=True)
    (cfg.run_dir / "SAVE_NOW").touch()
    train(cfg)
    saved = sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("step-*"))
    assert saved == ["step-00000001", "step-00000003"]  # on demand, then at the end
    assert not (cfg.run_dir / "SAVE_NOW").exists()

"""A task that uses a frozen companion model (a reference, as in DPO/PPO) and generates inside
its step (as in PPO/GRPO rollouts): under ZeRO-3 on 2 ranks, with prompts of different
lengths on each rank (so the ranks' generations differ), it trains like under ZeRO-0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launcher.callbacks import default_callbacks
from launcher.loop import Trainer
from launcher.run_config import RunConfig
from launcher.runtime import build_runtime
from launcher.task import Task
from pretrain.model import ModelConfig, build_model

from .runs import torchrun_two

SMALL = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_size=64, max_seq_len=32
)
PROMPT = 8  # prompts are 3..8 tokens, left-padded to 8
NEW = 4  # tokens generated per prompt
STEPS = 3


class GenerateAndCompare(Task):
    """Generate NEW tokens greedily from each prompt with the trained model, then train it on
    its own continuation, kept near a frozen reference (negative log-likelihood + 0.1 x KL)."""

    name = "companion"

    def build_model(self):
        return build_model(SMALL, seed=1, pad_token_id=0, eos_token_id=None, bos_token_id=None)

    def on_engine(self, engine) -> None:
        reference = build_model(SMALL, seed=2, pad_token_id=0, eos_token_id=None, bos_token_id=None)
        self.reference = self.runtime.prepare_frozen(reference)

    def train_batches(self):
        rank, micro, n = self.runtime.rank, self.cfg.train.micro_batch_size, 0
        while True:
            g = torch.Generator().manual_seed(100 * n + rank)
            n += 1
            lengths = torch.randint(3, PROMPT + 1, (micro,), generator=g)
            ids = torch.zeros(micro, PROMPT, dtype=torch.long)
            mask = torch.zeros(micro, PROMPT, dtype=torch.long)
            for i, length in enumerate(lengths.tolist()):
                ids[i, PROMPT - length :] = torch.randint(1, 64, (length,), generator=g)
                mask[i, PROMPT - length :] = 1
            yield {"input_ids": ids, "attention_mask": mask}

    def loss(self, model, batch):
        with self.runtime.generating(model) as module:
            out = module.generate(
                **batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
            )
        mask = torch.cat([batch["attention_mask"], torch.ones_like(out[:, PROMPT:])], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"input_ids": out, "attention_mask": mask, "position_ids": positions}
        logits = model(**kwargs).logits[:, PROMPT - 1 : -1].float()
        with torch.no_grad():
            ref = self.reference(**kwargs).logits[:, PROMPT - 1 : -1].float()
        logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
        nll = -logp.gather(-1, out[:, PROMPT:, None]).mean()
        kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
        return nll + 0.1 * kl


def config(root: Path, name: str, stage: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "run": {"name": name, "output_dir": str(root)},
            "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": STEPS,
                      "precision": "fp32"},
            "optim": {"lr": 0.01},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "dist": {"zero_stage": stage, "num_processes": 2},
            "eval": {"every": None},
            "checkpoint": {"every": None, "resume": "none"},
            "metrics": {"wandb": False, "progress_bar": False, "log_every": 1},
        }
    )  # fmt: skip


def losses(cfg: RunConfig) -> list[float]:
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


@pytest.mark.slow
@pytest.mark.distributed
def test_generation_and_a_frozen_reference_under_zero3_train_like_zero0(tmp_path):
    started = time.monotonic()
    torchrun_two("-m", __name__, str(tmp_path), timeout=300)
    elapsed = json.loads((tmp_path / "zero3-seconds.json").read_text())
    assert elapsed < 60, elapsed
    zero0, zero3 = losses(config(tmp_path, "zero0", 0)), losses(config(tmp_path, "zero3", 3))
    assert len(zero0) == len(zero3) == STEPS
    assert zero3 == pytest.approx(zero0, abs=1e-5)
    assert time.monotonic() - started < 300


def _worker(root: Path) -> None:
    import torch.distributed as dist

    # a second gloo group in the same torchrun worker hangs: every run keeps the first one
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    for stage in (0, 3):
        cfg = config(root, f"zero{stage}", stage)
        runtime = build_runtime(cfg)
        try:
            assert runtime.world_size == 2
            started = time.monotonic()
            task = GenerateAndCompare(cfg, runtime)
            trainer = Trainer(cfg, runtime, task, default_callbacks(cfg))
            trainer.setup()
            if stage == 3:  # both models sharded: no rank holds a whole weight matrix
                assert type(task.reference).__name__ == "DeepSpeedEngine"
                assert all(p.numel() == 0 for p in task.reference.module.parameters())
            trainer.fit()
            if stage == 3 and runtime.is_main:
                seconds = time.monotonic() - started
                (root / "zero3-seconds.json").write_text(json.dumps(seconds))
        finally:
            runtime.close()
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

"""The ``reward`` stage: a Bradley-Terry reward model from preference pairs, on the shared loop.

The parent (``init.path``, an SFT or pretraining export) gets a one-output score head
(``reward_model``); pairs (``reward_data``) are scored in one forward over chosen and rejected
stacked, and a micro-batch's loss is the SUM over its pairs of
``-log sigmoid(r_c - r_r - margin) + eta (r_c + r_r)^2`` with the pairs as its items, so the
loop's global normalisation makes a step's loss the mean over all its pairs (TRL's form).
The export is a plain ``AutoModelForSequenceClassification`` directory with ``pad_token_id``
and ``kiln_reward: {mean, std}`` (the exported model's rewards on the validation pairs, else
the training pairs) in ``config.json``, for PPO's reward normalisation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import AutoConfig

from finetune.chat import chosen_template
from finetune.classify_data import load_tokenizer, require_distinct_pad
from finetune.common import PairBatches, announce_data, record_counters, size
from finetune.reward_config import RewardConfig
from finetune.reward_data import PairEncoder, read_pair_sets
from finetune.reward_model import (
    load_reward_model,
    metrics_of,
    pair_losses,
    plain_model,
    rewards,
    tally,
)
from finetune.sft import save_tokenizer
from launcher.checkpoint import read_manifest, verify
from launcher.data.batches import ExampleStream, evaluation_batches
from launcher.data.examples import Example
from launcher.data.tokenizer import TextTokenizer
from launcher.metrics import record
from launcher.runner import run_stage
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.task import Task

log = logging.getLogger(__name__)
STATS_PAIRS = 2048
"""At most this many pairs score the exported model for ``kiln_reward``."""


class RewardTask(PairBatches, Task):
    name = "reward"
    cfg: RewardConfig

    def __init__(self, cfg: RewardConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.parent = Path(cfg.init.path)
        self.tokenizer = load_tokenizer(cfg)
        require_distinct_pad(self.tokenizer)
        self.template = chosen_template(cfg.chat.template, self.tokenizer, self.parent)
        encoder = PairEncoder(
            self.tokenizer, cfg.data.max_seq_len, cfg.reward.margin_field, self.template
        )
        self.train_set, self.validation = read_pair_sets(cfg.data, encoder, cfg.run.seed)
        self.stream = ExampleStream(
            self.train_set.examples,
            batch_size=cfg.train.micro_batch_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=cfg.run.seed,
            pad_id=self.tokenizer.pad_id,
            shuffle=cfg.data.shuffle,
        )
        self.model_config = None
        if runtime.is_main:
            what = f"{len(self.train_set)} training pairs, {size(self.validation)} validation"
            announce_data(self.train_set, what)

    # ------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        model, head = load_reward_model(
            self.parent, self.tokenizer.pad_id, self.cfg.run.seed, self.cfg.reward.head_init_std
        )
        self.model_config = model.config
        if self.cfg.peft is not None:
            from finetune.classify_peft import wrap_peft

            model = wrap_peft(model, self.cfg.peft, head, self.cfg.run.seed)
        return model

    # ---------------------------------------------------------------------------- batches

    # train_batches, steps_per_epoch, tokens_per_sequence, tokens_in, items_in: PairBatches

    # ------------------------------------------------------------------------------- loss

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rc, rr = rewards(model, batch, self.tokenizer.pad_id)
        losses = pair_losses(rc, rr, batch["margin"], self.cfg.reward.center_coef)
        with torch.no_grad():
            record("train/accuracy", (rc > rr).float().mean())
            record("train/margin", (rc - rr).mean())
            record("reward/chosen_mean", rc.mean())
            record("reward/rejected_mean", rr.mean())
        return losses.sum()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss, accuracy (a tie is wrong), margin, reward means and std over the whole
        validation set; every rank runs the same number of batches."""
        if self.validation is None:
            return {}
        rt = self.runtime
        batches = self.validation_batches(self.validation.examples, self.tokenizer.pad_id)
        sums = tally(model, batches, self.tokenizer.pad_id, self.cfg.reward.center_coef, rt.device)
        rt.all_reduce(sums)
        return metrics_of(sums)

    def on_log(self) -> None:
        record_counters(self.train_set)

    def summary(self, results: dict[str, float], state) -> list[str]:
        accuracy = results.get("eval/accuracy")
        tail = f"; validation accuracy {accuracy:.4f}" if accuracy is not None else ""
        return [f"trained {state.step} steps{tail}"]

    # ------------------------------------------------------------------ export and state

    def export(self, model: nn.Module, state_dict: dict | None, out: Path) -> None:
        weights = state_dict if state_dict is not None else model.state_dict()
        plain = plain_model(self.model_config, weights, self.cfg.peft)
        examples = self.validation or self.train_set
        write_export(plain, examples.examples, self.tokenizer, self.template, self.cfg, out)

    def save_extras(self, folder: Path) -> list[str]:
        """The tokenizer and the sequence-classification config.json: `kiln export` needs no
        parent."""
        save_tokenizer(self.tokenizer, folder / "tokenizer", self.template, None)
        (folder / "model").mkdir()
        self.model_config.to_json_file(folder / "model" / "config.json")
        files = [p for sub in ("tokenizer", "model") for p in (folder / sub).rglob("*")]
        return sorted(str(p.relative_to(folder)) for p in files if p.is_file())

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict([s["data"] for s in states])


def write_export(
    model: nn.Module,
    examples: list[Example],
    tokenizer: TextTokenizer,
    template: str | None,
    cfg: RewardConfig,
    out: Path,
    dtype: torch.dtype = torch.float32,
) -> None:
    """``model`` (plain, CPU) to ``out`` with ``kiln_reward`` = the mean and std of its rewards
    on ``examples`` (chosen and rejected alike), and the tokenizer."""
    batches = evaluation_batches(
        examples[:STATS_PAIRS], rank=0, world_size=1, batch_size=8, pad_id=tokenizer.pad_id
    )
    stats = metrics_of(tally(model, batches, tokenizer.pad_id, 0.0, torch.device("cpu")), "")
    model.config.kiln_reward = {
        "mean": stats["reward_mean"],
        "std": stats["reward_std"],
        "pairs": int(stats["pairs"]),
    }
    model.config.pad_token_id = tokenizer.pad_id
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out, template, cfg.data.max_seq_len)


def export_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """`kiln export` of a reward checkpoint without its parent: verified first
    (``CheckpointError``), the model rebuilt from the saved config.json; ``kiln_reward`` from
    the validation pairs of the run's config (else its training pairs)."""
    from safetensors.torch import load_file

    verify(folder, read_manifest(folder))
    cfg = RewardConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(str(path)))
    model = plain_model(AutoConfig.from_pretrained(folder / "model"), weights, cfg.peft)
    tokenizer = TextTokenizer.load(folder / "tokenizer")
    template = tokenizer.chat_template if cfg.chat.template == "tokenizer" else None
    encoder = PairEncoder(tokenizer, cfg.data.max_seq_len, cfg.reward.margin_field, template)
    train, validation = read_pair_sets(cfg.data, encoder, cfg.run.seed)
    examples = (validation or train).examples
    write_export(model, examples, tokenizer, template, cfg, out, dtype)
    return out


def reward(cfg: RewardConfig) -> dict[str, float]:
    """Train a reward model from ``init.path`` on ``data``, export ``runs/<name>/hf/``."""
    return run_stage(cfg, RewardTask)


STAGE = Stage(
    name="reward",
    config_class=RewardConfig,
    run=reward,
    help="reward model from preference pairs (Bradley-Terry; full or LoRA)",
    distributed=True,
    export=export_checkpoint,
)

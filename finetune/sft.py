"""The `sft` stage: supervised fine-tuning of a parent model on chats or prompt/completion
pairs, on the shared loop (epochs, item-normalised loss, checkpoints, export).

The loss of a micro-batch is the *sum* of the next-token NLL over its trained tokens
(assistant content and end of turn, or the completion and EOS), with that count as its items:
the loop divides by the step's global count, so a micro-batch of 3 targets weighs 3/3000 of
one of 3000, whatever the accumulation and the world size (TRL's ``num_items_in_batch``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from finetune.chat import DEFAULT_TEMPLATE, chosen_template
from finetune.common import announce_data, record_counters, size
from finetune.config import PeftSection, SFTConfig
from finetune.data import SFTEncoder, read_sft_sets
from finetune.peft_setup import (
    checkpoint_merge_refusal,
    export_model,
    load_parent,
    trainable_parameters,
)
from launcher.checkpoint import read_manifest, verify
from launcher.data.batches import ExampleStream
from launcher.data.packing import IGNORE
from launcher.data.tokenizer import TextTokenizer
from launcher.forward import forward_logits
from launcher.runner import run_stage
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.task import Task

log = logging.getLogger(__name__)
SAMPLES = 4
"""Greedy generations per evaluation, written to samples.jsonl."""
SAMPLE_TOKENS = 32


class SFTTask(Task):
    name = "sft"
    cfg: SFTConfig

    def __init__(self, cfg: SFTConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.parent = Path(cfg.init.path)
        self.tokenizer = TextTokenizer.load(self.parent)
        self.template = chosen_template(cfg.chat.template, self.tokenizer, self.parent)
        encoder = SFTEncoder(self.tokenizer, cfg.data.max_seq_len, self.template)
        self.train_set, self.validation = read_sft_sets(cfg.data, encoder, cfg.run.seed)
        if runtime.is_main:
            self._describe()
        self.stream = ExampleStream(
            self.train_set.examples,
            batch_size=cfg.train.micro_batch_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=cfg.run.seed,
            pad_id=self.tokenizer.pad_id,
            shuffle=cfg.data.shuffle,
            pack_len=cfg.data.max_seq_len if cfg.data.packing else None,
        )
        self.trainable = (0, 0)
        self.evaluations = 0

    def _describe(self) -> None:
        print(f"[kiln] run directory   {self.cfg.run_dir}/")
        trained = sum(e.targets for e in self.train_set.examples)
        announce_data(
            self.train_set,
            f"{len(self.train_set)} training examples ({trained} trained tokens), "
            f"{size(self.validation)} validation",
        )

    # ------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        model = load_parent(self.parent, self.cfg.peft, self.cfg.run.seed)
        self.trainable = trainable_parameters(model)
        if self.runtime.is_main:
            trained, total = self.trainable
            print(f"[kiln] parameters      {trained:,} trained of {total:,}")
        return model

    # ---------------------------------------------------------------------------- batches

    def train_batches(self) -> ExampleStream:
        return self.stream

    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch(self.cfg.grad_accum_steps)

    def tokens_per_sequence(self) -> int:
        return self.cfg.data.max_seq_len

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != IGNORE).sum())

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        if "segment_ids" in batch:
            return int((batch["segment_ids"] > 0).sum())
        return int(batch["attention_mask"].sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_nll(model, batch, reduction="sum")

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Assistant-token loss over the whole validation set (every rank the same number of
        batches), and a few greedy generations to samples.jsonl."""
        if self.validation is None:
            return {}
        rt = self.runtime
        batches = self.validation_batches(self.validation.examples, self.tokenizer.pad_id)
        totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
        for batch in batches:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            nats = token_nll(model, batch, reduction="sum")
            totals += torch.stack([nats.double(), (batch["targets"] != IGNORE).sum().double()])
        rt.all_reduce(totals)
        nats, tokens = totals.tolist()
        self._write_samples(model)
        scores = self._exact_match(model) if self.cfg.generation.exact_match else {}
        return {"eval/loss": nats / max(tokens, 1.0), "eval/target_tokens": tokens, **scores}

    def _answer(self, module: nn.Module, example, max_new: int) -> tuple[int, list[int]]:
        """(where the first trained token is, the greedy answer's tokens after it)."""
        tok, device = self.tokenizer, self.runtime.device
        first = int(example.loss_mask.argmax())
        prompt = torch.from_numpy(example.tokens[None, :first].astype("int64")).to(device)
        out = module.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
        return first, out[0, first:].tolist()

    def _exact_match(self, model: nn.Module) -> dict[str, float]:
        """The share of the first ``generation.exact_match`` validation examples whose greedy
        answer is their reference. Each rank answers its share; every rank makes the same
        number of ``generate`` calls (ZeRO-3 gathers are collectives), repeating its last
        example uncounted where its share is short."""
        rt, tok, gen = self.runtime, self.tokenizer, self.cfg.generation
        head = self.validation.examples[: gen.exact_match]
        chosen = [e for e in head if e.loss_mask.argmax() > 0]
        if not chosen:
            return {}
        mine = chosen[rt.rank :: rt.world_size]
        calls = -(-len(chosen) // rt.world_size)
        hits = torch.zeros(2, dtype=torch.float64, device=rt.device)
        with rt.generating(model) as module:
            for i in range(calls):
                example = mine[min(i, len(mine) - 1)] if mine else chosen[0]
                first, new = self._answer(module, example, gen.max_new_tokens)
                if i >= len(mine):
                    continue
                mask = example.loss_mask[first:]
                end = int(mask.argmin()) if not mask.all() else len(mask)  # first turn only
                reference = tok.decode(example.tokens[first : first + end].tolist(), True)
                answer = tok.decode(new, skip_special_tokens=True)
                hits += torch.tensor([answer.strip() == reference.strip(), 1.0], device=rt.device)
        rt.all_reduce(hits)
        return {"eval/exact_match": float(hits[0] / hits[1])}

    def _write_samples(self, model: nn.Module) -> None:
        """Every rank generates (ZeRO-3 gathers are collectives); the main rank writes."""
        rt, tok = self.runtime, self.tokenizer
        rows = []
        with rt.generating(model) as module:
            for example in self.validation.examples[:SAMPLES]:
                if example.loss_mask.argmax() == 0:  # an empty prompt: nothing to answer
                    continue
                first, new = self._answer(module, example, SAMPLE_TOKENS)
                rows.append(
                    {
                        "evaluation": self.evaluations,
                        "where": example.where,
                        "prompt": tok.decode(example.tokens[:first].tolist()),
                        "completion": tok.decode(new, skip_special_tokens=True),
                        "stopped": tok.eos_id in new,
                        "reference": tok.decode(example.tokens[first:].tolist(), True),
                    }
                )
        self.evaluations += 1
        if rt.is_main:
            with open(self.cfg.run_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def on_log(self) -> None:
        record_counters(self.train_set, self.trainable[0])

    def summary(self, results: dict[str, float], state) -> list[str]:
        loss = results.get("eval/loss")
        tail = f"; validation loss {loss:.4f}" if loss is not None else ""
        return [f"trained {state.step} steps, {state.tokens:,} tokens{tail}"]

    # ------------------------------------------------------------------ export and state

    def export(self, model: nn.Module, state_dict: dict | None, out: Path) -> None:
        weights = state_dict if state_dict is not None else model.state_dict()
        weights = {k: v.detach().to("cpu", torch.float32) for k, v in weights.items()}
        export_model(weights, self.parent, self.cfg.peft, out)
        save_tokenizer(self.tokenizer, out, self.template, self.cfg.data.max_seq_len)

    def save_extras(self, folder: Path) -> list[str]:
        """The tokenizer (with its chat template) and the parent's config.json: the checkpoint
        exports without the parent (``kiln export``)."""
        save_tokenizer(self.tokenizer, folder / "tokenizer", self.template, None)
        (folder / "model").mkdir()
        for name in ("config.json", "generation_config.json"):
            if (self.parent / name).is_file():
                shutil.copy(self.parent / name, folder / "model" / name)
        files = [p for sub in ("tokenizer", "model") for p in (folder / sub).rglob("*")]
        return sorted(str(p.relative_to(folder)) for p in files if p.is_file())

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict([s["data"] for s in states])


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """Next-token NLL of the batch's targets (already shifted; ``IGNORE`` elsewhere)."""
    logits = forward_logits(model, batch)
    width = batch["input_ids"].shape[1]
    if logits.shape[1] > width:  # prompt tuning: the virtual tokens come first
        logits = logits[:, -width:]
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        batch["targets"].flatten(),
        ignore_index=IGNORE,
        reduction=reduction,
    )


def save_tokenizer(
    tokenizer: TextTokenizer, out: Path, template: str | None, max_len: int | None
) -> None:
    """The tokenizer files with the chat template the run trained with."""
    tokenizer.save(out, model_max_length=max_len, chat_template=template or DEFAULT_TEMPLATE)


def export_checkpoint(
    folder: Path, out: Path, dtype: torch.dtype = torch.bfloat16, select=None
) -> Path:
    """`kiln export` of an SFT checkpoint, without its parent: verified first
    (``CheckpointError``), the model rebuilt from the saved config.json and peft settings.
    ``select`` (weights -> weights) picks and renames the causal LM's weights of a checkpoint
    that holds more (PPO: the actor of actor + critic)."""
    from safetensors.torch import load_file

    verify(folder, read_manifest(folder))
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    peft = PeftSection.model_validate(saved["peft"]) if saved.get("peft") else None
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(str(path)))
    if select is not None:
        weights = select(weights)
    export_model(weights, folder / "model", peft, out, dtype)
    tokenizer = TextTokenizer.load(folder / "tokenizer")
    template = tokenizer.chat_template
    tokenizer.save(out, model_max_length=saved["data"]["max_seq_len"], chat_template=template)
    return out


def sft(cfg: SFTConfig) -> dict[str, float]:
    """Fine-tune ``init.path`` on ``data``, export ``runs/<name>/hf/``."""
    return run_stage(cfg, SFTTask)


STAGE = Stage(
    name="sft",
    config_class=SFTConfig,
    run=sft,
    help="supervised fine-tuning (chats, prompt/completion; full or LoRA/prefix/prompt)",
    distributed=True,
    export=export_checkpoint,
    merge_refusal=checkpoint_merge_refusal,
)

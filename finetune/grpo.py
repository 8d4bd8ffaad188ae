"""The ``grpo`` stage: Group Relative Policy Optimisation of a causal LM with a rule reward, on
the shared loop (Shao et al. 2024; the loss and defaults of TRL 1.16's ``GRPOTrainer``).

A loop step draws ``accum`` micro-batches of prompts (``train.micro_batch_size / G`` prompts
each: batch sizes count completions), samples G completions of each prompt with the trained
model (``runtime.generating``: whole under ZeRO-3, the global torch RNG, which checkpoints
save per rank), cuts each after its first EOS, scores the decoded text with the reward
function and turns the rewards into group-relative advantages. Then ``grpo.num_iterations``
optimizer steps over those micro-batches: per completion token -min(ratio A, clip(ratio) A)
(+ beta k3 to the parent), summed, with tokens (``dapo``) or completions (``grpo``) as the
loop's items. With one iteration (TRL's default) the old log-probs are the current ones
detached: the ratio is exactly 1. The export is the SFT one (causal LM, tokenizer, template).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from finetune.chat import chosen_template, generation_prompt
from finetune.common import FrozenModels, announce_data, record_counters
from finetune.data import check_messages
from finetune.grpo_config import GRPOConfig, import_reward
from finetune.judge import left_padded_generate, right_padded
from finetune.peft_setup import load_parent, reference_model, trainable_parameters
from finetune.reward_model import load_frozen_reward_model, score_sequences
from finetune.rl_math import aggregate_loss, grpo_advantages, grpo_token_loss
from finetune.sft import SFTTask, export_checkpoint
from launcher.data.batches import ExampleStream
from launcher.data.examples import Example, read_examples
from launcher.data.records import CorpusError, Record
from launcher.data.tokenizer import TextTokenizer
from launcher.errors import UserError
from launcher.forward import forward_logits
from launcher.metrics import record
from launcher.runner import run_stage
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.states import RunJson
from launcher.task import Task

if TYPE_CHECKING:
    from launcher.stepping import StepContext

VOWELS = frozenset("aeiou")
SAMPLES = 4
"""Completions of each step written to samples.jsonl (main rank)."""


def letter_share(text: str) -> float:
    """The rule reward of the tiny recipe and the tests: the share of the completion's
    letters that are vowels (0..1; no letter: 0). A tiny model raises it within tens of
    steps by favouring vowel-heavy tokens."""
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0


@dataclass
class PromptEncoder:
    """The encode hook of ``read_examples`` for prompt records: the prompt's ids (a chat: the
    template's prompt and the assistant's generation header), nothing trained; ``index``
    extra set later (a batch row back to its ``file:line``)."""

    tokenizer: TextTokenizer
    max_prompt: int
    template: str | None = None
    stage: str = "grpo"
    """The config section whose ``max_new_tokens`` the length limit names."""

    def __call__(self, record: Record) -> Example | CorpusError:
        data = record.data
        if "messages" in data:
            messages = data["messages"]
            problem = check_messages(messages)
            if problem is not None and problem.kind != "no_assistant_turn":
                return problem
            if messages[-1]["role"] == "assistant":
                return CorpusError("the chat ends with an assistant turn", kind="ends_with_answer")
            ids = generation_prompt(self.tokenizer, messages, self.template)
        elif isinstance(data.get("prompt"), str):
            ids = self.tokenizer.encode(data["prompt"])
        else:
            return CorpusError(
                f"neither prompt nor messages: keys {sorted(data)[:8]}", kind="not_a_prompt"
            )
        if not ids:  # generation needs a token to start from
            return CorpusError("the prompt encodes to no token", kind="empty_prompt")
        if len(ids) > self.max_prompt:
            return CorpusError(
                f"{len(ids)} prompt tokens, over data.max_seq_len - {self.stage}.max_new_tokens "
                f"({self.max_prompt})",
                kind="prompt_too_long",
            )
        return Example(ids, np.zeros(len(ids), dtype=bool))


class GRPOTask(Task):
    name = "grpo"
    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.parent = Path(cfg.init.path)
        self.tokenizer = TextTokenizer.load(self.parent)
        self.template = chosen_template(cfg.chat.template, self.tokenizer, self.parent)
        self.reward_fn = import_reward(cfg.grpo.reward) if cfg.grpo.reward else None
        self.reward_model: nn.Module | None = None
        max_prompt = cfg.data.max_seq_len - cfg.grpo.max_new_tokens
        encoder = PromptEncoder(self.tokenizer, max_prompt, self.template)
        self.train_set = read_examples(
            cfg.data.train, encoder, key="data.train", on_error=cfg.data.on_error
        )
        for i, example in enumerate(self.train_set.examples):
            example.extras["index"] = i
        self.group = cfg.grpo.group_size
        self.stream = ExampleStream(
            self.train_set.examples,
            batch_size=cfg.train.micro_batch_size // self.group,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=cfg.run.seed,
            pad_id=self.tokenizer.pad_id,
            shuffle=cfg.data.shuffle,
        )
        self.reference: nn.Module | None = None
        used = cfg.grpo.beta > 0 and cfg.peft is None
        frozen = {"init.path (the KL reference)": self.parent} if used else {}
        if cfg.grpo.reward_model is not None:
            frozen["grpo.reward_model"] = cfg.grpo.reward_model
        self.frozen = FrozenModels(frozen)
        self.trainable = (0, 0)
        self._generation = 0.0  # seconds in generate() this step
        self._samples: list[tuple[str, str, float]] = []  # (where, completion, reward)
        if runtime.is_main:
            what = f"{len(self.train_set)} prompts, {self.group} completions each"
            announce_data(self.train_set, what)

    # ------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        model = load_parent(self.parent, self.cfg.peft, self.cfg.run.seed)
        self.trainable = trainable_parameters(model)
        return model

    def on_engine(self, engine: nn.Module) -> None:
        """The KL reference, only with ``grpo.beta > 0``: a frozen copy of the parent (full
        fine-tuning) or, with LoRA, the actor with its adapters disabled (no copy)."""
        if self.cfg.grpo.beta > 0 and self.cfg.peft is None:
            parent = load_parent(self.parent, None, self.cfg.run.seed)
            self.reference = self.runtime.prepare_frozen(parent)
        if self.cfg.grpo.reward_model is not None:
            folder = Path(self.cfg.grpo.reward_model)
            self.reward_model = load_frozen_reward_model(self.runtime, folder, self.cfg.run.seed)

    # ---------------------------------------------------------------------------- batches

    def train_batches(self) -> ExampleStream:
        return self.stream

    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch(self.cfg.grad_accum_steps)

    def tokens_per_sequence(self) -> int:
        return self.cfg.data.max_seq_len

    def optimizer_steps_per_step(self) -> int:
        return self.cfg.grpo.num_iterations

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        if self.cfg.grpo.loss == "dapo":
            return int(batch["completion_mask"].sum())
        return int(batch["completion_mask"].shape[0])

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    # --------------------------------------------------------------------------- the step

    def train_step(self, step: StepContext, batches: list[dict[str, torch.Tensor]]) -> None:
        """Sample this rank's groups (every rank its own prompts, so a group is whole on one
        rank), score them, then ``grpo.num_iterations`` optimizer steps over the same
        micro-batches."""
        rt = step.runtime
        started, self._generation, self._samples = time.perf_counter(), 0.0, []
        with rt.generating(step.engine) as model:
            rollouts = [self._rollout(model, batch) for batch in batches]
        rewards = torch.cat([r.pop("rewards") for r in rollouts])
        advantages, zero_std = grpo_advantages(
            rewards, self.group, self.cfg.grpo.scale_rewards, all_reduce=rt.all_reduce
        )
        per_batch = [len(r["input_ids"]) for r in rollouts]
        for rollout, adv in zip(rollouts, advantages.split(per_batch), strict=True):
            rollout["advantages"] = adv
        record("grpo/reward_mean", rewards.mean())
        record("grpo/reward_std", rewards.std())
        record("grpo/frac_reward_zero_std", zero_std)
        lengths = torch.cat([r["completion_mask"].sum(1) for r in rollouts]).float()
        record("grpo/completion_length", lengths.mean())
        if self.cfg.grpo.num_iterations > 1:  # the sampling policy, before the first update
            with torch.no_grad():
                for rollout in rollouts:
                    on_device = {k: v.to(rt.device) for k, v in rollout.items()}
                    rollout["old_logp"] = self._token_logps(step.engine, on_device).cpu()
        # per rank; generation alone, and with scoring and old log-probs
        record("time/rollout", time.perf_counter() - started, reduce="max")
        record("time/generation", self._generation, reduce="max")
        record("rollout/generation_tokens_per_s", float(lengths.sum()) / self._generation)
        if rt.is_main:
            with open(self.cfg.run_dir / "samples.jsonl", "a") as f:
                for where, text, reward in self._samples[:SAMPLES]:
                    row = {"step": step.state.step + 1, "where": where, "completion": text}
                    f.write(json.dumps(row | {"reward": reward}, ensure_ascii=False) + "\n")
        for _ in range(self.cfg.grpo.num_iterations):
            step.optimize(rollouts)

    def _rollout(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """G sampled completions of each prompt of ``batch`` (right-padded prompts from the
        stream), as a right-padded training micro-batch with its rewards."""
        tok, g, device = self.tokenizer, self.group, self.runtime.device
        lengths = batch["attention_mask"].sum(1).tolist()
        prompts = [batch["input_ids"][i // g, : lengths[i // g]] for i in range(len(lengths) * g)]
        sampling = {
            "do_sample": True,
            "temperature": self.cfg.grpo.temperature,
            "top_k": 0,
            "top_p": 1.0,
        }
        started = time.perf_counter()
        # each completion ends with its first EOS (kept: it is a sampled, trained token)
        rows = left_padded_generate(
            model, prompts, tok, self.cfg.grpo.max_new_tokens, device, sampling
        )
        self._generation += time.perf_counter() - started
        texts = [tok.decode(ids[n:].tolist(), skip_special_tokens=True) for ids, n, _ in rows]
        wheres = [
            self.train_set.examples[int(batch["index"][i // g])].where for i in range(len(rows))
        ]
        input_ids, attention, start, length = right_padded(rows, tok.pad_id)
        cols = torch.arange(input_ids.shape[1])[None, :]
        completion = ((cols >= start[:, None]) & (cols < (start + length)[:, None])).long()
        if self.reward_model is not None:  # whole micro-batches: as many forwards per rank
            rewards = score_sequences(self.reward_model, input_ids, attention, len(rows), device)
            rewards = rewards.tolist()
        else:
            rewards = [self._reward(t, w) for t, w in zip(texts, wheres, strict=True)]
        self._samples += zip(wheres, texts, rewards, strict=True)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "completion_mask": completion,
            "rewards": torch.tensor(rewards, dtype=torch.float32),
        }

    def _reward(self, text: str, where: str) -> float:
        """The reward of one completion; a failure stops the run (a rule that cannot score is
        a bug of the rule, not a sample to skip)."""
        spec = self.cfg.grpo.reward
        try:
            value = float(self.reward_fn(text))
        except Exception as exc:
            raise UserError(
                f"grpo.reward {spec} raised {type(exc).__name__}: {exc} on a completion of the "
                f"prompt at {where}"
            ) from exc
        if not math.isfinite(value):
            raise UserError(
                f"grpo.reward {spec} returned {value} on a completion of the prompt at {where}"
            )
        return value

    # ------------------------------------------------------------------------------- loss

    def _token_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log pi(token t+1 | ..t) [B, L-1] at the sampling temperature (as TRL, which divides
        the logits by it)."""
        logits = forward_logits(model, batch)[:, :-1].float() / self.cfg.grpo.temperature
        targets = batch["input_ids"][:, 1:]
        return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg.grpo
        logp = self._token_logps(model, batch)
        mask = batch["completion_mask"][:, 1:].bool()
        old = batch.get("old_logp", logp.detach())
        ref = None
        if cfg.beta > 0:
            with torch.no_grad(), reference_model(self.reference, model) as reference:
                ref = self._token_logps(reference, batch)
        per_token = grpo_token_loss(
            logp, old, batch["advantages"], mask, cfg.epsilon, cfg.eps_high, cfg.beta, ref
        )
        level = "token" if cfg.loss == "dapo" else "sequence"
        return aggregate_loss(per_token, mask, level)[0]

    def on_log(self) -> None:
        record_counters(self.train_set, self.trainable[0])

    def summary(self, results: dict[str, float], state) -> list[str]:
        reward = results.get("grpo/reward_mean")
        tail = f"; last logged reward mean {reward:.4f}" if reward is not None else ""
        return [f"trained {state.step} steps{tail}"]

    # ------------------------------------------------------------------ export and state

    export = SFTTask.export
    save_extras = SFTTask.save_extras

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict([s["data"] for s in states])

    def states(self) -> dict:
        """The KL reference's weights' digests (with ``grpo.beta > 0``, full fine-tuning;
        optional: older checkpoints lack them)."""
        return {"frozen": RunJson(self.frozen, optional=True)}


def grpo(cfg: GRPOConfig) -> dict[str, float]:
    """GRPO of ``init.path`` on the prompts of ``data``, export ``runs/<name>/hf/``."""
    return run_stage(cfg, GRPOTask)


STAGE = Stage(
    name="grpo",
    config_class=GRPOConfig,
    run=grpo,
    help="group relative policy optimisation from prompts and a rule reward (full or LoRA)",
    distributed=True,
    export=export_checkpoint,
)

"""The ``ppo`` stage: PPO of a causal LM against a reward model or a rule, on the shared loop
(Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), with TRL 1.12's defaults.

An *iteration*: the first loop step of it samples one response per prompt for this rank's
share of ``ppo.rollout_size`` prompts (``runtime.generating``, the global torch RNG, saved per
rank by checkpoints), scores each (reward model or rule; minus ``missing_eos_penalty`` when it
did not end), and runs the frozen reference and the trained model once over the rollout: old
log-probs and values from a full forward (not ``generate``'s scores), per-token rewards =
-c KL_t plus the normalised, clipped score at the last token, GAE, whitened advantages
(statistics over all ranks). Then ``ppo.epochs`` passes, each cut into minibatches of
``train.global_batch_size`` in a seeded order: one optimizer step per loop step, so a run can
stop and resume in the middle of an iteration (the rollout is this rank's tensor state, the
KL coefficient the run's JSON state).

The loop's batch stream carries nothing (``Ticks``): the data is made inside the step, after
every rank agreed to take it, so that generation and the frozen models' ZeRO-3 collectives
never start on one rank alone. The old log-probs of the first minibatch of each pass-1 are
computed on exactly its micro-batches, so its ratio is exactly 1.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from finetune.chat import chosen_template
from finetune.common import FrozenModels, announce_data, record_counters
from finetune.grpo import PromptEncoder
from finetune.grpo_config import import_reward
from finetune.judge import Judge, left_padded_generate, right_padded
from finetune.peft_setup import reference_model, trainable_parameters
from finetune.ppo_config import PPOConfig
from finetune.ppo_model import (
    ActorCritic,
    build_actor_critic,
    entropy,
    gather_responses,
    load_actor,
    reward_stats,
)
from finetune.reward_model import load_frozen_reward_model, score_sequences
from finetune.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_estimate,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)
from finetune.sft import SFTTask, export_checkpoint
from launcher.data.batches import ExampleStream
from launcher.data.examples import read_examples
from launcher.data.tokenizer import TextTokenizer
from launcher.errors import UserError
from launcher.metrics import record
from launcher.optim import param_groups
from launcher.runner import run_stage
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.states import RankTensors, RunJson
from launcher.task import Task

if TYPE_CHECKING:
    from launcher.stepping import StepContext

log = logging.getLogger(__name__)
SAMPLES = 4
"""Responses of each iteration written to samples.jsonl (main rank)."""


class Ticks:
    """The loop's batch stream of a stage that makes its data inside the step: endless empty
    micro-batches, nothing to rewind (the task keeps its own position)."""

    def __iter__(self):
        while True:
            yield {}

    def position(self) -> int:
        return 0

    def rewind(self, position: int) -> None:
        return None


class Rollout:
    """This rank's rollout tensors (``RankTensors`` state), named by ``KEYS``; empty until
    the first iteration, and after loading a checkpoint of another world size (its rows
    were spread over other ranks: only a new rollout, at an iteration's start, can go on)."""

    KEYS = ("input_ids", "attention_mask", "start", "length", "old_logp", "old_values",
            "advantages", "returns", "iteration")  # fmt: skip

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.saved_world: int | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, states: list[dict[str, torch.Tensor]]) -> None:
        self.saved_world = len(states)
        mine = states[self.rank] if self.saved_world == self.world_size else {}
        self.tensors = dict(mine) if set(mine) == set(self.KEYS) else {}


class PPOTask(Task):
    name = "ppo"
    cfg: PPOConfig

    def __init__(self, cfg: PPOConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.parent = Path(cfg.init.path)
        self.tokenizer = TextTokenizer.load(self.parent)
        self.template = chosen_template(cfg.chat.template, self.tokenizer, self.parent)
        p = cfg.ppo
        self.reward_fn = import_reward(p.reward_function) if p.reward_function else None
        encoder = PromptEncoder(
            self.tokenizer, cfg.data.max_seq_len - p.max_new_tokens, self.template, "ppo"
        )
        self.train_set = read_examples(
            cfg.data.train, encoder, key="data.train", on_error=cfg.data.on_error
        )
        for i, example in enumerate(self.train_set.examples):
            example.extras["index"] = i
        self.per_rank = p.rollout_size // runtime.world_size
        self.stream = ExampleStream(
            self.train_set.examples,
            batch_size=1,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=cfg.run.seed,
            pad_id=self.tokenizer.pad_id,
            shuffle=cfg.data.shuffle,
        )
        self.prompts = None  # the stream's iterator, from the first rollout
        self.iteration = 0
        if p.kl_target is not None:
            self.kl = AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
        else:
            self.kl = FixedKLController(p.kl_coef)
        self.rollout = Rollout(runtime.rank, runtime.world_size)
        self.reference: nn.Module | None = None
        self.reward_model: nn.Module | None = None
        self.score_stats = (0.0, 1.0)
        self.trainable = (0, 0)
        frozen = {} if cfg.peft is not None else {"init.path (the KL reference)": self.parent}
        if p.reward_model is not None:
            frozen["ppo.reward_model"] = p.reward_model
        self.judge = None
        if cfg.judge is not None:
            limit = cfg.data.max_seq_len - cfg.judge.max_new_tokens
            judge_encoder = PromptEncoder(self.tokenizer, limit, self.template, "judge")
            micro = cfg.train.micro_batch_size
            self.judge = Judge(cfg.judge, judge_encoder, runtime, micro)
            if cfg.judge.reward_model is not None:
                frozen["judge.reward_model"] = cfg.judge.reward_model
        self.frozen = FrozenModels(frozen)
        if runtime.is_main:
            what = (
                f"{len(self.train_set)} prompts, {cfg.steps_per_iteration} optimizer steps per "
                f"rollout of {p.rollout_size}"
            )
            announce_data(self.train_set, what)

    # ------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        p = self.cfg.ppo
        model = build_actor_critic(
            self.parent,
            self.cfg.peft,
            self.cfg.run.seed,
            p.critic_kind,
            Path(p.reward_model) if p.reward_model else None,
        )
        self.trainable = trainable_parameters(model)
        return model

    def enable_activation_checkpointing(self, model: ActorCritic) -> None:
        for part in (model.policy, model.critic):
            if part is not None:
                super().enable_activation_checkpointing(part)

    def param_groups(self, model: ActorCritic) -> list[dict]:
        """The actor's groups, then the critic's with ``lr_scale = ppo.critic_lr_scale``."""
        decay = self.cfg.optim.weight_decay
        groups = param_groups(model.policy, decay)
        for critic in model.critic_modules():
            for group in param_groups(critic, decay):
                group["name"] = f"critic_{group['name']}"
                group["lr_scale"] = self.cfg.ppo.critic_lr_scale
                groups.append(group)
        return groups

    def on_engine(self, engine: nn.Module) -> None:
        """The frozen reference (full fine-tuning: a copy of the parent; LoRA: the actor with
        its adapters disabled) and the frozen reward model with its score statistics."""
        rt, p = self.runtime, self.cfg.ppo
        if self.cfg.peft is None:
            self.reference = rt.prepare_frozen(load_actor(self.parent, None, self.cfg.run.seed))
        if p.reward_model is not None:
            self._load_reward_model(Path(p.reward_model))
        if self.judge is not None:
            self.judge.load(self.cfg.run.seed, shared=self.reward_model)

    def _load_reward_model(self, folder: Path) -> None:
        rt = self.runtime
        self.reward_model = load_frozen_reward_model(rt, folder, self.cfg.run.seed)
        stats = reward_stats(folder)
        if stats is None:
            log.warning(
                "ppo.reward_model %s: its config.json holds no kiln_reward statistics (not "
                "a kiln reward export?): scores are not normalised",
                folder,
            )
        else:
            self.score_stats = stats

    # ---------------------------------------------------------------------------- batches

    def train_batches(self) -> Ticks:
        return Ticks()

    def tokens_per_sequence(self) -> int:
        return self.cfg.data.max_seq_len

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["response_mask"].sum())

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    # --------------------------------------------------------------------------- the step

    def train_step(self, step: StepContext, batches: list[dict]) -> None:
        """A new rollout at the first step of an iteration; then this step's minibatch."""
        per_iteration = self.cfg.steps_per_iteration
        at = step.state.step % per_iteration
        if at == 0:
            self._rollout(step)
        elif not self.rollout.tensors:
            raise UserError(
                f"the checkpoint stopped {at} steps into a PPO iteration on "
                f"{self.rollout.saved_world} ranks, and its rollout is per rank: resume on "
                f"{self.rollout.saved_world} ranks, or from a checkpoint at an iteration's "
                f"start (a multiple of {per_iteration} steps)"
            )
        rows = self._minibatch(at)
        step.optimize([self._micro(r) for r in rows.split(self.cfg.train.micro_batch_size)])

    def _order(self, epoch: int) -> torch.Tensor:
        """This rank's rollout rows in pass ``epoch``'s order (seeded by run, iteration, pass;
        no state to save)."""
        iteration = int(self.rollout.tensors["iteration"])
        seed = (self.cfg.run.seed * 1_000_003 + iteration) * 101 + epoch
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(self.per_rank, generator=generator)

    def _minibatch(self, at: int) -> torch.Tensor:
        """This rank's rows of the iteration's step ``at``."""
        size = self.cfg.train.global_batch_size // self.runtime.world_size
        per_pass = self.per_rank // size
        epoch, k = divmod(at, per_pass)
        return self._order(epoch)[k * size : (k + 1) * size]

    def _micro(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """A training micro-batch of rollout ``rows``, cut to its longest row."""
        r = self.rollout.tensors
        start, length = r["start"][rows], r["length"][rows]
        width = int((start + length).max())
        steps = torch.arange(self.cfg.ppo.max_new_tokens)
        batch = {
            "input_ids": r["input_ids"][rows, :width],
            "attention_mask": r["attention_mask"][rows, :width],
            "index": (start[:, None] - 1 + steps).clamp(max=width - 2),
            "response_mask": (steps[None, :] < length[:, None]).long(),
        }
        # the rollout's statistics, once computed (not while computing them)
        for key in ("old_logp", "old_values", "advantages", "returns"):
            if key in r:
                batch[key] = r[key][rows]
        return batch

    # ---------------------------------------------------------------------------- rollout

    @torch.no_grad()
    def _rollout(self, step: StepContext) -> None:
        rt, p, tok = step.runtime, self.cfg.ppo, self.tokenizer
        if self.prompts is None:
            self.prompts = iter(self.stream)
        # one prompt per draw: a rollout may span the end of an epoch, and is always full
        drawn = [next(self.prompts) for _ in range(self.per_rank)]
        prompts = [b["input_ids"][0, : int(b["attention_mask"].sum())] for b in drawn]
        where = [self.train_set.examples[int(b["index"][0])].where for b in drawn]
        micro = self.cfg.train.micro_batch_size
        started = time.perf_counter()
        with rt.generating(step.engine) as module:
            chunks = [
                self._generate(module.policy, prompts[i : i + micro])
                for i in range(0, self.per_rank, micro)
            ]
        generated = time.perf_counter() - started
        rows = [row for chunk in chunks for row in chunk]
        n, new = len(rows), p.max_new_tokens
        input_ids, attention, start, length = right_padded(rows, tok.pad_id)
        ended = torch.tensor([e for _, _, e in rows])
        texts = [tok.decode(ids[s:].tolist(), skip_special_tokens=True) for ids, s, _ in rows]
        scores = self._scores(input_ids, attention, texts, where)
        if p.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - p.missing_eos_penalty)
        self.rollout.tensors = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "start": start,
            "length": length,
            "iteration": torch.tensor(self.iteration),
        }
        # Old log-probs and values on exactly pass 1's micro-batches: its first minibatch
        # then sees ratio 1 to the last bit.
        old_logp, old_values = torch.zeros(n, new), torch.zeros(n, new)
        ref_logp, entropies = torch.zeros(n, new), torch.zeros(n, new)
        for chunk in self._order(0).split(micro):
            batch = {k: v.to(rt.device) for k, v in self._micro(chunk).items()}
            logits, values = step.engine(batch["input_ids"], batch["attention_mask"])
            logp, picked = gather_responses(
                logits, batch["input_ids"], batch["index"], p.temperature
            )
            old_logp[chunk] = logp.cpu()
            old_values[chunk] = values.float().gather(1, batch["index"]).cpu()
            entropies[chunk] = entropy(picked).cpu()
            with reference_model(self.reference, step.engine.module.policy) as reference:
                ref_logits = reference(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    use_cache=False,
                ).logits
            ref_logp[chunk] = gather_responses(
                ref_logits, batch["input_ids"], batch["index"], p.temperature
            )[0].cpu()
        mask = torch.arange(new)[None, :] < length[:, None]
        kl = torch.where(mask, kl_estimate(old_logp, ref_logp, p.kl_estimator), 0.0)
        mean, std = self.score_stats
        rewards = token_rewards(kl, scores, mask, self.kl.value, mean, std, p.score_clip)
        if p.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=self._reduce)
        advantages, returns = gae(rewards, old_values, mask, p.gamma, p.lam)
        advantages = masked_whiten(advantages, mask, all_reduce=self._reduce)
        self.rollout.tensors |= {
            "old_logp": old_logp,
            "old_values": old_values,
            "advantages": advantages,
            "returns": returns,
        }
        seconds = time.perf_counter() - started
        # The run's statistics of the rollout, summed over ranks in one collective.
        k1 = torch.where(mask, old_logp - ref_logp, 0.0).sum(1)
        sums = torch.tensor(
            [
                n,
                float(scores.sum()),
                float(rewards.sum()),
                float(k1.sum()),
                float(torch.where(mask, entropies, 0.0).sum()),
                float(mask.sum()),
                float(ended.sum()),
            ],
            dtype=torch.float64,
        )
        self._reduce(sums)
        total, score, reward, seq_kl, ent, tokens, stopped = sums.tolist()
        record("ppo/score", score / total)
        record("ppo/reward", reward / total)
        record("ppo/kl", seq_kl / total)
        record("ppo/kl_coef", self.kl.value)
        record("ppo/entropy", ent / tokens)
        record("ppo/response_length", tokens / total)
        record("ppo/ended_with_eos", stopped / total)
        record("ppo/iteration", float(self.iteration), reduce="max")
        record("time/rollout", seconds, reduce="max")
        record("time/generation", generated, reduce="max")
        rate = float(mask.sum()) / max(generated, 1e-9)
        record("rollout/generation_tokens_per_s", rate)  # per rank
        self.kl.update(seq_kl / total, int(total))
        self.iteration += 1
        if rt.is_main:
            self._write_samples(texts, where, scores)

    def _reduce(self, t: torch.Tensor) -> None:
        if self.runtime.world_size > 1:
            device = t.device
            moved = t.to(self.runtime.device)
            self.runtime.all_reduce(moved, "sum")
            t.copy_(moved.to(device))

    def _generate(self, policy: nn.Module, prompts: list[torch.Tensor]) -> list:
        """(prompt + response ids, prompt length, ended with EOS) of each prompt: one response
        each, cut after its first EOS."""
        p = self.cfg.ppo
        sampling = {"do_sample": True, "temperature": p.temperature, "top_k": 0, "top_p": 1.0}
        sampling = sampling if p.do_sample else {"do_sample": False}
        return left_padded_generate(
            policy, prompts, self.tokenizer, p.max_new_tokens, self.runtime.device, sampling
        )

    def _scores(self, input_ids, attention, texts: list[str], where: list[str]) -> torch.Tensor:
        """One score per response: the rule's, or the reward model's at the last token (rows
        padded with the reward model's own pad id, which it reads the last token by)."""
        if self.reward_fn is not None:
            return torch.tensor([self._rule(t, w) for t, w in zip(texts, where, strict=True)])
        micro = self.cfg.train.micro_batch_size
        return score_sequences(self.reward_model, input_ids, attention, micro, self.runtime.device)

    def _rule(self, text: str, where: str) -> float:
        spec = self.cfg.ppo.reward_function
        try:
            value = float(self.reward_fn(text))
        except Exception as exc:
            raise UserError(
                f"ppo.reward_function {spec} raised {type(exc).__name__}: {exc} on the response "
                f"to the prompt at {where}"
            ) from exc
        if not math.isfinite(value):
            raise UserError(
                f"ppo.reward_function {spec} returned {value} on the response to the prompt "
                f"at {where}"
            )
        return value

    def _write_samples(self, texts: list[str], where: list[str], scores: torch.Tensor) -> None:
        with open(self.cfg.run_dir / "samples.jsonl", "a") as f:
            for i in range(min(SAMPLES, len(texts))):
                row = {
                    "iteration": self.iteration - 1,
                    "where": where[i],
                    "response": texts[i],
                    "score": float(scores[i]),
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------------------- loss

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.cfg.ppo
        logits, values = model(batch["input_ids"], batch["attention_mask"])
        logp, _ = gather_responses(logits, batch["input_ids"], batch["index"], p.temperature)
        values = values.float().gather(1, batch["index"])
        mask = batch["response_mask"].bool()
        pg = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, p.clip, "sum")
        vf = ppo_value_loss(
            values, batch["old_values"], batch["returns"], mask, p.value_clip, "sum"
        )
        count = pg.count.clamp(min=1)
        with torch.no_grad():
            shift = torch.where(mask, logp - batch["old_logp"], 0.0)
            record("ppo/ratio_max_dev", torch.expm1(shift).abs().max(), reduce="max")
        record("ppo/policy_loss", pg.loss.detach() / count)
        record("ppo/value_loss", vf.loss.detach() / count)
        record("ppo/clipfrac", pg.clipfrac / count)
        record("ppo/value_clipfrac", vf.clipfrac / count)
        record("ppo/approxkl", pg.approxkl / count)
        return pg.loss + p.vf_coef * vf.loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The judge's scores of the actor on held-out prompts (none without ``judge``)."""
        if self.judge is None:
            return {}
        policy = getattr(model, "module", model).policy
        reference = lambda: reference_model(self.reference, policy)  # noqa: E731
        return self.judge(model, lambda m: m.policy, reference, self.tokenizer)

    def on_log(self) -> None:
        record_counters(self.train_set, self.trainable[0])

    def summary(self, results: dict[str, float], state) -> list[str]:
        score = results.get("ppo/score")
        tail = f"; last rollout's mean score {score:.4f}" if score is not None else ""
        return [f"trained {state.step} steps ({self.iteration} rollouts){tail}"]

    # ------------------------------------------------------------------ export and state

    def export(self, model: nn.Module, state_dict: dict | None, out: Path) -> None:
        """The actor alone, as the SFT stage exports (LoRA merged, tokenizer, template)."""
        weights = state_dict if state_dict is not None else model.state_dict()
        SFTTask.export(self, model, policy_weights(weights), out)

    save_extras = SFTTask.save_extras

    def state_dict(self) -> dict:
        return {"prompts": self.stream.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict([s["prompts"] for s in states])
        self.iteration = states[0]["iteration"]

    def states(self) -> dict:
        return {
            "kl": RunJson(self.kl),
            "rollout": RankTensors(self.rollout),
            "frozen": RunJson(self.frozen),
        }


def policy_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The actor's weights of an ``ActorCritic`` state dict, named as in the actor."""
    return {k.removeprefix("policy."): v for k, v in weights.items() if k.startswith("policy.")}


def export_ppo_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`kiln export` of a PPO checkpoint: the actor, as an SFT checkpoint exports."""
    return export_checkpoint(folder, out, dtype, select=policy_weights)


def ppo(cfg: PPOConfig) -> dict[str, float]:
    """PPO of ``init.path`` on the prompts of ``data``, export ``runs/<name>/hf/``."""
    return run_stage(cfg, PPOTask)


STAGE = Stage(
    name="ppo",
    config_class=PPOConfig,
    run=ppo,
    help="PPO against a reward model or a rule reward, actor and critic on one engine",
    distributed=True,
    export=export_ppo_checkpoint,
)

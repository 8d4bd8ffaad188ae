"""The PPO run config: the shared runtime sections plus ``data`` (prompts, as GRPO), ``chat``,
``peft`` and ``ppo`` (rollouts, reward, critic, KL, GAE, clipping).

Sizes: ``ppo.rollout_size`` responses are sampled per iteration (one per prompt, over all
ranks); each of ``ppo.epochs`` passes over them is cut into minibatches of
``train.global_batch_size``, one optimizer step each, so an iteration is ``epochs x
rollout_size / global_batch_size`` loop steps and ``train.max_steps`` counts optimizer steps,
as in every stage. Defaults are TRL 1.12's (``trl/experimental/ppo/ppo_config.py``, the last
TRL with PPO) unless the field says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field

from finetune.config import ChatSection, PeftSection, pair_stage_problems
from finetune.grpo_config import PromptData, import_reward, reward_model_problems
from finetune.judge import JudgeSection
from launcher.config import Section
from launcher.run_config import RunConfig


class PPOSection(Section):
    rollout_size: int = Field(64, gt=0)
    """Responses sampled per iteration, over all ranks (one per prompt)."""
    epochs: int = Field(4, gt=0)
    """Passes over a rollout (TRL ``num_ppo_epochs`` 4; OpenRLHF ``max_epochs`` 1)."""
    max_new_tokens: int = Field(16, gt=0)
    """Response length limit (TRL ``response_length`` 53)."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature; the logits of the trained, old and reference log-probs are
    divided by it too (TRL; OpenRLHF leaves them unscaled)."""
    do_sample: bool = True
    """False: greedy rollouts (tests; no exploration)."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the score of a response that did not end with EOS (TRL's)."""
    reward_model: str | None = None
    """A reward-stage export (``AutoModelForSequenceClassification`` with ``kiln_reward``
    statistics) that scores prompt + response; exactly one of this and ``reward_function``."""
    reward_function: str | None = None
    """``package.module:function``, a rule: response text -> float (not normalised)."""
    critic: Literal["reward_model", "value_head"] | None = None
    """reward_model: a separate critic initialised from the reward model (TRL's default);
    value_head: a linear head on the actor's last hidden state (TRL's legacy
    ``AutoModelForCausalLMWithValueHead``). None: reward_model when there is one."""
    critic_lr_scale: float = Field(1.0, gt=0)
    """The critic's learning rate relative to ``optim.lr`` (one optimizer for both)."""
    vf_coef: float = Field(0.1, ge=0)
    """Loss = policy loss + vf_coef x value loss (TRL)."""
    clip: float = Field(0.2, gt=0, lt=1)
    """Clip range of the probability ratio (TRL ``cliprange``)."""
    value_clip: float = Field(0.2, gt=0)
    """Clip range of the value change (TRL ``cliprange_value``)."""
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL to the reference in the reward (TRL ``kl_estimator`` k1)."""
    kl_coef: float = Field(0.05, ge=0)
    """The KL coefficient (its start, when adaptive)."""
    kl_target: float | None = Field(None, gt=0)
    """Set: the coefficient adapts toward this sequence KL (Ziegler et al.; TRL legacy used 6),
    else it stays ``kl_coef``."""
    kl_horizon: int = Field(10000, gt=0)
    score_clip: float = Field(10.0, gt=0)
    """Normalised scores are clipped to +/- this (OpenRLHF ``reward_clip_range`` 10)."""
    whiten_rewards: bool = False

    @property
    def critic_kind(self) -> str:
        if self.critic is not None:
            return self.critic
        return "reward_model" if self.reward_model else "value_head"


class PPOConfig(RunConfig):
    data: PromptData
    chat: ChatSection = ChatSection()
    peft: PeftSection | None = None
    """null: full fine-tuning (the KL reference is a frozen copy of the parent); lora: adapters
    on the actor (the reference is the actor with them disabled; a separate critic is
    trained in full)."""
    ppo: PPOSection = PPOSection()
    judge: JudgeSection | None = None
    """Held-out prompts answered by the policy and scored by a reward model (default
    ``ppo.reward_model``) at every evaluation: ``eval/reward_mean``, ``eval/kl``..."""

    @property
    def steps_per_iteration(self) -> int:
        """Loop (= optimizer) steps per rollout."""
        return self.ppo.epochs * self.ppo.rollout_size // self.train.global_batch_size

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        yield from pair_stage_problems(self, "ppo", ("ForCausalLM",), "not a causal LM")
        p = self.ppo
        if p.rollout_size % self.train.global_batch_size:
            yield (
                "ppo.rollout_size",
                f"{p.rollout_size} is not a multiple of train.global_batch_size "
                f"({self.train.global_batch_size}): each pass cuts the rollout into whole "
                "minibatches",
            )
        if p.max_new_tokens >= self.data.max_seq_len:
            yield (
                "ppo.max_new_tokens",
                f"{p.max_new_tokens} leaves no room for a prompt in data.max_seq_len "
                f"({self.data.max_seq_len})",
            )
        if (p.reward_model is None) == (p.reward_function is None):
            yield (
                "ppo.reward_model",
                "set exactly one of ppo.reward_model (a reward-stage export) and "
                "ppo.reward_function (package.module:function)",
            )
        if p.reward_function is not None:
            try:
                import_reward(p.reward_function)
            except ValueError as exc:
                yield "ppo.reward_function", str(exc)
        if p.reward_model is not None:
            yield from reward_model_problems(
                Path(p.reward_model), self.init.path, "ppo.reward_model"
            )
        if self.judge is not None and self.judge.reward_model is None and p.reward_model is None:
            yield "judge.reward_model", "required with a rule reward: the export that scores"
        if self.judge is not None and self.judge.reward_model is not None:
            yield from reward_model_problems(
                Path(self.judge.reward_model), self.init.path, "judge.reward_model"
            )
        if p.critic == "reward_model" and p.reward_model is None:
            yield "ppo.critic", "reward_model: no ppo.reward_model to start the critic from"

"""The GRPO run config: the shared runtime sections plus ``data`` (prompts), ``chat`` and
``peft`` (as in DPO) and ``grpo`` (sampling, reward, loss).

Batch sizes count completions: ``train.micro_batch_size`` completions are
``micro_batch_size / group_size`` prompts with their whole groups, so a group is never split
across micro-batches or ranks and its advantages need no collective. Problems known before a
process starts are config problems naming their key: a group size that does not divide the
batch sizes, a reward function that cannot be imported, what DPO checks of the parent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field

from finetune.config import ChatSection, PeftSection, pair_stage_problems
from launcher.config import Section
from launcher.data.examples import ExampleSource
from launcher.hf_dir import SEQUENCE_CLASSIFIER, ConfigFileError, config_problem, read_config
from launcher.run_config import RunConfig


class PromptData(Section):
    """Prompts of the stages that sample their own responses (GRPO, PPO)."""

    train: list[ExampleSource] = Field(min_length=1)
    """Files of ``{prompt: str}`` or ``{messages: [...]}`` records (no final assistant turn)."""
    max_seq_len: int = Field(512, gt=1)
    """Prompt plus completion; a prompt longer than ``max_seq_len - <stage>.max_new_tokens``
    is skipped (``data/skipped_prompt_too_long``)."""
    on_error: Literal["skip", "raise"] = "skip"
    """A bad record: skip and count it (data/skipped_<kind>), or stop at the first one."""
    shuffle: bool = True


class GRPOSection(Section):
    group_size: int = 4
    """Completions sampled per prompt (G); advantages compare the completions of a group."""
    max_new_tokens: int = Field(16, gt=0)
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature, also dividing the logits of the trained log-probs (TRL 1.16's
    default 1.0)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide the group-centred rewards by the group's std, the batch's, or nothing (TRL)."""
    loss: Literal["grpo", "dapo"] = "dapo"
    """dapo: mean over every completion token of the step (TRL 1.16's default); grpo: each
    completion's token mean, averaged over completions."""
    beta: float = Field(0.0, ge=0)
    """KL coefficient (k3 against a frozen copy of the parent); 0, TRL's default, loads no
    reference."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """Clip range below 1 of the probability ratio."""
    epsilon_high: float | None = Field(None, gt=0)
    """Clip range above 1 (DAPO's clip-higher); None: ``epsilon``."""
    num_iterations: int = Field(1, gt=0)
    """Optimizer steps per rollout (TRL's mu, default 1); with more, the ratio to the
    sampling policy moves and the clip by ``epsilon`` binds."""
    reward: str | None = None
    """``package.module:function``, a rule reward: completion text -> float; exactly one of
    this and ``reward_model``."""
    reward_model: str | None = None
    """A reward-stage export that scores prompt + completion (its raw score: advantages
    compare a group's completions, so no normalisation is needed)."""

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class GRPOConfig(RunConfig):
    data: PromptData
    chat: ChatSection = ChatSection()
    peft: PeftSection | None = None
    """null: full fine-tuning; lora: adapters (the KL reference is then the actor with its
    adapters disabled)."""
    grpo: GRPOSection = GRPOSection()

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        yield from pair_stage_problems(self, "grpo", ("ForCausalLM",), "not a causal LM")
        g = self.grpo.group_size
        if g < 2:
            yield "grpo.group_size", f"{g}: advantages compare a group's samples, so it needs >= 2"
            return
        for key in ("global_batch_size", "micro_batch_size"):
            value = getattr(self.train, key)
            if value % g:
                yield (
                    f"train.{key}",
                    f"{value} completions is not a multiple of grpo.group_size ({g}): batch "
                    "sizes count completions and a prompt's group is never split",
                )
        if self.grpo.max_new_tokens >= self.data.max_seq_len:
            yield (
                "grpo.max_new_tokens",
                f"{self.grpo.max_new_tokens} leaves no room for a prompt in data.max_seq_len "
                f"({self.data.max_seq_len})",
            )
        if (self.grpo.reward is None) == (self.grpo.reward_model is None):
            yield (
                "grpo.reward",
                "set exactly one of grpo.reward (package.module:function) and "
                "grpo.reward_model (a reward-stage export)",
            )
        if self.grpo.reward is not None:
            try:
                import_reward(self.grpo.reward)
            except ValueError as exc:
                yield "grpo.reward", str(exc)
        if self.grpo.reward_model is not None:
            path = Path(self.grpo.reward_model)
            yield from reward_model_problems(path, self.init.path, "grpo.reward_model")


def import_reward(spec: str) -> Callable[[str], float]:
    """The function named by ``package.module:function``; ``ValueError`` says why not."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module is the config's problem
        raise ValueError(f"{spec!r}: cannot import {module_name}: {exc}") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"{spec!r}: {module_name} has no function {attr}")
    return function


def reward_model_problems(folder: Path, parent: str | None, key: str) -> Iterable[tuple[str, str]]:
    """A reward model (at config ``key``) must be a sequence classifier of the actor's
    vocabulary (it scores the actor's token ids)."""
    config = folder / "config.json"
    if not config.is_file():
        yield key, f"{folder}: no config.json (expected a reward-stage export)"
        return
    try:
        found = read_config(folder)
    except ConfigFileError as exc:
        yield key, str(exc)
        return
    kinds = found.get("architectures") or []
    if not any(a.endswith(SEQUENCE_CLASSIFIER) for a in kinds):
        yield key, f"{config}: architecture {kinds or 'none'} is not a reward model"
    if parent is None or config_problem(parent) is not None:
        return  # init.path's own check says what is wrong with it
    actor = read_config(parent).get("vocab_size")
    if found.get("vocab_size") != actor:
        yield (
            key,
            f"{config}: vocab_size {found.get('vocab_size')} differs from the actor's ({actor}): "
            "it scores the actor's token ids, so it must share its tokenizer",
        )

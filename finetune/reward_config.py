"""The reward-model run config: the shared runtime sections plus ``data`` (preference pairs),
``chat`` and ``peft`` (as in SFT) and ``reward`` (the loss).

Problems known before a process starts are config problems naming their key (and YAML line):
an ``init.path`` that holds neither a causal LM nor a sequence classifier (the architecture
found is named), PEFT other than LoRA, a ``max_seq_len`` over the parent's positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field, model_validator

from finetune.config import (
    ChatSection,
    HoldOut,
    ParentTokenizer,
    PeftSection,
    pair_stage_problems,
)
from launcher.config import Section
from launcher.data.examples import ExampleSource
from launcher.run_config import BestSection, RunConfig

PARENT_KINDS = ("ForCausalLM", "ForSequenceClassification")


class RewardData(Section):
    train: list[ExampleSource] = Field(min_length=1)
    """Files of ``{prompt | messages, chosen, rejected, margin?}`` records."""
    validation: list[ExampleSource] | HoldOut | None = None
    """Validation files, or {fraction: f} of the training pairs, or none."""
    max_seq_len: int = Field(512, gt=1)
    """A sequence (prompt + response + EOS) longer than this loses prompt tokens from the
    left; a response (with its EOS) longer than this alone is skipped as too_long."""
    on_error: Literal["skip", "raise"] = "skip"
    """A bad record: skip and count it (data/skipped_<kind>), or stop at the first one."""
    shuffle: bool = True


class RewardSection(Section):
    center_coef: float = Field(0.0, ge=0)
    """eta of ``eta * (r_c + r_r)^2`` (TRL's center_rewards_coefficient); 0: off, 0.01
    recommended: keeps the rewards centred on 0 for PPO."""
    margin_field: str = "margin"
    """The record field holding a pair's margin (absent: 0)."""
    head_init_std: float | None = Field(None, gt=0)
    """Std of the new score head (default 1/sqrt(hidden_size + 1))."""


class RewardConfig(RunConfig):
    tokenizer: ParentTokenizer = ParentTokenizer()
    data: RewardData
    chat: ChatSection = ChatSection()
    peft: PeftSection | None = None
    """null: full fine-tuning; {method: lora, ...}: adapters, the score head trained in full."""
    reward: RewardSection = RewardSection()

    @model_validator(mode="after")
    def _best_by_accuracy(self) -> RewardConfig:
        """With a validation set and no ``checkpoint.best``: keep the best eval/accuracy."""
        if self.checkpoint.best is None and self.data.validation is not None and self.eval.every:
            self.checkpoint.best = BestSection(metric="eval/accuracy", mode="max")
        return self

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        yield from pair_stage_problems(
            self,
            "reward",
            PARENT_KINDS,
            "neither a causal LM (*ForCausalLM) nor a sequence classifier "
            "(*ForSequenceClassification)",
        )

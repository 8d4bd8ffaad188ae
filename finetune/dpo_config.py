"""The DPO run config: the reward stage's ``data`` (preference pairs), ``chat`` and ``peft``,
plus ``dpo`` (the loss). The parent must be a causal LM (an SFT or pretraining export)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field, model_validator

from finetune.config import ChatSection, PeftSection, pair_stage_problems
from finetune.judge import JudgeSection
from finetune.reward_config import RewardData
from launcher.config import Section
from launcher.run_config import BestSection, RunConfig


class DPOSection(Section):
    loss: Literal["sigmoid", "robust", "ipo"] = "sigmoid"
    """sigmoid: -log sig(beta z) (Rafailov et al.); robust: label noise ``epsilon`` (Chowdhury
    et al., TRL's "robust"); ipo: TRL 1.16's length-averaged IPO (Azar et al.)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the pull toward the reference (IPO: its target margin is 1/(2 beta))."""
    epsilon: float = Field(0.1, ge=0, lt=0.5)
    """``loss: robust`` only: the assumed share of flipped preference labels."""
    nll_coef: float = Field(0.0, ge=0)
    """Adds ``nll_coef`` x the chosen response's mean token NLL per pair (TRL's rpo_alpha)."""
    reference: Literal["model", "precompute", "none"] = "model"
    """model: the reference scores every batch (a frozen copy of the parent, or with LoRA the
    actor with its adapters disabled); precompute: it scores every training and validation
    pair once before training, the copy is then freed (TRL's precompute_ref_log_probs); none:
    reference-free DPO, log ref = 0 (TRL's reference_free)."""


class DPOConfig(RunConfig):
    data: RewardData
    chat: ChatSection = ChatSection()
    peft: PeftSection | None = None
    """null: full fine-tuning (the reference is a frozen copy of the parent); lora: adapters
    (the reference is the actor with its adapters disabled, no second copy)."""
    dpo: DPOSection = DPOSection()
    judge: JudgeSection | None = None
    """Held-out prompts answered by the policy and scored by a reward model at every
    evaluation (``eval/reward_mean``, ``eval/reward_std``, ``eval/kl`` to the parent)."""

    @model_validator(mode="after")
    def _best_by_accuracy(self) -> DPOConfig:
        """With a validation set and no ``checkpoint.best``: keep the best eval/accuracy."""
        if self.checkpoint.best is None and self.data.validation is not None and self.eval.every:
            self.checkpoint.best = BestSection(metric="eval/accuracy", mode="max")
        return self

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        yield from pair_stage_problems(self, "dpo", ("ForCausalLM",), "not a causal LM")
        if self.judge is not None and self.judge.reward_model is None:
            yield "judge.reward_model", "required: the reward-stage export that scores answers"

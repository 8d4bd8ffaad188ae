"""The model a PPO run trains: actor and critic in one ``nn.Module``, so that one engine and
one optimizer train both (loss = policy loss + vf_coef x value loss, clipped jointly, as TRL's
``PolicyAndValueWrapper``), and the per-token log-probs and values it is scored by.

Two critics: a separate sequence classifier started from the reward model (TRL's default: the
value of a prefix is read from the reward model's head at every position), or a linear head
on the actor's last hidden state (TRL's legacy ``AutoModelForCausalLMWithValueHead``: no
second backbone, the value loss shapes the actor's features too).

Layout of a batch: right-padded rows of prompt + response; ``index`` [B, T] holds, for each
response token t, the position whose output predicts it (prompt length - 1 + t), so that
log-probs and values are gathered as [B, T] response tensors whatever each prompt's length.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from finetune.config import PeftSection
from finetune.peft_setup import wrap
from finetune.reward_model import load_reward_model


def no_dropout(folder: Path) -> dict[str, float]:
    """Config overrides that turn every dropout of the model at ``folder`` off: the old
    log-probs of a rollout and the first minibatch's must be the same function (ratio 1)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return {
        k: 0.0
        for k, v in config.items()
        if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float)
    }


def load_actor(folder: Path, peft: PeftSection | None, seed: int) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **no_dropout(folder))
    return wrap(model, peft, seed)


class ActorCritic(nn.Module):
    """``policy`` (a causal LM, maybe peft-wrapped) and either ``critic`` (a sequence
    classifier with a ``score`` head) or ``value_head`` (on the policy's hidden state).
    ``forward`` returns (logits [B, L, V], values [B, L])."""

    def __init__(
        self,
        policy: nn.Module,
        critic: nn.Module | None = None,
        value_head: nn.Module | None = None,
    ):
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("ActorCritic: give exactly one of critic and value_head")
        self.policy, self.critic, self.value_head = policy, critic, value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if self.value_head is not None:
            out = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_hidden_states=True,
            )
            return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        backbone = self.critic.base_model  # e.g. LlamaForSequenceClassification.model
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return out.logits, self.critic.score(hidden).squeeze(-1)

    def critic_modules(self) -> list[nn.Module]:
        return [m for m in (self.critic, self.value_head) if m is not None]


def build_actor_critic(
    parent: Path,
    peft: PeftSection | None,
    seed: int,
    critic: str,
    reward_model: Path | None,
) -> ActorCritic:
    """The actor from ``parent`` and the critic of kind ``critic`` (``reward_model``: a
    trainable copy of ``reward_model``; ``value_head``: a new head, N(0, 1/sqrt(hidden + 1))
    from a generator seeded by ``seed``, bias 0, the same on every rank)."""
    policy = load_actor(parent, peft, seed)
    if critic == "reward_model":
        pad = json.loads((reward_model / "config.json").read_text()).get("pad_token_id")
        model, _ = load_reward_model(reward_model, pad, seed)
        return ActorCritic(policy, critic=model)
    hidden = policy.config.hidden_size
    head = nn.Linear(hidden, 1)
    digest = hashlib.blake2b(f"{seed}:value_head".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.weight.mul_(1.0 / math.sqrt(hidden + 1))
        head.bias.zero_()
    return ActorCritic(policy, value_head=head)


def gather_responses(
    logits: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T] of the response tokens at ``temperature``, the fp32 logits [B, T, V]
    they come from). Only the response positions go through the softmax."""
    vocab = logits.shape[-1]
    picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, vocab)).float() / temperature
    targets = input_ids.gather(1, index + 1)
    logp = torch.log_softmax(picked, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, picked


def entropy(picked: torch.Tensor) -> torch.Tensor:
    """Per-token entropy [B, T] of the distributions ``picked`` (logits [B, T, V])."""
    logp = torch.log_softmax(picked, -1)
    return -(logp.exp() * logp).sum(-1)


def reward_stats(folder: Path) -> tuple[float, float] | None:
    """The ``kiln_reward`` (mean, std) a reward-stage export saved in its config.json."""
    saved = json.loads((Path(folder) / "config.json").read_text()).get("kiln_reward")
    if not saved or not saved.get("std"):
        return None
    return float(saved["mean"]), float(saved["std"])

"""The held-out judge of the preference stages (DPO, PPO): at every evaluation the policy
answers held-out prompts, a frozen reward model scores the answers, and the policy's KL to the
reference (the SFT parent) is measured on the same answers.

- ``eval/reward_mean`` and ``eval/reward_std``: the reward model's scores of the answers (raw,
  not normalised), so a pipeline's report can say how far the stage moved the policy in
  standard deviations of its parent's rewards (with ``eval.at_start`` the first evaluation is
  the parent's).
- ``eval/kl``: the mean over answers of ``sum_t log pi(y_t) - log pi_ref(y_t)``, answers
  sampled at temperature 1 from the policy: an unbiased estimate of KL(pi || pi_ref) per
  sequence (greedy answers would give a log-ratio, not a KL).

Sampling runs under a forked RNG seeded by ``judge.seed``: every evaluation draws the same
random numbers and the training stream's RNG is untouched (a run with the judge trains the same
steps as one without). Each rank answers ``judge.examples // world_size`` prompts: every rank
makes the same number of ``generate`` calls (ZeRO-3 gathers parameters in each).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from launcher.config import Section
from launcher.data.examples import ExampleSource, read_examples
from launcher.runtime import Runtime


class JudgeSection(Section):
    prompts: list[ExampleSource] = Field(min_length=1)
    """Held-out prompts (``{prompt}`` or ``{messages}`` records, as the RL stages' data)."""
    reward_model: str | None = None
    """A reward-stage export that scores prompt + answer (PPO: default ``ppo.reward_model``)."""
    examples: int = Field(64, gt=0)
    """Prompts answered per evaluation (the first ones; rounded down to whole ranks)."""
    max_new_tokens: int = Field(16, gt=0)
    seed: int = 1234


def left_padded_generate(
    policy: nn.Module,
    prompts: list[torch.Tensor],
    tokenizer,
    max_new_tokens: int,
    device: torch.device,
    sampling: dict,
) -> list[tuple[torch.Tensor, int, bool]]:
    """(prompt + answer ids, prompt length, ended with EOS) per prompt: the prompts generated
    together, left-padded; each answer cut after its first EOS."""
    lengths = [len(ids) for ids in prompts]
    width = max(lengths)
    left = torch.full((len(lengths), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        left[row, width - len(ids) :] = ids
        mask[row, width - len(ids) :] = 1
    out = policy.generate(
        input_ids=left.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        **sampling,
    )
    answers = out[:, width:].cpu()
    is_eos = answers == tokenizer.eos_id
    ended = is_eos.any(1)
    ends = torch.where(ended, is_eos.int().argmax(1) + 1, answers.shape[1])
    return [
        (torch.cat([prompts[i], answers[i, :n]]), lengths[i], bool(ended[i]))
        for i, n in enumerate(ends.tolist())
    ]


def right_padded(rows: list[tuple[torch.Tensor, int, bool]], pad_id: int):
    """(input_ids, attention_mask, start, length) of generated rows, right-padded."""
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, _, _) in enumerate(rows):
        ids[i, : len(row)], attention[i, : len(row)] = row, 1
    start = torch.tensor([s for _, s, _ in rows])
    length = torch.tensor([len(row) - s for row, s, _ in rows])
    return ids, attention, start, length


def answer_logps(model: nn.Module, ids, attention, start, length, device) -> torch.Tensor:
    """Per row, the summed log-probs (temperature 1, fp32) of the answer tokens."""
    logits = model(
        input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False
    ).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
    pos = torch.arange(1, ids.shape[1], device=device)[None, :]
    start, end = start.to(device)[:, None], (start + length).to(device)[:, None]
    return torch.where((pos >= start) & (pos < end), logp, 0.0).sum(1).cpu()


class Judge:
    """Reads the prompts at construction; ``load`` the reward model with the engine (ZeRO-3
    shards it with the others); ``__call__`` at an evaluation."""

    def __init__(self, section: JudgeSection, encoder, runtime: Runtime, micro: int):
        self.section, self.runtime, self.micro = section, runtime, micro
        prompts = read_examples(section.prompts, encoder, key="judge.prompts")
        n = min(section.examples, len(prompts)) // runtime.world_size * runtime.world_size
        if n == 0:
            raise ValueError(
                f"judge.prompts: {len(prompts)} usable prompts, fewer than the "
                f"{runtime.world_size} ranks"
            )
        chosen = prompts.examples[:n][runtime.rank :: runtime.world_size]
        self.prompts = [torch.from_numpy(e.tokens.astype("int64")) for e in chosen]
        self.reward_model: nn.Module | None = None

    def load(self, seed: int, shared: nn.Module | None = None) -> None:
        """The frozen reward model: ``shared`` (PPO's own) or ``judge.reward_model``'s."""
        from finetune.reward_model import load_frozen_reward_model

        if shared is not None and self.section.reward_model is None:
            self.reward_model = shared
        else:
            folder = Path(self.section.reward_model)
            self.reward_model = load_frozen_reward_model(self.runtime, folder, seed)

    def __call__(self, engine: nn.Module, pick, reference, tokenizer) -> dict[str, float]:
        """``engine``: the trained model as the loop holds it; ``pick``: its unwrapped module
        -> the causal LM (PPO: the actor of actor + critic); ``reference``: a factory of the
        context manager giving the frozen reference (``peft_setup.reference_model``)."""
        from finetune.reward_model import score_sequences

        rt, s = self.runtime, self.section
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        rows = []
        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
            torch.manual_seed(s.seed + rt.rank)
            with rt.generating(engine) as module:
                for i in range(0, len(self.prompts), self.micro):
                    chunk = self.prompts[i : i + self.micro]
                    rows += left_padded_generate(
                        pick(module), chunk, tokenizer, s.max_new_tokens, rt.device, sampling
                    )
        policy = pick(getattr(engine, "module", engine))
        scores, kls = [], []
        for i in range(0, len(rows), self.micro):
            ids, attention, start, length = right_padded(rows[i : i + self.micro], tokenizer.pad_id)
            scores.append(score_sequences(self.reward_model, ids, attention, self.micro, rt.device))
            mine = answer_logps(policy, ids, attention, start, length, rt.device)
            with reference() as ref:
                theirs = answer_logps(ref, ids, attention, start, length, rt.device)
            kls.append(mine - theirs)
        score, kl = torch.cat(scores).double(), torch.cat(kls).double()
        sums = torch.stack([
            torch.tensor(float(len(score)), dtype=torch.float64), score.sum(), (score**2).sum(),
            kl.sum(),
        ]).to(rt.device)  # fmt: skip
        rt.all_reduce(sums)
        n, total, squares, kl_total = sums.tolist()
        mean = total / n
        return {
            "eval/reward_mean": mean,
            "eval/reward_std": max(squares / n - mean * mean, 0.0) ** 0.5,
            "eval/kl": kl_total / n,
        }

"""The reward model: the parent with a one-output seeded score head, the pairwise loss, the
pair statistics, and the plain HF model the stage exports.

Rewards are read by the architecture's own pooling (``AutoModelForSequenceClassification``:
decoders the last token that is not ``pad_token_id``). Rows are right-padded with the
tokenizer's pad, which the stage requires to differ from EOS and which never appears inside a
text (``TextTokenizer`` encodes special-token strings as text), so that token is the last
``attention_mask == 1`` position, the EOS ending the response (OpenRLHF's and TRL's choice).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

from finetune.classify_model import init_new

HEAD = ["score.weight"]
"""The head's parameter names in a decoder's sequence classifier (Llama, Mistral, Qwen...)."""


def load_reward_model(
    path: str | Path, pad_id: int, seed: int, std: float | None = None
) -> tuple[nn.Module, list[str]]:
    """The parent at ``path`` (causal LM or sequence classifier) with one output, dropout off,
    fp32; the parameters it did not hold (the head) initialised N(0, std) from generators
    seeded by ``(seed, name)`` (default std 1/sqrt(hidden + 1)), whatever the ZeRO stage.
    Returns the model and those names."""
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        pad_token_id=pad_id,
        attention_dropout=0.0,
        dtype=torch.float32,
        ignore_mismatched_sizes=True,  # a parent classifier with another number of labels
        output_loading_info=True,
    )
    new = sorted(set(info["missing_keys"]) | {k[0] for k in info.get("mismatched_keys", [])})
    if std is None:
        std = 1.0 / math.sqrt(model.config.hidden_size + 1)
    init_new(model, new, seed, std)
    return model, new


def rewards(
    model: nn.Module, batch: dict[str, torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rewards (chosen, rejected) of a pair batch, from one forward over both stacked
    (2B rows right-padded to the longer width)."""
    chosen, rejected = batch["input_ids"], batch["rejected_input_ids"]
    width = max(chosen.shape[1], rejected.shape[1])
    ids = torch.cat([_pad(chosen, width, pad_id), _pad(rejected, width, pad_id)])
    mask = torch.cat(
        [_pad(batch["attention_mask"], width, 0), _pad(batch["rejected_attention_mask"], width, 0)]
    )
    scores = model(input_ids=ids, attention_mask=mask).logits.float()[:, 0]
    return scores[: len(chosen)], scores[len(chosen) :]


@torch.no_grad()
def score_sequences(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, micro: int, device
) -> torch.Tensor:
    """fp32 scores [N] of right-padded rows by a frozen reward model, ``micro`` rows per
    forward (under ZeRO-3 every rank must pass as many rows). Padding becomes the model's own
    ``pad_token_id`` (its pooling reads the last token that is not it), whatever the actor's."""
    pad = getattr(model, "module", model).config.pad_token_id  # an engine under ZeRO-3
    ids = torch.where(attention_mask.bool(), input_ids, pad)
    scores = []
    for i in range(0, len(ids), micro):
        out = model(
            input_ids=ids[i : i + micro].to(device),
            attention_mask=attention_mask[i : i + micro].to(device),
        )
        scores.append(out.logits.float()[:, 0].cpu())
    return torch.cat(scores)


def load_frozen_reward_model(runtime, folder: Path, seed: int) -> nn.Module:
    """A reward-stage export at ``folder``, frozen for this run (``runtime.prepare_frozen``)."""
    import json

    pad = json.loads((Path(folder) / "config.json").read_text()).get("pad_token_id")
    model, _ = load_reward_model(folder, pad, seed)
    return runtime.prepare_frozen(model)


def _pad(rows: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(rows, (0, width - rows.shape[1]), value=value)


def pair_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, eta: float
) -> torch.Tensor:
    """Per pair ``-log sigmoid(r_c - r_r - margin) + eta (r_c + r_r)^2`` (fp32); their mean
    is TRL RewardTrainer's loss with ``center_rewards_coefficient = eta``."""
    chosen, rejected = chosen.float(), rejected.float()
    out = -F.logsigmoid(chosen - rejected - margin.to(chosen))
    if eta:
        out = out + eta * (chosen + rejected) ** 2
    return out


STATS = ("loss", "correct", "pairs", "chosen", "rejected", "chosen2", "rejected2", "diff")


def tally(model: nn.Module, batches: list[dict], pad_id: int, eta: float, device) -> torch.Tensor:
    """Sums over the real pairs of ``batches`` (filler rows, ``example_mask`` False, count for
    nothing), in the order of ``STATS``, float64."""
    sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            real = batch["example_mask"]
            rc, rr = rewards(model, batch, pad_id)
            rc, rr, margin = rc[real].double(), rr[real].double(), batch["margin"][real]
            losses = pair_losses(rc, rr, margin.double(), eta)
            sums += torch.stack(
                [
                    losses.sum(),
                    (rc > rr).sum().double(),  # a tie is an error
                    real.sum().double(),
                    rc.sum(),
                    rr.sum(),
                    (rc**2).sum(),
                    (rr**2).sum(),
                    (rc - rr).sum(),
                ]
            )
    return sums


def metrics_of(sums: torch.Tensor, prefix: str = "eval/") -> dict[str, float]:
    """Loss, accuracy, mean margin, chosen/rejected means, and the mean and (population) std
    of all 2N rewards, from summed ``tally`` values."""
    s = dict(zip(STATS, sums.tolist(), strict=True))
    n = max(s["pairs"], 1.0)
    mean = (s["chosen"] + s["rejected"]) / (2 * n)
    var = max((s["chosen2"] + s["rejected2"]) / (2 * n) - mean**2, 0.0)
    return {
        f"{prefix}loss": s["loss"] / n,
        f"{prefix}accuracy": s["correct"] / n,
        f"{prefix}margin": s["diff"] / n,
        f"{prefix}reward_chosen_mean": s["chosen"] / n,
        f"{prefix}reward_rejected_mean": s["rejected"] / n,
        f"{prefix}reward_mean": mean,
        f"{prefix}reward_std": math.sqrt(var),
        f"{prefix}pairs": s["pairs"],
    }


def plain_model(config: PretrainedConfig, weights: dict[str, torch.Tensor], peft=None) -> nn.Module:
    """A CPU fp32 sequence classifier of ``config`` holding ``weights`` (named as in the trained
    model, peft-wrapped when ``peft``): LoRA merged. Raises ``KeyError`` naming missing or
    unexpected weights."""
    # The class itself, not from_config: under ZeRO-3 that would build it in zero.Init.
    model = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)](config).float()
    if peft is not None:
        from finetune.classify_peft import wrap_peft

        model = wrap_peft(model, peft, HEAD, seed=0)
    weights = {k: v.detach().to("cpu", torch.float32) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise KeyError(f"export: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    if peft is not None:
        model = model.merge_and_unload()
    return model.eval()

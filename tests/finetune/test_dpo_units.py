"""The DPO stage's pieces on a random tiny Llama: the three losses against hand formulas,
ln 2 at policy == reference, padding invariance of the summed log-probs, and the TRL 1.16
``DPOTrainer`` anchor (fp32 settings of /work/shared/NOTES.md "TRL as a numerical anchor")."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from finetune.dpo import dpo_losses, sequence_logps
from finetune.dpo_config import DPOSection
from launcher.data.batches import pad_examples
from launcher.data.examples import Example
from launcher.data.tokenizer import TextTokenizer

from .classify_fixtures import tiny_parent

__all__ = ["tiny_parent"]  # fixture

PROMPT_AND_PAIRS = [  # (prompt ids, chosen ids, rejected ids); the responses end with EOS (2)
    ([5, 6, 7], [8, 9, 2], [10, 2]),
    ([11, 12], [13, 2], [14, 15, 16, 17, 2]),
    ([18, 19, 20, 21], [22, 23, 24, 2], [22, 25, 2]),
]


def example(prompt: list[int], response: list[int], extras: dict | None = None) -> Example:
    tokens = np.array(prompt + response)
    mask = np.array([False] * len(prompt) + [True] * len(response))
    return Example(tokens, mask, extras or {})


PAIRS = [example(p, c, {"rejected": example(p, r)}) for p, c, r in PROMPT_AND_PAIRS]


@pytest.fixture(scope="module")
def model(tiny_parent):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_parent, dtype=torch.float32).eval()


def alone(model, prompt: list[int], response: list[int]) -> float:
    """Summed log-prob of ``response`` after ``prompt``, one unpadded sequence, by hand."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logps[len(prompt) - 1 + i, t]) for i, t in enumerate(response))


def test_summed_logps_match_unpadded_sequences(model, tiny_parent):
    batch = pad_examples(PAIRS, TextTokenizer.load(tiny_parent).pad_id)
    with torch.no_grad():
        (chosen, n_c), (rejected, n_r) = (
            sequence_logps(model, batch, p) for p in ("", "rejected_")
        )
    for i, (p, c, r) in enumerate(PROMPT_AND_PAIRS):
        assert abs(float(chosen[i]) - alone(model, p, c)) < 1e-5
        assert abs(float(rejected[i]) - alone(model, p, r)) < 1e-5
        assert (int(n_c[i]), int(n_r[i])) == (len(c), len(r))  # EOS counted


def test_losses_equal_hand_formulas():
    pi = (torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -6.0]))
    ref = (torch.tensor([-3.5, -7.0]), torch.tensor([-3.0, -6.5]))
    lengths = (torch.tensor([3.0, 2.0]), torch.tensor([4.0, 5.0]))
    beta, eps = 0.2, 0.1
    z = [(-3.0 + 3.5) - (-4.0 + 3.0), (-7.5 + 7.0) - (-6.0 + 6.5)]  # 1.5, -1.0

    def log_sig(x: float) -> float:
        return -math.log1p(math.exp(-x))

    sig = dpo_losses(pi, ref, lengths, DPOSection(loss="sigmoid", beta=beta))
    robust = dpo_losses(pi, ref, lengths, DPOSection(loss="robust", beta=beta, epsilon=eps))
    ipo = dpo_losses(pi, ref, lengths, DPOSection(loss="ipo", beta=beta))
    nll = dpo_losses(pi, ref, lengths, DPOSection(beta=beta, nll_coef=0.5))
    for i in range(2):
        assert abs(float(sig[i]) + log_sig(beta * z[i])) < 1e-6
        want = (-log_sig(beta * z[i]) * (1 - eps) + log_sig(-beta * z[i]) * eps) / (1 - 2 * eps)
        assert abs(float(robust[i]) - want) < 1e-6
        h = (float(pi[0][i] - ref[0][i]) / float(lengths[0][i])) - (
            float(pi[1][i] - ref[1][i]) / float(lengths[1][i])
        )
        assert abs(float(ipo[i]) - (h - 1 / (2 * beta)) ** 2) < 1e-5
        want = -log_sig(beta * z[i]) - 0.5 * float(pi[0][i]) / float(lengths[0][i])
        assert abs(float(nll[i]) - want) < 1e-6


def test_policy_equal_to_reference_gives_ln2(model, tiny_parent):
    batch = pad_examples(PAIRS, TextTokenizer.load(tiny_parent).pad_id)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        pi = [sequence_logps(model, batch, p) for p in ("", "rejected_")]
        ref = [sequence_logps(reference, batch, p)[0] for p in ("", "rejected_")]
    logps, lengths = (pi[0][0], pi[1][0]), (pi[0][1], pi[1][1])
    for loss in ("sigmoid", "robust"):
        out = dpo_losses(logps, tuple(ref), lengths, DPOSection(loss=loss))
        assert (out - math.log(2)).abs().max() < 1e-6, (loss, out)
    ipo = dpo_losses(logps, tuple(ref), lengths, DPOSection(loss="ipo", beta=0.1))
    assert (ipo - 25.0).abs().max() < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_trl_dpo_trainer_gives_kilns_loss(model, tiny_parent, tmp_path, loss):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    trained = copy.deepcopy(model)
    with torch.no_grad():  # move the policy off the reference so the loss is not ln 2
        for p in trained.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    beta = 0.1
    batch = pad_examples(PAIRS, TextTokenizer.load(tiny_parent).pad_id)
    with torch.no_grad():
        pi = [sequence_logps(trained, batch, p) for p in ("", "rejected_")]
        ref = [sequence_logps(model, batch, p)[0] for p in ("", "rejected_")]
        ours = dpo_losses(
            (pi[0][0], pi[1][0]), tuple(ref), (pi[0][1], pi[1][1]), DPOSection(loss=loss, beta=beta)
        ).mean()
    args = DPOConfig(
        output_dir=str(tmp_path), beta=beta, loss_type=loss, bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", per_device_train_batch_size=len(PAIRS),
    )  # fmt: skip
    text = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    trainer = DPOTrainer(
        model=copy.deepcopy(trained),
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=datasets.Dataset.from_list(text),
        processing_class=AutoTokenizer.from_pretrained(tiny_parent),
    )
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PROMPT_AND_PAIRS]
    trl_batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, dict(trl_batch)))
    assert abs(theirs - math.log(2)) > 1e-3  # the anchor is not the trivial point
    assert abs(float(ours) - theirs) < 1e-5, (float(ours), theirs)


def test_lora_reference_is_the_actor_with_adapters_disabled(model, tiny_parent):

    from finetune.config import PeftSection
    from finetune.peft_setup import load_parent, reference_model

    actor = load_parent(tiny_parent, PeftSection(method="lora"), seed=0).eval()
    with torch.no_grad():  # LoRA B starts at zero: move it so the adapters change the output
        for name, p in actor.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    batch = pad_examples(PAIRS, TextTokenizer.load(tiny_parent).pad_id)
    with torch.no_grad():
        with reference_model(None, actor) as ref:
            disabled = sequence_logps(ref, batch)[0]
        enabled = sequence_logps(actor, batch)[0]
        parent = sequence_logps(model, batch)[0]
    assert (disabled - parent).abs().max() < 1e-5
    assert (enabled - parent).abs().max() > 1e-3  # adapters back on after the block

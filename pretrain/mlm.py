"""Masked-language-model pretraining (``objective: mlm``): the pretraining task with BERT's loss.

The same stream, packing and checkpoints as the causal objective; the reader corrupts each
batch (``launcher.data.masking``) and the encoder is trained to recover the chosen tokens with
bidirectional attention inside each packed document. Validation masks the held-out rows once,
with a fixed seed, so every evaluation scores the same positions: masked-token loss, accuracy,
and beside it the accuracy of always answering the most frequent of those tokens
(``eval/baseline_accuracy``), the bar the encoder must clear to show it reads context.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launcher.data.masking import Masker
from launcher.data.validation import IGNORE
from launcher.forward import forward_logits
from launcher.runtime import Runtime
from pretrain.config import PretrainConfig
from pretrain.task import PretrainTask

VALIDATION_MASK_STREAM = 0x6D6C6D
"""Mixed into the run's seed for the validation masks (a stream no reader uses)."""


class MaskedLMTask(PretrainTask):
    """``PretrainTask`` with masked-token loss; ``name`` stays ``pretrain`` (export, Slurm)."""

    def __init__(self, cfg: PretrainConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self._masker = Masker(cfg.mlm, self.tokenizer)
        v = self.validation
        rng = np.random.default_rng([cfg.run.seed, VALIDATION_MASK_STREAM])
        ids, targets = self._masker(v.input_ids, rng, v.segment_ids)
        # the validation set's targets become the masked positions' tokens (IGNORE elsewhere,
        # padding included: it is never maskable)
        self.validation = dataclasses.replace(v, input_ids=ids, targets=targets)

    def masker(self) -> Masker:
        return self._masker

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        # the masked count varies per micro-batch: the loop normalises the summed loss by the
        # step's global count, so every masked token weighs the same
        return int((batch["mlm_targets"] != IGNORE).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = forward_logits(model, batch, causal=False)
        return F.cross_entropy(
            logits.float().flatten(0, 1),
            batch["mlm_targets"].flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        )

    def flops_per_token(self) -> None:
        return None  # no formula for BERT yet: MFU is not reported

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Masked-token loss and accuracy over the validation set (or ``eval.max_batches``
        of it), and the most-frequent-token accuracy on the same positions."""
        rt = self.runtime
        module = getattr(model, "module", model)
        vocab = module.get_input_embeddings().num_embeddings
        totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nats, masked, right
        counts = torch.zeros(vocab, dtype=torch.float64, device=rt.device)
        for batch in self.eval_batches():
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            logits = forward_logits(model, batch, causal=False).float().flatten(0, 1)
            targets = batch["targets"].flatten()
            chosen = targets != IGNORE
            nats = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
            right = (logits.argmax(-1) == targets) & chosen
            totals += torch.stack([nats.double(), chosen.sum().double(), right.sum().double()])
            counts += torch.bincount(targets[chosen], minlength=vocab).double()
        rt.all_reduce(totals)
        rt.all_reduce(counts)
        nats, masked, right = totals.tolist()
        loss = nats / max(masked, 1.0)
        return {
            "eval/loss": loss,
            "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/accuracy": right / max(masked, 1.0),
            "eval/baseline_accuracy": float(counts.max()) / max(masked, 1.0),
            "eval/masked_tokens": masked,
        }

    def summary(self, results: dict[str, float], state) -> list[str]:
        acc, base = results.get("eval/accuracy"), results.get("eval/baseline_accuracy")
        line = (
            f"trained {state.step} steps, {state.tokens:,} tokens; validation masked-token "
            f"loss {results.get('eval/loss', float('nan')):.4f}"
        )
        if acc is not None and base is not None:
            line += f", accuracy {acc:.4f} (most frequent token: {base:.4f})"
        return [line]


def pretrain_task(cfg: PretrainConfig, runtime: Runtime) -> PretrainTask:
    """The pretraining task of ``cfg.objective``."""
    return (MaskedLMTask if cfg.objective == "mlm" else PretrainTask)(cfg, runtime)

"""Pretraining as a task for the shared loop: next-token loss on the packed stream.

Validation reports loss, perplexity and bits per byte: the summed token losses (nats) over the
validation text divided by its UTF-8 bytes and by ln 2, so runs with different tokenizers
compare; beside it the unigram baseline of the same tokens (``eval/unigram_bits_per_byte``).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from launcher.data.loader import StreamLoader
from launcher.data.sources import resolve_corpus
from launcher.data.tokenizer import TextTokenizer
from launcher.data.validation import IGNORE, build_validation
from launcher.forward import forward_logits
from launcher.metrics import record
from launcher.runtime import Runtime
from launcher.task import Task
from pretrain.config import PretrainConfig
from pretrain.model import build_model, flops_per_token


def unigram_bits(counts: torch.Tensor) -> float:
    """The bits the best unigram model of these token counts needs for them (their own
    frequencies: no unigram model, not even one fitted to the training stream, does better):
    the baseline ``eval/bits_per_byte`` must beat to show the model learned context."""
    counts = counts[counts > 0].double()
    total = counts.sum()
    return float(-(counts * torch.log2(counts / total)).sum())


class PretrainTask(Task):
    name = "pretrain"
    cfg: PretrainConfig
    _unigram_bpb: float | None = None  # the validation set's baseline, computed once

    def __init__(self, cfg: PretrainConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.tokenizer = TextTokenizer.load(cfg.run_dir / "tokenizer")
        self.corpus = resolve_corpus(cfg.data)
        self.validation = build_validation(cfg.data, self.corpus, self.tokenizer)
        self.loader: StreamLoader | None = None

    def summary(self, results: dict[str, float], state) -> list[str]:
        bpb = results.get("eval/bits_per_byte")
        return [
            f"trained {state.step} steps, {state.tokens:,} tokens; "
            f"validation loss {results.get('eval/loss', float('nan')):.4f}"
            + (f", bits per byte {bpb:.4f}" if bpb is not None else "")
        ]

    def build_model(self) -> nn.Module:
        tok = self.tokenizer
        return build_model(
            self.cfg.model,
            seed=self.cfg.run.seed,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )

    def train_batches(self) -> StreamLoader:
        rt = self.runtime
        self.loader = StreamLoader(
            self.cfg.data,
            self.tokenizer,
            self.corpus,
            batch_size=self.cfg.train.micro_batch_size,
            seed=self.cfg.run.seed,
            rank=rt.rank,
            world_size=rt.world_size,
            masker=self.masker(),
        )
        return self.loader

    def masker(self):
        """What corrupts the training batches in the reader (the masked-LM objective)."""
        return None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = forward_logits(model, batch)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())

    def tokens_per_sequence(self) -> int:
        return self.cfg.data.seq_len

    def flops_per_token(self) -> float | None:
        return flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def on_log(self) -> None:
        if self.loader is None:
            return
        for name, value in self.loader.stats().items():
            record(name, value, reduce="mean" if name.startswith("data/mix/") else "sum")

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's validation batches (every rank as many), at most ``eval.max_batches``."""
        rt = self.runtime
        batches = self.validation.batches(rt.rank, rt.world_size, self.cfg.train.micro_batch_size)
        return batches[: self.cfg.eval.max_batches]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte over the whole validation set."""
        rt = self.runtime
        batches = self.eval_batches()
        totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
        full = self.cfg.eval.max_batches is None
        module = getattr(model, "module", model)  # an engine's model
        vocab = module.get_input_embeddings().num_embeddings  # the model's rows (>= tokenizer's)
        counts = None
        if full and self._unigram_bpb is None:
            counts = torch.zeros(vocab, dtype=torch.float64, device=rt.device)
        for batch in batches:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            logits = forward_logits(model, batch).float()
            targets = batch["targets"].flatten()
            if counts is not None:
                kept = targets[targets != IGNORE]
                counts += torch.bincount(kept, minlength=vocab).double()
            nats = F.cross_entropy(
                logits.flatten(0, 1), targets, ignore_index=IGNORE, reduction="sum"
            )
            totals += torch.stack([nats.double(), (targets != IGNORE).sum().double()])
        rt.all_reduce(totals)
        nats, tokens = totals.tolist()
        loss = nats / max(tokens, 1.0)
        out = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
        if full:  # bytes are known for the whole set only
            out["eval/bits_per_byte"] = nats / self.validation.text_bytes / math.log(2)
            if counts is not None:
                rt.all_reduce(counts)
                self._unigram_bpb = unigram_bits(counts) / self.validation.text_bytes
            out["eval/unigram_bits_per_byte"] = self._unigram_bpb
        return out

    def export(self, model: nn.Module, state_dict: dict | None, out: Path) -> None:
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save(out, model_max_length=self.cfg.model.max_seq_len)
        if model.can_generate():  # an encoder has no generation config
            model.generation_config.save_pretrained(out)

    def save_extras(self, folder: Path) -> list[str]:
        shutil.copytree(self.cfg.run_dir / "tokenizer", folder / "tokenizer")
        return sorted(
            str(p.relative_to(folder)) for p in (folder / "tokenizer").rglob("*") if p.is_file()
        )

    def state_dict(self) -> dict:
        return {"data": self.loader.state_dict()} if self.loader is not None else {}

    def load_state_dict(self, states: list[dict]) -> None:
        if self.loader is None:
            raise RuntimeError("load the task state after train_batches() made the loader")
        self.loader.load_state_dict([s["data"] for s in states])

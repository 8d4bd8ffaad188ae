"""The validation split: the same documents, in the same order, for every run and world size.

Documents come from the training sources' held-out share (a fixed hash of the document id,
see ``sources.is_held_out``; the training stream skips them), read in file order, and from
any separate validation files. They are packed like training data; the last sequence is
padded (targets ``IGNORE``). ``text_bytes`` is the UTF-8 size of the documents, the
denominator of bits per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pretrain.data.config import DataConfig
from pretrain.data.documents import CorpusError, scan
from pretrain.data.sources import ResolvedCorpus, ResolvedSource, is_held_out, resolve_sources
from pretrain.tokenizer import TextTokenizer

IGNORE = -100
"""Target of padding positions (torch's cross_entropy ignore_index)."""


@dataclass
class ValidationSet:
    input_ids: np.ndarray  # [n, seq_len] int64
    targets: np.ndarray  # [n, seq_len] int64, IGNORE on padding
    documents: int
    text_bytes: int

    @property
    def target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def batches(self, rank: int, world_size: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share, padded with all-ignored rows so that every rank runs the same
        number of batches (ZeRO-3 needs every rank in every forward)."""
        per_step = world_size * batch_size
        n = len(self.input_ids)
        padded = -(-n // per_step) * per_step
        ids = np.full((padded, self.input_ids.shape[1]), 0, dtype=np.int64)
        targets = np.full_like(ids, IGNORE)
        ids[:n], targets[:n] = self.input_ids, self.targets
        mine = slice(rank, padded, world_size)
        ids, targets = ids[mine], targets[mine]
        return [
            {
                "input_ids": torch.from_numpy(ids[i : i + batch_size].copy()),
                "targets": torch.from_numpy(targets[i : i + batch_size].copy()),
            }
            for i in range(0, len(ids), batch_size)
        ]


def _documents(source: ResolvedSource, fraction: float | None, limit: int):
    """Up to ``limit`` texts of a source, in file order: the held-out ones if ``fraction``."""
    taken = 0
    for path in source.files:
        try:
            for doc, _ in scan(path, format=source.format, text_field=source.text_field):
                if isinstance(doc, CorpusError):
                    continue  # the training stream counts bad records; validation just skips
                if fraction is not None and not is_held_out(doc, fraction):
                    continue
                yield doc.text
                taken += 1
                if taken >= limit:
                    return
        except CorpusError:
            continue


def build_validation(
    cfg: DataConfig, corpus: ResolvedCorpus, tokenizer: TextTokenizer
) -> ValidationSet:
    """Read, tokenize and pack the validation documents (before training starts)."""
    vcfg = cfg.validation
    texts: list[str] = []
    if vcfg.fraction > 0:
        for source in corpus.sources:
            limit = max(1, round(vcfg.max_docs * source.weight))
            texts.extend(_documents(source, vcfg.fraction, limit))
    if vcfg.sources:
        extra = resolve_sources(vcfg.sources, key="data.validation.sources", on_error=cfg.on_error)
        for source in extra.sources:
            if len(texts) < vcfg.max_docs:
                texts.extend(_documents(source, None, vcfg.max_docs - len(texts)))
    if not texts:
        raise CorpusError(
            "no validation documents: data.validation.fraction found none among the training "
            "files; raise it or list data.validation.sources"
        )
    prefix = [tokenizer.bos_id] if cfg.add_bos else []
    stream = np.concatenate(
        [
            np.array([*prefix, *ids, tokenizer.eos_id], dtype=np.int64)
            for ids in tokenizer.encode_batch(texts)
        ]
    )
    L = cfg.seq_len
    n = max(1, -(-(len(stream) - 1) // L))
    padded = np.full(n * L + 1, tokenizer.pad_id, dtype=np.int64)
    padded[: len(stream)] = stream
    windows = np.lib.stride_tricks.sliding_window_view(padded, L + 1)[::L]
    targets = windows[:, 1:].copy()
    targets.reshape(-1)[len(stream) - 1 :] = IGNORE
    return ValidationSet(
        input_ids=windows[:, :-1].copy(),
        targets=targets,
        documents=len(texts),
        text_bytes=sum(len(t.encode("utf-8")) for t in texts),
    )

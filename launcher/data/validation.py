"""The validation split: the same documents, in the same order, for every run and world size.

Documents come from the training sources' held-out share (a fixed hash of the document id,
see ``sources.is_held_out``; the training stream skips them), read in file order, and from
any separate validation files. They are packed by the training packer (with
``data.document_boundaries`` the rows carry the same ``position_ids``/``segment_ids``, so
evaluation sees documents exactly as training does); the last sequence is padded (targets
``IGNORE``, a segment of its own). ``text_bytes`` is the UTF-8 size of the documents, the
denominator of bits per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from launcher.data.config import DataConfig
from launcher.data.documents import CorpusError, scan
from launcher.data.packing import Packer, Piece
from launcher.data.sources import ResolvedCorpus, ResolvedSource, is_held_out, resolve_sources
from launcher.data.tokenizer import TextTokenizer

IGNORE = -100
"""Target of padding positions (torch's cross_entropy ignore_index)."""


@dataclass
class ValidationSet:
    input_ids: np.ndarray  # [n, seq_len] int64
    targets: np.ndarray  # [n, seq_len] int64, IGNORE on padding
    documents: int
    text_bytes: int
    position_ids: np.ndarray | None = None  # [n, seq_len] int64, with document boundaries only
    segment_ids: np.ndarray | None = None  # [n, seq_len] int64, with document boundaries only

    @property
    def target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def batches(self, rank: int, world_size: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share, padded with all-ignored rows so that every rank runs the same
        number of batches (ZeRO-3 needs every rank in every forward). Batches hold
        ``input_ids`` and ``targets``, plus ``position_ids`` and ``segment_ids`` when the set
        was packed with document boundaries."""
        per_step = world_size * batch_size
        n, seq_len = self.input_ids.shape
        padded = -(-n // per_step) * per_step
        arrays = {"input_ids": self.input_ids, "targets": self.targets}
        if self.segment_ids is not None:
            arrays |= {"position_ids": self.position_ids, "segment_ids": self.segment_ids}
        mine = slice(rank, padded, world_size)
        out: dict[str, np.ndarray] = {}
        for key, rows in arrays.items():
            full = np.full((padded, seq_len), IGNORE if key == "targets" else 0, dtype=np.int64)
            full[:n] = rows
            if key == "position_ids":
                full[n:] = np.arange(seq_len)  # padding rows: one plain causal segment
            out[key] = full[mine]
        return [
            {k: torch.from_numpy(v[i : i + batch_size].copy()) for k, v in out.items()}
            for i in range(0, len(out["input_ids"]), batch_size)
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
    documents = [[*prefix, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    rows = pack_documents(documents, cfg.seq_len, cfg.document_boundaries, tokenizer.pad_id)
    return ValidationSet(
        **rows,
        documents=len(texts),
        text_bytes=sum(len(t.encode("utf-8")) for t in texts),
    )


def pack_documents(
    documents: list[list[int]], seq_len: int, boundaries: bool, pad_id: int
) -> dict[str, np.ndarray]:
    """Pack token lists (each a whole document) into ``seq_len`` rows with the training
    ``Packer``; the last row is filled with ``pad_id`` whose targets are ``IGNORE``.

    Returns ``input_ids`` and ``targets`` (plus ``position_ids`` and ``segment_ids`` when
    ``boundaries``), each ``[rows, seq_len]`` int64. Raises ``ValueError`` when there are
    no tokens at all.
    """
    total = sum(len(d) for d in documents)
    if total == 0:
        raise ValueError("pack_documents: no tokens to pack")
    packer = Packer(seq_len, boundaries=boundaries)
    rows: list[dict[str, np.ndarray]] = []
    for key, tokens in enumerate(documents):
        packer.add(Piece.document(tokens, 0, key))
        while packer.ready():
            rows.append(packer.pop())
    left = total - len(rows) * seq_len  # tokens still in the packer (>= 1: the overlap token)
    if left > 1 or not rows:  # the rest still has targets (or there is no row yet): pad it
        packer.add(Piece.document([pad_id] * (seq_len + 1 - left), 0, -1))
        rows.append(packer.pop())
    keys = ["input_ids", "targets"] + (["position_ids", "segment_ids"] if boundaries else [])
    out = {k: np.stack([r[k] for r in rows]).astype(np.int64) for k in keys}
    # Every stream token but the first is a target once: the ones after the stream are padding.
    out["targets"].reshape(-1)[total - 1 :] = IGNORE
    return out

"""The pretraining run config: the shared runtime sections plus model, tokenizer and data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

from launcher.data.masking import MaskingConfig
from launcher.data.tokenizer import TokenizerConfig
from launcher.run_config import RunConfig
from pretrain.data.config import PretrainDataConfig
from pretrain.model import ModelConfig


class PretrainConfig(RunConfig):
    model: ModelConfig
    """The decoder; a preset name (`model: small`) or its fields."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: PretrainDataConfig = PretrainDataConfig()
    objective: Literal["causal", "mlm"] = "causal"
    """``causal``: next-token prediction (a Llama decoder); ``mlm``: masked-token prediction
    (a BERT encoder, ``model.arch: bert``), which needs ``data.add_bos`` (BOS is each
    document's [CLS] position) and ``data.document_boundaries`` (attention stays inside a
    document)."""
    mlm: MaskingConfig = MaskingConfig()
    """Masking of the ``mlm`` objective (BERT's 15% with 80/10/10)."""

    loads_init: ClassVar[bool] = False  # the seeded init of `model` (distill loads init.path)

    def model_width(self) -> int | None:
        return self.model.d_model

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        yield from self._objective_problems()
        if self.data.seq_len > self.model.max_seq_len:
            yield (
                "data.seq_len",
                f"{self.data.seq_len} is longer than model.max_seq_len "
                f"({self.model.max_seq_len}); lower data.seq_len or raise model.max_seq_len",
            )
        if self.tokenizer.path is None and self.tokenizer.vocab_size > self.model.vocab_size:
            yield (
                "tokenizer.vocab_size",
                f"{self.tokenizer.vocab_size} is larger than model.vocab_size "
                f"({self.model.vocab_size}): the model would have no embedding for the extra "
                "tokens; lower tokenizer.vocab_size or raise model.vocab_size",
            )

    def _objective_problems(self) -> Iterable[tuple[str, str]]:
        arch = self.model.arch
        if self.objective == "mlm" and arch != "bert":
            yield (
                "objective",
                f"mlm trains an encoder, and model.arch is {arch!r}: use a bert preset "
                "(model: tiny-bert) or set model.arch: bert",
            )
        if self.objective == "causal" and arch == "bert":
            yield (
                "model.arch",
                "bert is an encoder with a masked-LM head: it needs objective: mlm "
                "(or a llama preset for the causal objective)",
            )
        if self.objective != "mlm":
            return
        if not self.data.add_bos:
            yield (
                "data.add_bos",
                "objective mlm needs true: BOS is each document's [CLS] position, the one a "
                "classifier pools",
            )
        if not self.data.document_boundaries:
            yield (
                "data.document_boundaries",
                "objective mlm needs true: attention is bidirectional, and without boundaries "
                "every token would see the other documents packed in its row",
            )

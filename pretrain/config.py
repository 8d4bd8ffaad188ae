"""The pretraining run config: the shared runtime sections plus model, tokenizer and data."""

from __future__ import annotations

from collections.abc import Iterable

from launcher.data.tokenizer import TokenizerConfig
from launcher.run_config import RunConfig
from pretrain.data.config import PretrainDataConfig
from pretrain.model import ModelConfig


class PretrainConfig(RunConfig):
    model: ModelConfig
    """The decoder; a preset name (`model: small`) or its fields."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: PretrainDataConfig = PretrainDataConfig()

    def model_width(self) -> int | None:
        return self.model.d_model

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
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

"""Pretraining's `data:` section: the stream's, plus the generated built-in corpus."""

from __future__ import annotations

from pathlib import Path

from launcher.data.config import DataConfig, SourceConfig
from pretrain.data.builtin import BuiltinCorpusConfig


class PretrainDataConfig(DataConfig):
    builtin: BuiltinCorpusConfig | None = None
    """Generate the project's own seeded corpus and train on it (no data needed)."""

    def all_sources(self) -> list[SourceConfig]:
        """The configured sources, plus the built-in corpus when enabled."""
        sources = list(self.sources)
        if self.builtin is not None:
            pattern = str(Path(self.builtin.dir) / "shard-*.jsonl.gz")
            sources.append(SourceConfig(name="builtin", paths=[pattern]))
        return sources

    def no_sources_hint(self) -> str:
        return (
            "no training data: list data.sources, or set `data.builtin: {}` to use the "
            "generated corpus"
        )

"""The SFT run config: the shared runtime sections plus data, chat and peft."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field

from launcher.config import Section
from launcher.data.examples import ExampleSource
from launcher.hf_dir import (
    ConfigFileError,
    architectures,
    config_problem,
    is_architecture,
    read_config,
)
from launcher.run_config import RunConfig


class HoldOut(Section):
    fraction: float = Field(..., gt=0, lt=1)
    """Share of the training examples held out for validation (a seeded choice)."""


class SFTDataSection(Section):
    train: list[ExampleSource] = Field(min_length=1)
    """Sources of chats ({"messages": [{"role", "content"}]}) or {"prompt", "completion"}."""
    validation: list[ExampleSource] | HoldOut | None = None
    """Validation sources, or {fraction: f} of the training examples, or none."""
    max_seq_len: int = Field(512, gt=1)
    """Examples are cut to this many tokens (a packed row holds this many)."""
    packing: bool = False
    """Pack whole examples into rows of max_seq_len tokens (best fit), else right-pad."""
    on_error: Literal["skip", "raise"] = "skip"
    """A bad record: skip and count it (data/skipped_<kind>), or stop at the first one."""
    shuffle: bool = True
    """A seeded permutation of the examples each epoch."""


class ParentTokenizer(Section):
    """The parent's tokenizer (``init.path``), its special tokens named when they are not
    found by name (a BERT tokenizer: ``eos_token: "[SEP]"``)."""

    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    """Padding token, of the vocabulary; a decoder that scores or classifies needs one
    distinct from the end-of-text token (it pools the last token that is not padding)."""


class ChatSection(Section):
    template: Literal["default", "tokenizer"] = "default"
    """default: plain-text role headers, the tokenizer's EOS ends each turn (no new tokens);
    tokenizer: the chat template of the parent's tokenizer_config.json."""


class PeftSection(Section):
    method: Literal["lora", "prefix", "prompt"] = "lora"
    r: int = Field(8, gt=0)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    """LoRA: the linear layers that get adapters."""
    num_virtual_tokens: int = Field(8, gt=0)
    """Prefix / prompt tuning: learned virtual tokens."""


class GenerationEval(Section):
    exact_match: int = Field(0, ge=0)
    """Validation examples answered greedily at every evaluation, the answer compared with
    the reference (the first assistant turn, spaces at the ends ignored): ``eval/exact_match``.
    0: none."""
    max_new_tokens: int = Field(32, gt=0)


class SFTConfig(RunConfig):
    data: SFTDataSection
    chat: ChatSection = ChatSection()
    generation: GenerationEval = GenerationEval()
    peft: PeftSection | None = None
    """null: full fine-tuning; else {method: lora|prefix|prompt, ...}."""

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        if self.init.path is None:
            yield "init.path", "SFT starts from a model: set init.path to an HF directory"
            return
        folder = Path(self.init.path)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            return  # InitSection reports it
        if not (folder / "tokenizer.json").is_file():
            yield "init.path", f"{folder}: no tokenizer.json (SFT needs the parent's tokenizer)"
        limit = parent_max_positions(folder)
        if limit is not None and self.data.max_seq_len > limit:
            yield (
                "data.max_seq_len",
                f"{self.data.max_seq_len} is over the model's max_position_embeddings "
                f"({limit}, {folder / 'config.json'}); use at most {limit}",
            )
        if self.data.packing and self.peft is not None and self.peft.method == "prompt":
            yield (
                "data.packing",
                "prompt tuning prepends virtual tokens to each row, so packed examples "
                "would share them; set data.packing: false",
            )


def parent_max_positions(folder: Path) -> int | None:
    """``max_position_embeddings`` of an HF directory's config.json, if it says."""
    try:
        value = read_config(folder).get("max_position_embeddings")
    except ConfigFileError:
        return None
    return value if isinstance(value, int) else None


def pair_stage_problems(cfg, stage: str, kinds: tuple[str, ...], wanted: str):
    """The config problems the reward and DPO stages share: ``init.path`` set, an HF directory
    with a tokenizer whose architecture ends with one of ``kinds`` (``wanted`` describes them
    in the message), LoRA as the only PEFT method, ``data.max_seq_len`` within the parent's
    positions. Yields (key, message)."""
    if cfg.init.path is None:
        yield "init.path", "required: the HF model directory (SFT or pretraining export)"
        return
    if cfg.peft is not None and cfg.peft.method != "lora":
        yield "peft.method", f"{cfg.peft.method}: the {stage} stage supports lora only"
    folder = Path(cfg.init.path)
    if not (folder / "config.json").is_file() or config_problem(folder) is not None:
        return  # InitSection reports it
    if not (folder / "tokenizer.json").is_file():
        yield "init.path", f"{folder}: no tokenizer.json (the stage needs its tokenizer)"
    found = architectures(folder)
    if not is_architecture(folder, kinds):
        yield "init.path", f"{folder / 'config.json'}: architecture {found or 'none'} is {wanted}"
    limit = parent_max_positions(folder)
    if limit is not None and cfg.data.max_seq_len > limit:
        yield (
            "data.max_seq_len",
            f"{cfg.data.max_seq_len} is over the model's max_position_embeddings ({limit})",
        )

"""The distillation run config: pretraining's (model, tokenizer, data...) plus ``teacher`` (the
frozen causal LM whose distribution the student learns) and ``distill`` (the loss mix).

Decisions, so that a run cannot silently train against the wrong vocabulary:
- ``tokenizer.path`` unset: it becomes ``teacher.path`` (the teacher's logits index the
  teacher's tokens, so the student reads the same ids); set: its ``tokenizer.json`` must have
  the teacher's content, else a config error naming both files.
- ``init.path`` set (a pruned or smaller export): the student starts from its weights, and
  the ``model`` section takes that directory's shape (config.json), whatever the recipe said.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from launcher.config import Section
from launcher.hf_dir import CAUSAL_LM, architectures, is_architecture
from launcher.run_config import InitSection
from pretrain.config import PretrainConfig

LLAMA_SHAPE = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_size": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
    "norm_eps": "rms_norm_eps",
}
"""``ModelConfig`` field -> the Llama ``config.json`` key it is read from (``init.path``)."""


class TeacherSection(InitSection):
    path: str = Field(..., min_length=1)  # type: ignore[assignment]
    """The teacher: an HF causal LM directory (e.g. a pretraining run's runs/NAME/hf/)."""

    def problems(self) -> Iterable[tuple[str, str]]:
        found = list(super().problems())
        yield from found
        if found:
            return
        if not is_architecture(self.path, CAUSAL_LM):
            kinds = architectures(self.path)
            yield "path", f"{self.path}: {kinds or 'no architectures'}, not a causal LM"


class DistillSection(Section):
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the distillation term; 1 - alpha weighs the next-token cross-entropy."""
    temperature: float = Field(2.0, gt=0)
    """Softens both distributions in the KL term (its gradient is rescaled by T^2)."""


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` a tokenizer path means (a directory holding it, or the file)."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two ``tokenizer.json`` files hold the same tokenizer (JSON content, so that
    formatting alone never counts as a difference)."""
    if a.resolve() == b.resolve():
        return True
    return json.loads(a.read_text()) == json.loads(b.read_text())


class DistillConfig(PretrainConfig):
    teacher: TeacherSection
    distill: DistillSection = DistillSection()
    loads_init: ClassVar[bool] = True  # the student: a pruned export, or the seeded preset

    @model_validator(mode="before")
    @classmethod
    def _student_shape_from_init(cls, data: Any) -> Any:
        """With ``init.path``: the ``model`` section takes the shape of its config.json (an
        unreadable one is left to ``init.path``'s own problem)."""
        if not isinstance(data, dict):
            return data
        init = data.get("init") or {}
        path = init.get("path") if isinstance(init, dict) else None
        if not path:
            return data
        try:
            config = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError):
            return data
        if config.get("model_type") != "llama":
            return data
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        shape = {field: config[key] for field, key in LLAMA_SHAPE.items() if key in config}
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope or "rope_theta" in config:
            shape["rope_theta"] = rope.get("rope_theta", config.get("rope_theta"))
        return {**data, "model": {**model, "arch": "llama", **shape}}

    @model_validator(mode="after")
    def _tokenizer_from_teacher(self) -> DistillConfig:
        """No ``tokenizer.path``: the teacher's tokenizer (its logits index its tokens)."""
        if self.tokenizer.path is None:
            self.tokenizer.path = self.teacher.path
        return self

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        if self.objective != "causal":
            yield "objective", "distillation trains a causal student: set objective: causal"
        teacher = tokenizer_file(self.teacher.path)
        if not teacher.is_file() or self.tokenizer.path is None:
            if Path(self.teacher.path).is_dir():
                yield "teacher.path", f"{teacher}: missing (the teacher's tokenizer is needed)"
            return
        mine = tokenizer_file(self.tokenizer.path)
        if not mine.is_file():
            yield "tokenizer.path", f"{mine}: no such tokenizer file"
        elif not same_tokenizer(teacher, mine):
            yield (
                "tokenizer.path",
                f"{mine} and the teacher's {teacher} are different tokenizers: the student "
                "must read the teacher's token ids; drop tokenizer.path (it defaults to "
                "teacher.path) or point it at the teacher's tokenizer",
            )

"""The classification run config: the shared runtime sections plus ``tokenizer``, ``data`` and
``classify`` (what to train: head, loss, early stopping, layer-wise rates, freezing, PEFT).

Every problem that can be known before a process starts is a config problem naming its key
(and YAML line): a ``class_weights`` label that the training files do not hold (the training
labels are read for that, a label field per record), ``layer_decay`` outside (0, 1],
``patience`` without an evaluation per epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from finetune.config import ParentTokenizer, parent_max_positions
from launcher.config import Section
from launcher.data.examples import ExampleSource
from launcher.run_config import BestSection, RunConfig


class ClassifyData(Section):
    train: list[ExampleSource] = Field(min_length=1)
    """Files of ``{text, label}`` records (jsonl, jsonl.gz/zst, parquet)."""
    validation: list[ExampleSource] | None = None
    """Validation files; none: ``validation_fraction`` of the training records."""
    test: list[ExampleSource] | None = None
    """Test files; none: ``test_fraction`` of the training records."""
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    """Seed of the hash that assigns a record to train/validation/test (by its text)."""
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = Field(128, gt=1)
    """Texts are cut to this many tokens (special tokens included)."""
    on_error: Literal["skip", "raise"] = "skip"
    """skip: count and log bad records (data/skipped_<kind>); raise: stop at the first."""
    log_bad_records: int = Field(5, ge=0)

    def problems(self) -> Iterable[tuple[str, str]]:
        held = (self.validation is None) * self.validation_fraction
        held += (self.test is None) * self.test_fraction
        if held >= 1:
            yield "validation_fraction", "validation and test fractions leave no training data"


class PeftSection(Section):
    method: Literal["lora", "prefix", "prompt"] = "lora"
    r: int = Field(8, gt=0)
    """LoRA rank."""
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    """LoRA: module names to adapt (default: peft's choice for the architecture)."""
    num_virtual_tokens: int = Field(8, gt=0)
    """Prefix / prompt tuning: number of virtual tokens."""


class ClassifySection(Section):
    patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations (epochs) without an improvement of ``best_metric``
    by more than ``min_delta``; null: no early stopping. Needs ``eval.every: epoch``."""
    min_delta: float = Field(0.0, ge=0)
    best_metric: str = "eval/macro_f1"
    """The validation metric that picks the exported checkpoint and drives early stopping."""
    best_mode: Literal["max", "min"] = "max"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    """none; balanced (n / (classes x count), as scikit-learn); or {label: weight}, 1 for the
    labels not named."""
    layer_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise learning rates: a layer's rate is lr x layer_decay ** (its depth from the
    top); the head and final norm 1, the embeddings the deepest."""
    freeze: Literal["none", "backbone"] = "none"
    """backbone: train the new head only (requires_grad False for the rest)."""
    unfreeze_every: int | None = Field(None, gt=0)
    """Gradual unfreezing: the head trains first, one more layer from the top every this
    many epochs (the others run at learning rate 0)."""
    head_init_std: float | None = Field(None, gt=0)
    """Std of the new head's weights (default: the parent's initializer_range)."""
    peft: PeftSection | None = None
    """Train adapters (LoRA, prefix, prompt) instead of the backbone; the head is trained
    in full (``modules_to_save``)."""

    def problems(self) -> Iterable[tuple[str, str]]:
        if self.freeze == "backbone" and self.unfreeze_every is not None:
            yield "unfreeze_every", "freeze: backbone never unfreezes; use one of the two"
        if self.peft is not None and (self.freeze != "none" or self.unfreeze_every):
            yield "peft", "PEFT freezes the backbone itself; drop freeze / unfreeze_every"


class ClassifyConfig(RunConfig):
    tokenizer: ParentTokenizer = ParentTokenizer()
    data: ClassifyData
    classify: ClassifySection = ClassifySection()

    @model_validator(mode="after")
    def _best_from_classify(self) -> ClassifyConfig:
        """The best checkpoint is the classify section's metric (early stopping's too)."""
        if self.checkpoint.best is None:
            c = self.classify
            self.checkpoint.best = BestSection(metric=c.best_metric, mode=c.best_mode)
        return self

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        c = self.classify
        if self.init.path is None:
            yield "init.path", "required: the HF model directory to fine-tune"
        else:
            # an encoder's learned positions end there (an index error past it, not a warning)
            limit = parent_max_positions(Path(self.init.path))
            if limit is not None and self.data.max_length > limit:
                yield (
                    "data.max_length",
                    f"{self.data.max_length} is over the model's max_position_embeddings "
                    f"({limit}, {Path(self.init.path) / 'config.json'}); use at most {limit}",
                )
        if c.patience is not None and self.eval.every != "epoch":
            yield (
                "classify.patience",
                f"early stopping counts evaluations per epoch, but eval.every is "
                f"{self.eval.every!r}; set eval.every: epoch",
            )
        if c.unfreeze_every is not None and self.train.epochs is None:
            yield "classify.unfreeze_every", "gradual unfreezing counts epochs: set train.epochs"
        best = self.checkpoint.best
        if best is not None and (best.metric, best.mode) != (c.best_metric, c.best_mode):
            yield (
                "checkpoint.best",
                f"{best.metric} ({best.mode}) differs from classify.best_metric "
                f"{c.best_metric} ({c.best_mode}); set only classify.best_metric",
            )
        if isinstance(c.class_weights, dict):
            yield from self._weight_problems(c.class_weights)

    def _weight_problems(self, weights: dict[str, float]) -> Iterable[tuple[str, str]]:
        from finetune.classify_data import training_labels  # reads the label fields only

        for label, weight in weights.items():
            if weight <= 0:
                yield f"classify.class_weights.{label}", f"{weight} must be positive"
        labels = training_labels(self.data)
        if not labels:  # unreadable files: the data check reports them
            return
        for label in weights:
            if str(label) not in labels:
                yield (
                    f"classify.class_weights.{label}",
                    f"label {label!r} is not in the training labels ({', '.join(labels)})",
                )

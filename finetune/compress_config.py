"""The `compress` stage's config: which model, which variants, and how they are measured."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field

from finetune.classify_config import ClassifyData
from launcher.config import Section
from launcher.hf_dir import CAUSAL_LM, SEQUENCE_CLASSIFIER, config_problem, is_architecture
from launcher.run_config import RunConfig
from pretrain.data.config import PretrainDataConfig

VARIANTS = ("int8-weight", "int8-dynamic", "unstructured", "ffn")
"""``int8-weight``: torchao int8 weight-only; ``int8-dynamic``: int8 weights and dynamically
quantized int8 activations; ``unstructured``: magnitude pruning of the Linear weights
(``prune``); ``ffn``: structured pruning of MLP channels (``ffn``), a smaller model."""

Variant = Literal["int8-weight", "int8-dynamic", "unstructured", "ffn"]

CLASSIFIER_VARIANTS = ("int8-weight", "int8-dynamic")
"""What a classifier (``*ForSequenceClassification``) gets: the pruning variants read the
causal LM's own data (channel activations, bits per byte) and are built for causal LMs."""


KIND_NAMES = {"causal": "causal LM", "classifier": "sequence classifier"}


def model_kind(folder: Path) -> str | None:
    """``causal`` or ``classifier`` from ``folder/config.json``'s architectures; None for
    anything else (or no readable config: ``init.path``'s own check names that)."""
    if config_problem(folder) is not None:
        return None
    if is_architecture(folder, CAUSAL_LM):
        return "causal"
    if is_architecture(folder, SEQUENCE_CLASSIFIER):
        return "classifier"
    return None


class PruneSection(Section):
    sparsity: float = 0.5
    """Share of the prunable Linear weights (every Linear but the output head, which is often
    the input embedding, tied) set to 0: the smallest by magnitude. In [0, 1)."""
    scope: Literal["global", "layer"] = "global"
    """global: one magnitude threshold over all prunable weights (layers keep different
    shares); layer: each Linear loses ``sparsity`` of its own weights."""

    def problems(self) -> Iterable[tuple[str, str]]:
        if not 0 <= self.sparsity < 1:
            yield "sparsity", f"{self.sparsity} is outside [0, 1): the share of weights set to 0"


class FfnSection(Section):
    fraction: float = Field(0.25, gt=0, lt=1)
    """Share of each MLP's intermediate channels removed (the same number in every layer, so
    ``intermediate_size`` in config.json stays one number)."""
    rank: Literal["activation", "norm"] = "activation"
    """activation: mean |act(gate(x)) * up(x)| of each channel over calibration tokens from
    the training split (Minitron's importance); norm: the product of the channel's gate-row,
    up-row and down-column L2 norms (no data)."""
    calibration_docs: int = Field(64, gt=0)
    """Training-split documents (not held out) the activation ranking reads."""


class BenchSection(Section):
    threads: int = Field(1, gt=0)
    """torch.set_num_threads for the latency runs (fixed, so runs compare)."""
    seq_len: int = Field(128, gt=0)
    """Tokens of the one sequence each timed forward runs (batch 1)."""
    warmup: int = Field(3, ge=0)
    """Untimed forwards before the timed ones."""
    runs: int = Field(20, ge=20)
    """Timed forwards (median, p10 and p90 are reported; at least 20)."""


class CompressConfig(RunConfig):
    """``init.path`` is the model to compress (an HF directory such as ``runs/NAME/hf/``);
    ``data`` is where a causal LM's validation split comes from (give the data section of
    the run that trained it: the same files and ``validation.fraction`` give the same
    held-out documents, and bits per byte compare with that run's); ``classification`` is a
    classifier's labelled data (the classify run's ``data`` section: the same files, fractions
    and ``split_seed`` give the same test split, scored by macro-F1)."""

    variants: list[Variant] = Field(default_factory=lambda: list(VARIANTS))
    """The variants to write under ``runs/<name>/variants/<kind>/`` and measure."""
    compare: dict[str, str] = Field(default_factory=dict)
    """Other model directories to measure in the same table, by label (e.g. ``distilled:
    runs/distill-tiny/hf``); they are read, not copied."""
    prune: PruneSection = PruneSection()
    ffn: FfnSection = FfnSection()
    bench: BenchSection = BenchSection()
    data: PretrainDataConfig = PretrainDataConfig(builtin={})
    classification: ClassifyData | None = None
    """A classifier's labelled data (``{text, label}`` records); its ``test`` split (or
    ``validation`` when no test example is held out) is scored."""

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        if self.init.path is None:
            yield "init.path", "the model to compress is required (an HF directory)"
        elif model_kind(Path(self.init.path)) == "classifier":
            config = Path(self.init.path) / "config.json"
            if self.classification is None:
                yield (
                    "classification",
                    f"{config} is a classifier: give its labelled data (the classify run's "
                    "data section) so that its test split can be scored",
                )
            for kind in self.variants:
                if kind not in CLASSIFIER_VARIANTS:
                    yield (
                        "variants",
                        f"{kind} is built for causal LMs; {config} is a classifier, which gets "
                        f"{', '.join(CLASSIFIER_VARIANTS)}",
                    )
        if len(set(self.variants)) != len(self.variants):
            yield "variants", "lists a variant twice"
        for label, path in self.compare.items():
            folder = Path(path)
            if not (folder / "config.json").is_file():
                yield f"compare.{label}", f"{folder}: no config.json, so not an HF model directory"
            elif label == "original" or label in VARIANTS:
                yield f"compare.{label}", "this label names a row of the table already"
            elif self.init.path is not None and model_kind(folder) != model_kind(
                Path(self.init.path)
            ):
                theirs, ours = (
                    KIND_NAMES.get(model_kind(f), "model of another kind")
                    for f in (folder, Path(self.init.path))
                )
                yield (
                    f"compare.{label}",
                    f"{folder} is a {theirs} and init.path a {ours}: one table scores one kind "
                    "(bits per byte or macro-F1)",
                )

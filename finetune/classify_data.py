"""Labelled texts for classification: ``{text, label}`` records -> examples with a class index.

Records are read by the project's record reader (``launcher.data.examples.read_examples``);
each becomes an ``Example`` (the text's tokens, cut to ``data.max_length``, special tokens of
the tokenizer's post-processor included: a BERT's [CLS] ... [SEP]) or a counted skip
(``missing_text``, ``empty_text``, ``missing_label``, ``invalid_label``, and the reader's own
kinds). Labels are strings or integers; the label map is the sorted set of the training labels
(numerically when they all are integers). Without validation/test files, a seeded hash of a
record's text puts it in the test or validation split (``data.test_fraction``,
``data.validation_fraction``), so a duplicated text never lands on both sides.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from launcher.data.examples import Example, ExampleSource, read_examples
from launcher.data.records import CorpusError, Record, RecordView, scan_records
from launcher.data.sources import expand_paths
from launcher.data.tokenizer import TextTokenizer, TokenizerError

SPLITS = ("train", "validation", "test")


def label_key(value: Any) -> str | None:
    """The label of a record as the label map holds it (None: not a label)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


def sort_labels(labels: set[str], numeric: bool) -> list[str]:
    """The label map's order: sorted, numerically when every label was an integer."""
    return sorted(labels, key=int) if numeric else sorted(labels)


def split_of(text: str, seed: int, fractions: dict[str, float]) -> str:
    """``test``, ``validation`` or ``train`` for a training record, from a hash of its text."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    edge = 0.0
    for name in ("test", "validation"):
        edge += fractions.get(name, 0.0)
        if u < edge:
            return name
    return "train"


def held_out_fractions(data) -> dict[str, float]:
    """The fractions of the training files that go to splits given by no file."""
    out = {}
    if data.validation is None:
        out["validation"] = data.validation_fraction
    if data.test is None:
        out["test"] = data.test_fraction
    return out


def training_labels(data) -> list[str]:
    """The label map of ``data`` (a ``ClassifyData``) from its label fields alone, for checks
    before launch; unreadable files and records are left to the full read."""
    labels: set[str] = set()
    numeric = True
    fractions = held_out_fractions(data)
    for i, source in enumerate(data.train):
        files, _ = expand_paths(source, f"data.train.{i}", on_error="skip")
        for path in files:
            try:
                for item, _ in scan_records(path, RecordView(), format=source.format):
                    if isinstance(item, CorpusError):
                        continue
                    text, key = item.data.get(data.text_field), item.data.get(data.label_field)
                    label = label_key(key)
                    if label is None or not isinstance(text, str):
                        continue
                    if split_of(text, data.split_seed, fractions) == "train":
                        labels.add(label)
                        numeric &= isinstance(key, int)
            except CorpusError:
                continue
    return sort_labels(labels, numeric)


def load_tokenizer(cfg) -> TextTokenizer:
    """The parent's tokenizer (``init.path``) with the configured special tokens.

    Raises ``TokenizerError`` when it has no usable EOS or (decoders) shares pad and EOS.
    """
    t = cfg.tokenizer
    return TextTokenizer.load(
        cfg.init.path, eos_token=t.eos_token, bos_token=t.bos_token, pad_token=t.pad_token
    )


def require_distinct_pad(tokenizer: TextTokenizer) -> None:
    """A decoder pools its last non-pad token: padding must not be the end-of-text token."""
    if tokenizer.pad_id == tokenizer.eos_id:
        raise TokenizerError(
            f"{tokenizer.source}: the padding token is the end-of-text token "
            f"({tokenizer.tokens['eos']!r}), so a decoder cannot find the last real token; "
            "set tokenizer.pad_token to a distinct token of the vocabulary"
        )


@dataclass
class LabelledSets:
    labels: list[str]
    splits: dict[str, list[Example]]
    weights: list[float]
    """Class weights of the loss, by class index."""
    counters: Counter = field(default_factory=Counter)
    files: dict[str, list[str]] = field(default_factory=dict)


class TextEncoder:
    """The encode hook: a record's text -> tokens (truncated, with the post-processor's
    special tokens), its label key and split kept in ``extras`` until the label map exists."""

    def __init__(self, tokenizer: TextTokenizer, data, split: str | None):
        self.data, self.split = data, split
        self.fractions = held_out_fractions(data)
        self.backend = Tokenizer.from_str(tokenizer.backend.to_str())  # truncation: ours only
        self.backend.encode_special_tokens = True
        self.backend.enable_truncation(data.max_length)
        self.numeric = True

    def __call__(self, record: Record) -> Example | CorpusError:
        text = record.data.get(self.data.text_field)
        if not isinstance(text, str):
            return CorpusError(f"no string field {self.data.text_field!r}", kind="missing_text")
        if not text.strip():
            return CorpusError("empty text", kind="empty_text")
        value = record.data.get(self.data.label_field)
        if value is None:
            return CorpusError(f"no label field {self.data.label_field!r}", kind="missing_label")
        label = label_key(value)
        if label is None:
            return CorpusError(
                f"label {value!r} is not a string or an integer", kind="invalid_label"
            )
        split = self.split or split_of(text, self.data.split_seed, self.fractions)
        if split == "train":
            self.numeric &= isinstance(value, int)
        tokens = self.backend.encode(text, add_special_tokens=True).ids
        return Example(tokens, np.zeros(len(tokens), dtype=bool), {"label": label, "split": split})


def read_sets(cfg, tokenizer: TextTokenizer) -> LabelledSets:
    """Train, validation and test examples of ``cfg.data`` with their class index and weight.

    Raises ``CorpusError``: fewer than 2 training labels (naming the files); a validation or
    test label the training set lacks (``file:line``); no usable record (naming the files).
    """
    data = cfg.data
    counters: Counter = Counter()
    raw: dict[str, list[Example]] = {name: [] for name in SPLITS}
    files: dict[str, list[str]] = {}
    numeric = True
    for split in SPLITS:
        sources: list[ExampleSource] | None = getattr(data, split)
        if sources is None:
            continue
        encoder = TextEncoder(tokenizer, data, None if split == "train" else split)
        found = read_examples(
            sources,
            encoder,
            key=f"data.{split}",
            on_error=data.on_error,
            log_bad=data.log_bad_records,
        )
        counters.update({k: v for k, v in found.counters.items() if k != "examples"})
        files[split] = found.files
        for example in found.examples:
            raw[example.extras["split"]].append(example)
        if split == "train":
            numeric = encoder.numeric
    present = {e.extras["label"] for e in raw["train"]}
    if len(present) < 2:
        raise CorpusError(
            f"data.train: {len(present)} label(s) ({', '.join(sorted(present)) or 'none'}) in "
            f"{', '.join(files.get('train', [])) or 'no file'}; classification needs at least 2"
        )
    labels = sort_labels(present, numeric)
    index = {name: i for i, name in enumerate(labels)}
    for split in ("validation", "test"):
        for example in raw[split]:
            if example.extras["label"] not in index:
                raise CorpusError(
                    f"{example.where}: label {example.extras['label']!r} not in the training "
                    f"labels ({', '.join(labels)})"
                )
    counts = Counter(e.extras["label"] for e in raw["train"])
    weights = class_weights(cfg.classify.class_weights, labels, counts)
    splits = {}
    for split, examples in raw.items():
        for example in examples:
            i = index[example.extras["label"]]
            example.extras = {"label": i, "weight": weights[i]}
        splits[split] = examples
        counters[f"{split}_examples"] = len(examples)
    return LabelledSets(labels, splits, weights, counters, files)


def class_weights(spec: str | dict[str, float], labels: list[str], counts: Counter) -> list[float]:
    """Per-class loss weights: all 1 (``none``), ``n / (C * count)`` (``balanced``, as
    scikit-learn's ``compute_class_weight``), or the given ones (1 for labels not named)."""
    if spec == "none":
        return [1.0] * len(labels)
    if spec == "balanced":
        n = sum(counts[label] for label in labels)
        return [n / (len(labels) * counts[label]) for label in labels]
    given = {str(k): float(v) for k, v in spec.items()}
    return [given.get(label, 1.0) for label in labels]

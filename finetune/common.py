"""What the fine-tuning stages share beside the loop: the line that says what was read, the
counters every stage logs, and the batch side of the stages trained on preference pairs."""

from __future__ import annotations

import torch

from launcher.data.batches import ExampleStream
from launcher.data.examples import ExampleSet
from launcher.metrics import record


def announce_data(train: ExampleSet, what: str) -> None:
    """Print ``[kiln] data  <what>; skipped <{kind: count} or nothing>`` (the caller prints on
    the main rank only)."""
    skipped = {k: v for k, v in train.counters.items() if k.startswith("skipped_")}
    print(f"[kiln] data            {what}; skipped {skipped or 'nothing'}")


def size(examples: ExampleSet | None) -> int:
    return len(examples) if examples is not None else 0


def record_counters(train: ExampleSet, trainable: int | None = None) -> None:
    """``data/<counter>`` of the training set's reading (records, skips by kind) and
    ``model/trainable_params``: constant, so ``max`` over steps and ranks."""
    for key, value in train.counters.items():
        record(f"data/{key}", float(value), reduce="max")
    if trainable is not None:
        record("model/trainable_params", float(trainable), reduce="max")


class PairBatches:
    """The batch side of a Task trained on preference pairs (reward model, DPO): its
    ``stream`` of pair micro-batches (chosen and ``rejected_*`` tensors, ``example_mask``),
    counted in pairs; both responses' tokens count for throughput."""

    stream: ExampleStream

    def train_batches(self) -> ExampleStream:
        return self.stream

    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch(self.cfg.grad_accum_steps)

    def tokens_per_sequence(self) -> int:
        return 2 * self.cfg.data.max_seq_len

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum() + batch["rejected_attention_mask"].sum())

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["example_mask"].sum())

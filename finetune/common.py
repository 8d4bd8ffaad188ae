"""What the fine-tuning stages share beside the loop: the line that says what was read, the
counters every stage logs, the batch side of the stages trained on preference pairs, and the
digests of frozen companion models that a resume checks."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.checkpoint import CheckpointError
from launcher.data.batches import ExampleStream
from launcher.data.examples import ExampleSet
from launcher.metrics import record
from launcher.runner import weight_digests


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


class FrozenModels:
    """The directories of a stage's frozen companions (KL reference, reward model), by the
    config key that names them, and their weight files' SHA-256: a run-wide checkpoint state
    (``RunJson``). They are not checkpointed, so a resume reloads them from their
    directories; one whose weights changed since the checkpoint would silently train against
    another model, and is refused instead, naming it."""

    def __init__(self, models: dict[str, str | Path]) -> None:
        self.models = {key: Path(path) for key, path in models.items()}

    def digests(self) -> dict[str, dict[str, str]]:
        """Each model's weight digests (``weight_digests`` hashes a file version once)."""
        return {key: weight_digests(p) for key, p in self.models.items()}

    def state_dict(self) -> dict:
        digests = self.digests()
        return {k: {"path": str(p), "weights": digests[k]} for k, p in self.models.items()}

    def load_state_dict(self, state: dict) -> None:
        now = self.digests()
        for key, saved in state.items():
            if key not in now:  # that companion is not used any more (e.g. LoRA now)
                continue
            if saved["weights"] != now[key]:
                changed = sorted(
                    set(saved["weights"]).symmetric_difference(now[key])
                    | {f for f in saved["weights"] if now[key].get(f) != saved["weights"][f]}
                )
                raise CheckpointError(
                    f"{key}: the weights in {self.models[key]} changed since the checkpoint "
                    f"was saved (from {saved['path']}; files differing: {', '.join(changed)}). "
                    "Resuming would train against another model: restore them, or start "
                    "afresh with checkpoint.resume=none"
                )

"""The loop's counters, saved in every checkpoint (``trainer.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """The loop's counters: part of every checkpoint. ``applied_steps`` counts the optimizer
    steps that were not skipped; the LR schedule follows it (as Megatron's does)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    applied_steps: int = 0
    finished_at: int | None = None  # a task ended the run early (finish): its new horizon
    best_step: int | None = None  # checkpoint.best: the step of the best evaluation so far
    best_value: float | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        if "applied_steps" not in state:  # a checkpoint from before the counter existed
            self.applied_steps = self.step - self.skipped_steps

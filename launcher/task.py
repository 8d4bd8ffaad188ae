"""The contract between a stage and the loop.

A stage (pretraining, SFT, reward model, DPO, ...) says *what* to train: the model and its
optimizer groups, an endless resumable stream of micro-batches, the loss of one micro-batch,
and how to evaluate; optionally its own step (``train_step``: several optimizer steps over a
rollout it generated) and its own named checkpoint states (``states``). The loop
(``launcher/loop.py``) says *how*: devices, DeepSpeed, accumulation, clipping, schedule,
skips, logging, evaluation cadence, checkpoints. A task never calls DeepSpeed, writes files
or parses the command line; it reports extra metrics with ``launcher.metrics.record``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from launcher.data.batches import evaluation_batches
from launcher.data.examples import Example
from launcher.errors import UserError
from launcher.optim import param_groups
from launcher.run_config import RunConfig
from launcher.runtime import Runtime

if TYPE_CHECKING:
    from launcher.states import State, Stateful
    from launcher.stepping import StepContext


class Task(ABC):
    name: str = ""
    """The stage this task belongs to (recorded in checkpoints, for `kiln export`)."""

    def __init__(self, cfg: RunConfig, runtime: Runtime):
        self.cfg, self.runtime = cfg, runtime

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train, on CPU or meta, identical on every rank."""

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        """``train.activation_checkpointing``: recompute activations in backward instead of
        keeping them. Default: transformers' own switch (non-reentrant, which works with
        frozen inputs and ZeRO-3); a model without one needs the task to say how."""
        from launcher.engines import checkpointing_switch, enable_checkpointing

        if checkpointing_switch(model, "enable") is None:
            raise UserError(
                f"train.activation_checkpointing: {type(self).__name__} builds a "
                f"{type(model).__name__}, which has no activation_checkpointing_enable() nor "
                "gradient_checkpointing_enable(); set it to false or override "
                "Task.enable_activation_checkpointing"
            )
        enable_checkpointing(model)

    def on_engine(self, engine: nn.Module) -> None:
        """Called once the trained model is an engine, before any batch is drawn: build the
        models the task uses but does not train here (``self.runtime.prepare_frozen``), keep
        the engine for generation (``self.runtime.generating(engine)`` inside ``loss``)."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups; a group may carry ``lr_scale`` (layer-wise learning rates), which
        the loop reads at every step: setting ``trainer.optimizer.param_groups[i]["lr_scale"]``
        later (gradual unfreezing) takes effect at the next step. Parameters with
        ``requires_grad`` False belong to no group (checkpoints keep their values only)."""
        return param_groups(model, self.cfg.optim.weight_decay)

    @abstractmethod
    def train_batches(self) -> Iterable[dict[str, torch.Tensor]]:
        """This rank's endless stream of micro-batches; it has ``state_dict``/``load_state_dict``
        so that a checkpoint can resume it exactly."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one micro-batch (a scalar with a graph): its mean, or, when
        ``items_in`` counts the batch's items, their sum."""

    def train_step(self, step: StepContext, batches: list[dict[str, torch.Tensor]]) -> None:
        """One loop step over ``batches`` (the ``accum`` micro-batches the loop drew for it).
        Default: one optimizer step over them, ``step.optimize(batches)``. A task may take
        several (``optimizer_steps_per_step``), on micro-batches it makes itself (e.g. with
        ``with step.runtime.generating(step.engine) as model:`` first), each exactly
        ``step.accum`` micro-batches, the same number of times on every rank."""
        step.optimize(batches)

    def optimizer_steps_per_step(self) -> int:
        """How many optimizer steps ``train_step`` takes (default 1): the LR schedule and
        ``train.max_tokens`` count optimizer steps, so its length is the horizon (in loop
        steps) times this."""
        return 1

    def items_in(self, batch: dict[str, torch.Tensor]) -> int | None:
        """The items a micro-batch's loss is made of (supervised tokens, pairs, examples),
        counted before its forward pass; None (the default) when every micro-batch weighs the
        same (packed pretraining: equal targets everywhere) and ``loss`` returns a mean.

        With a count, ``loss`` returns the *sum* over the batch's items, and the loop divides
        by the step's global count, over every micro-batch of every rank (all-reduced once
        per step), as transformers' Trainer does with ``num_items_in_batch``: a micro-batch
        of 3 targets then weighs 3/3000 of one of 3000, not the same."""
        return None

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens of a micro-batch counted for throughput and ``train.max_tokens``."""
        return int(batch["input_ids"].numel())

    def steps_per_epoch(self) -> int | None:
        """Loop steps (``train_step`` calls) in one pass over a finite training set
        (``train.epochs``, ``eval.every: epoch``); None (the default): the data is a stream."""
        return None

    def tokens_per_sequence(self) -> int:
        """Tokens of one training sequence (turns ``train.max_tokens`` into steps)."""
        return 1

    def flops_per_token(self) -> float | None:
        """Training FLOPs per token, for MFU (None: not reported)."""
        return None

    def on_log(self) -> None:
        """Called on every rank before metrics are written: ``record`` stage counters here."""
        return None

    def validation_batches(self, examples: list[Example], pad_id: int) -> list[dict]:
        """This rank's padded micro-batches of a validation set (every rank the same number:
        ``launcher.data.batches.evaluation_batches``), at most ``eval.max_batches``."""
        batches = evaluation_batches(
            examples,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
            batch_size=self.cfg.train.micro_batch_size,
            pad_id=pad_id,
        )
        return batches[: self.cfg.eval.max_batches]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (computed on every rank, reduced by the task). Default: none."""
        return {}

    def export(self, model: nn.Module, state_dict: dict | None, out: Path) -> None:
        """Write the trained model as a plain HF directory (main rank only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot export its model")

    def summary(self, results: dict[str, float], state) -> list[str]:
        """The lines printed when the stage has exported its model (``state``: the loop's
        counters, ``results``: the last logged metrics)."""
        return [f"trained {state.step} steps"]

    def save_extras(self, folder: Path) -> list[str]:
        """Main rank: files that make a checkpoint self-contained (e.g. the tokenizer);
        returns their names relative to ``folder``."""
        return []

    def state_dict(self) -> dict:
        """This rank's resumable task state (the data stream, a KL controller...), JSON-safe."""
        return {}

    def load_state_dict(self, states: list[dict]) -> None:
        """The saved ``state_dict()`` of every rank of the run that saved (its world size may
        differ from this one's)."""
        return None

    def states(self) -> dict[str, State | Stateful]:
        """Named checkpoint states of the task besides ``state_dict`` (default: none), e.g.
        ``{"kl": RunJson(self.kl_controller), "baseline": RankTensors(self.baseline)}``
        (``launcher.states``; a bare object with ``state_dict``/``load_state_dict`` is this
        rank's JSON). Asked for at set-up (after ``train_batches``), at every save and load;
        resuming from a checkpoint without one of them is an error unless it is optional."""
        return {}

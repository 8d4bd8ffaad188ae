"""The ``classify`` stage: fine-tune a parent (``init.path``) to label texts.

The task (``ClassifyTask``) reads ``{text, label}`` records (``classify_data``), builds the
parent with a new seeded head (``classify_model``), trains with the weighted, label-smoothed
cross-entropy as a sum over the micro-batch whose item count is the sum of the examples' class
weights (so a step's loss is torch's weighted mean over all its examples, whatever the split
into micro-batches and ranks), and evaluates accuracy, macro-F1 and per-class scores on the
validation set every epoch. ``EarlyStopping`` picks the best checkpoint (exported to
``runs/<name>/hf/``) and may end the run early. After training the main rank writes
``report.json``, ``report.md`` and ``curves.png`` (``classify_report``): the test set scored by
the exported model and by the parent with the untrained head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.classify_callbacks import EarlyStopping
from finetune.classify_config import ClassifyConfig
from finetune.classify_data import load_tokenizer, read_sets, require_distinct_pad
from finetune.classify_export import export_checkpoint
from finetune.classify_metrics import classification_loss, metric_dict
from finetune.classify_model import (
    apply_unfreezing,
    freeze_backbone,
    is_decoder,
    layer_groups,
    load_classifier,
)
from finetune.peft_setup import checkpoint_merge_refusal
from launcher.callbacks import Checkpoint, Evaluate, Log
from launcher.data.batches import ExampleStream
from launcher.data.records import CorpusError
from launcher.metrics import record
from launcher.runner import run_stage
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.stepping import StepContext
from launcher.task import Task


class ClassifyTask(Task):
    name = "classify"
    cfg: ClassifyConfig

    def __init__(self, cfg: ClassifyConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.tokenizer = load_tokenizer(cfg)
        self.decoder = is_decoder(cfg.init.path)
        if self.decoder:
            require_distinct_pad(self.tokenizer)
        self.sets = read_sets(cfg, self.tokenizer)
        if not self.sets.splits["validation"]:
            raise CorpusError(
                "data.validation: no validation example; give files or a "
                "data.validation_fraction above 0"
            )
        self.labels = self.sets.labels
        self.weight = torch.tensor(self.sets.weights, dtype=torch.float32)
        self.groups: list[dict] = []
        self.head: list[str] = []
        self.last_confusion: np.ndarray | None = None
        self._counted = False
        self.stream = ExampleStream(
            self.sets.splits["train"],
            batch_size=cfg.train.micro_batch_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=cfg.run.seed,
            pad_id=self.tokenizer.pad_id,
        )

    # ----------------------------------------------------------------------------- model

    def build_model(self) -> nn.Module:
        c = self.cfg.classify
        model, self.head = load_classifier(
            self.cfg.init.path,
            self.labels,
            self.tokenizer.pad_id,
            self.cfg.run.seed,
            c.head_init_std,
        )
        if c.peft is not None:
            from finetune.classify_peft import wrap_peft

            return wrap_peft(model, c.peft, self.head, self.cfg.run.seed)
        if c.freeze == "backbone":
            freeze_backbone(model, self.head)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        c = self.cfg.classify
        self.groups = layer_groups(model, self.cfg.optim.weight_decay, c.layer_decay)
        apply_unfreezing(self.groups, 0, c.unfreeze_every)
        return self.groups

    def train_step(self, step: StepContext, batches: list[dict[str, torch.Tensor]]) -> None:
        """Gradual unfreezing: the groups' scales of this step's epoch (the loop's epochs,
        which evaluation and early stopping count too), set before the optimizer step reads
        them; then the default step."""
        every = self.cfg.classify.unfreeze_every
        if every is not None:
            apply_unfreezing(self.groups, step.state.step // self.steps_per_epoch(), every)
        step.optimize(batches)

    # ------------------------------------------------------------------------------ data

    def train_batches(self) -> ExampleStream:
        return self.stream

    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch(self.cfg.grad_accum_steps)

    def tokens_per_sequence(self) -> int:
        return self.cfg.data.max_length

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def items_in(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["weight"].sum())

    def on_log(self) -> None:
        if self._counted:  # the same on every rank, and constant: once is enough
            return
        self._counted = True
        for name, value in self.sets.counters.items():
            record(f"data/{name}", float(value), reduce="max")

    # ------------------------------------------------------------------------------ loss

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = self.weight.to(batch["label"].device)
        return classification_loss(
            self.logits(model, batch), batch["label"], weight, self.cfg.classify.label_smoothing
        )

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss (as in training), accuracy, macro-F1, per-class precision/recall/F1 over the
        whole validation set; every rank runs the same number of padded batches."""
        return self.score(model, self.sets.splits["validation"])

    def score(self, model: nn.Module, examples: list, prefix: str = "eval/") -> dict[str, float]:
        rt = self.runtime
        batches = self.validation_batches(examples, self.tokenizer.pad_id)
        counts = tally(self, model, batches, rt.device)
        rt.all_reduce(counts)
        return self.metrics(counts, prefix)

    def metrics(self, counts: torch.Tensor, prefix: str = "eval/") -> dict[str, float]:
        """Metrics of summed ``tally`` counts; keeps the confusion matrix (``last_confusion``)."""
        classes = len(self.labels)
        matrix = counts[: classes * classes].reshape(classes, classes).long().cpu().numpy()
        self.last_confusion = matrix
        out = metric_dict(matrix, self.labels, prefix)
        out[f"{prefix}loss"] = float(counts[-2] / counts[-1].clamp(min=1e-12))
        return out

    # ---------------------------------------------------------------------------- export

    def export(self, model: nn.Module, state_dict: dict | None, out: Path) -> None:
        if self.cfg.classify.peft is not None:
            from finetune.classify_peft import merged

            model, state_dict = merged(model, state_dict), None
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save(out, model_max_length=self.cfg.data.max_length)

    def summary(self, results: dict[str, float], state) -> list[str]:
        f1 = results.get(self.cfg.classify.best_metric)
        return [
            f"trained {state.step} steps; {self.cfg.classify.best_metric} "
            f"{f1 if f1 is not None else float('nan'):.4f} (last evaluation)"
        ]

    def save_extras(self, folder: Path) -> list[str]:
        """What `kiln export` needs besides the weights: the label map and the tokenizer."""
        from finetune.classify_export import LABELS

        (folder / LABELS).write_text(json.dumps({"labels": self.labels, "head": self.head}))
        self.tokenizer.save(folder / "tokenizer")
        names = sorted(str(p.relative_to(folder)) for p in (folder / "tokenizer").iterdir())
        return [LABELS, *names]

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict([s["data"] for s in states])


def tally(
    task: ClassifyTask, model: nn.Module, batches: list[dict], device: torch.device
) -> torch.Tensor:
    """This rank's confusion counts (flattened ``[true, predicted]``), summed loss and summed
    class weight over ``batches``; filler rows (``example_mask`` False) count for nothing."""
    classes = len(task.labels)
    counts = torch.zeros(classes * classes + 2, dtype=torch.float64, device=device)
    weight = task.weight.to(device)
    smoothing = task.cfg.classify.label_smoothing
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        real = batch["example_mask"]
        logits, labels = task.logits(model, batch)[real], batch["label"][real]
        cells = labels * classes + logits.argmax(-1)
        counts[: classes * classes] += torch.bincount(cells, minlength=classes * classes)
        counts[-2] += classification_loss(logits, labels, weight, smoothing).double()
        counts[-1] += batch["weight"][real].sum().double()
    return counts


def callbacks(cfg: ClassifyConfig) -> tuple[list, EarlyStopping]:
    """Evaluate, then early stopping (it reads the evaluation, and marks the best checkpoint
    by its own rule), then log (which clears the evaluation), then checkpoint."""
    c = cfg.classify
    stopper = EarlyStopping(c.best_metric, c.best_mode, c.patience, c.min_delta)
    return [
        Evaluate(cfg.eval.every, None),
        stopper,
        Log(cfg.metrics.log_every),
        Checkpoint(cfg.checkpoint.every),
    ], stopper


def classify(
    cfg: ClassifyConfig, task_class: type[ClassifyTask] = ClassifyTask
) -> dict[str, float]:
    """Train, export the best checkpoint to ``runs/<name>/hf/``, and (main rank) write the
    reports; returns the last logged metrics. ``task_class``: a ``ClassifyTask`` subclass
    that changes the loss (``distill-classify``), with the same evaluation and reports."""
    from finetune.classify_report import write_reports

    made: list[ClassifyTask] = []

    def make(cfg: ClassifyConfig, runtime: Runtime) -> ClassifyTask:
        made.append(task_class(cfg, runtime))
        return made[0]

    listed, stopper = callbacks(cfg)
    results = run_stage(cfg, make, callbacks=listed)
    if made and made[0].runtime.rank == 0:
        write_reports(cfg, made[0], stopper)
    return results


STAGE = Stage(
    name="classify",
    config_class=ClassifyConfig,
    run=classify,
    help="fine-tune a model (init.path) to classify texts",
    distributed=True,
    export=export_checkpoint,
    merge_refusal=checkpoint_merge_refusal,
)

"""The ``distill-classify`` stage: knowledge distillation of a sequence classifier (the student,
fine-tuned from ``init.path`` as ``classify`` does) from a frozen trained classifier (the
teacher, ``teacher.path``), DistilBERT-style, per example.

Everything but the loss is classification's (``ClassifyDistillTask(ClassifyTask)``, run by
``classify()``): data, new head, layer-wise rates, validation accuracy and macro-F1 every
epoch, early stopping, the best checkpoint exported to ``runs/<name>/hf/``, the reports. The
teacher is a frozen companion (``runtime.prepare_frozen``: no gradient, not checkpointed,
sharded under ZeRO-3); its weight digests are a checkpoint state, so a resume against a
changed teacher is refused, naming ``teacher.path``. Before training its label map must be
the data's (the KL compares class ``i`` of one model with class ``i`` of the other).

Loss per example ``i`` of class weight ``w_i`` (fp32):
``alpha * T^2 * KL(softmax(t_i/T) || softmax(s_i/T)) * w_i + (1 - alpha) * CE_i``, where the
CE part is classification's weighted, label-smoothed cross-entropy; summed over the
micro-batch, whose items are the sum of its class weights (so the step's loss is a weighted
mean, whatever the split into micro-batches and ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from finetune.classify import ClassifyTask, classify
from finetune.classify_export import export_checkpoint
from finetune.classify_metrics import classification_loss
from finetune.classify_model import saved_labels
from finetune.common import FrozenModels
from finetune.distill import tempered_kl
from finetune.distill_classify_config import ClassifyDistillConfig
from finetune.peft_setup import checkpoint_merge_refusal
from launcher.errors import UserError
from launcher.metrics import record
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.states import RunJson


class TeacherMismatch(UserError):
    """The teacher does not classify into the data's classes the way the student will."""


def classifier_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    weight_per_example: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    class_weight: torch.Tensor | None,
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, summed weighted KL, summed CE) of logits ``student`` and ``teacher``
    [B, C], in fp32; the CE sum is ``classification_loss`` (weighted, smoothed), the KL of
    each example is weighted by ``weight_per_example`` (its class weight, the same that
    ``items_in`` counts). The KL and CE sums are detached (for metrics)."""
    kl = (tempered_kl(student, teacher, temperature) * weight_per_example.float()).sum()
    ce = classification_loss(student.float(), labels, class_weight, smoothing)
    total = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return total, kl.detach(), ce.detach()


def load_teacher(path: str | Path) -> nn.Module:
    """An HF sequence classifier directory's model in fp32 (under ZeRO-3 transformers
    partitions it while loading)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)


class ClassifyDistillTask(ClassifyTask):
    name = "distill-classify"
    cfg: ClassifyDistillConfig

    def __init__(self, cfg: ClassifyDistillConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.teacher_dir = Path(cfg.teacher.path)
        self.frozen = FrozenModels({"teacher.path": self.teacher_dir})
        self.teacher: nn.Module | None = None
        self.check_teacher()

    def check_teacher(self) -> None:
        """The teacher's label map is the data's, in the same order; its padding token (which
        a decoder classifier pools by) is the student's. Raises ``TeacherMismatch``."""
        config_file = self.teacher_dir / "config.json"
        config = json.loads(config_file.read_text())
        theirs = saved_labels(config)
        if theirs != self.labels:
            raise TeacherMismatch(
                f"teacher.path: {config_file} labels {theirs} (id2label), but the data's "
                f"labels are {self.labels}: the teacher must be trained on the same labels, "
                "in the same order"
            )
        pad = config.get("pad_token_id")
        if pad is not None and pad != self.tokenizer.pad_id:
            raise TeacherMismatch(
                f"teacher.path: {config_file} pads with token id {pad}, the student with "
                f"{self.tokenizer.pad_id} ({self.tokenizer.tokens['pad']!r}); set "
                "tokenizer.pad_token as the teacher's run did"
            )

    def on_engine(self, engine: nn.Module) -> None:
        """The teacher, frozen (and sharded under ZeRO-3)."""
        self.teacher = self.runtime.prepare_frozen(load_teacher(self.teacher_dir))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("ClassifyDistillTask.loss before on_engine() loaded the teacher")
        student = self.logits(model, batch)
        with torch.no_grad():
            teacher = self.logits(self.teacher, batch)
        d, c = self.cfg.distill, self.cfg.classify
        total, kl, ce = classifier_distill_loss(
            student, teacher, batch["label"], batch["weight"],
            alpha=d.alpha, temperature=d.temperature,
            class_weight=self.weight.to(student.device), smoothing=c.label_smoothing,
        )  # fmt: skip
        n = max(self.items_in(batch), 1e-12)
        record("distill/kl", kl / n)
        record("distill/ce", ce / n)
        return total

    def states(self) -> dict:
        """The teacher's weight digests (a resume against changed weights is refused)."""
        return {**super().states(), "frozen": RunJson(self.frozen)}


def distill_classify(cfg: ClassifyDistillConfig) -> dict[str, float]:
    """Distil ``teacher.path`` into the student; export the best checkpoint to
    ``runs/<name>/hf/`` and write classification's reports."""
    return classify(cfg, task_class=ClassifyDistillTask)


STAGE = Stage(
    name="distill-classify",
    config_class=ClassifyDistillConfig,
    run=distill_classify,
    help="knowledge distillation of a text classifier from a frozen trained classifier",
    distributed=True,
    export=export_checkpoint,
    merge_refusal=checkpoint_merge_refusal,
)

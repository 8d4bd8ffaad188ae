"""The ``distill`` stage: knowledge distillation of a causal LM student from a frozen causal LM
teacher, on the shared loop.

Everything but the loss is pretraining's (``DistillTask(PretrainTask)``): the packed stream,
validation bits per byte, exact resume, the export. The student is the ``model`` preset at
pretraining's seeded init (the same for every ZeRO stage) or the weights of ``init.path``.
The teacher is a frozen companion (``runtime.prepare_frozen``: no gradient, not
checkpointed, sharded under ZeRO-3); its weight digests are a checkpoint state, so a resume
against a changed teacher is refused, naming ``teacher.path``.

Loss per target token (fp32), Hinton et al.'s form:
``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, summed over the
micro-batch's target tokens with their count as its items (the loop divides by the step's
global count). Logits are cut to the tokenizer's vocabulary: teacher and student may pad
their embedding to different row counts, and rows past the tokenizer are never targets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from finetune.common import FrozenModels
from finetune.distill_config import DistillConfig
from launcher.checkpoint import read_manifest, verify
from launcher.data.tokenizer import TextTokenizer
from launcher.data.validation import IGNORE
from launcher.forward import forward_logits
from launcher.metrics import record
from launcher.runner import run_stage
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.states import RunJson
from pretrain.prepare import prepare_inputs
from pretrain.task import PretrainTask

log = logging.getLogger(__name__)

STUDENT_CONFIG = "student"
"""Checkpoint folder holding the student's ``config.json`` (``kiln export`` rebuilds from it:
an ``init.path`` student need not be a preset)."""


def tempered_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, ``KL(softmax(teacher/T) || softmax(student/T))`` over the last dimension, in
    fp32, the teacher detached: the distillation term of both distill stages (tokens of a
    causal LM, examples of a classifier)."""
    log_p_teacher = torch.log_softmax(teacher.float().detach() / temperature, dim=-1)
    log_p_student = torch.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, summed KL, summed CE) over the target tokens (``targets != IGNORE``) of
    logits ``student`` [..., Vs] and ``teacher`` [..., Vt], both cut to ``vocab`` columns and
    computed in fp32; the KL and CE sums are detached (for metrics)."""
    keep = targets != IGNORE
    s = student[..., :vocab][keep].float()
    kl = tempered_kl(s, teacher[..., :vocab][keep], temperature)
    ce = F.cross_entropy(s, targets[keep], reduction="none")
    total = (alpha * temperature**2 * kl + (1.0 - alpha) * ce).sum()
    return total, kl.sum().detach(), ce.sum().detach()


def load_causal_lm(path: str | Path) -> nn.Module:
    """An HF causal LM directory's model in fp32 (under ZeRO-3 transformers partitions it
    while loading)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class DistillTask(PretrainTask):
    name = "distill"
    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.teacher_dir = Path(cfg.teacher.path)
        self.frozen = FrozenModels({"teacher.path": self.teacher_dir})
        self.teacher: nn.Module | None = None
        self.student_config = None

    def build_model(self) -> nn.Module:
        if self.cfg.init.path is None:
            model = super().build_model()
        else:
            model = load_causal_lm(self.cfg.init.path)
        self.student_config = model.config
        return model

    def on_engine(self, engine: nn.Module) -> None:
        """The teacher, frozen (and sharded under ZeRO-3)."""
        self.teacher = self.runtime.prepare_frozen(load_causal_lm(self.teacher_dir))

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != IGNORE).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("DistillTask.loss before on_engine() loaded the teacher")
        student = forward_logits(model, batch)
        with torch.no_grad():
            teacher = forward_logits(self.teacher, batch)
        d = self.cfg.distill
        total, kl, ce = distill_loss(
            student, teacher, batch["targets"],
            alpha=d.alpha, temperature=d.temperature, vocab=self.tokenizer.vocab_size,
        )  # fmt: skip
        n = max(self.items_in(batch), 1)
        record("distill/kl", kl / n)
        record("distill/ce", ce / n)
        return total

    def flops_per_token(self) -> float | None:
        return None  # the teacher's forward is not in pretraining's formula: no MFU

    def save_extras(self, folder: Path) -> list[str]:
        names = super().save_extras(folder)
        (folder / STUDENT_CONFIG).mkdir()
        self.student_config.to_json_file(folder / STUDENT_CONFIG / "config.json")
        return [*names, f"{STUDENT_CONFIG}/config.json"]

    def states(self) -> dict:
        """The teacher's weight digests (a resume against changed weights is refused)."""
        return {**super().states(), "frozen": RunJson(self.frozen)}


def export_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """``kiln export``: checkpoint ``folder`` (verified first) -> a plain HF directory of the
    student, rebuilt from the checkpoint's own ``student/config.json``. Raises
    ``CheckpointError`` (verification) or ``KeyError`` naming missing/unexpected weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    verify(folder, read_manifest(folder))
    config = AutoConfig.from_pretrained(folder / STUDENT_CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    stored = {name for name, _ in model.named_parameters()}  # a tied lm_head is stored once
    missing = [m for m in missing if m in stored]
    if missing or unexpected:
        raise KeyError(f"{folder}: missing {missing}, unexpected {unexpected}")
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    TextTokenizer.load(folder / "tokenizer").save(
        out, model_max_length=config.max_position_embeddings
    )
    model.generation_config.save_pretrained(out)
    log.info("exported %s to %s (%s)", folder, out, dtype)
    return out


def distill(cfg: DistillConfig) -> dict[str, float]:
    """Distil ``teacher.path`` into the student on ``data``; export ``runs/<name>/hf/``."""
    return run_stage(cfg, DistillTask, prepare=prepare_inputs)


STAGE = Stage(
    name="distill",
    config_class=DistillConfig,
    run=distill,
    help="knowledge distillation of a causal LM student from a frozen teacher",
    distributed=True,
    export=export_checkpoint,
)

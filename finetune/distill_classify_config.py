"""The classifier-distillation run config: classification's (``init.path`` is the student's
parent, ``data``, ``classify``...) plus ``teacher`` (a trained sequence classifier, frozen) and
``distill`` (the loss mix, ``finetune.distill_config.DistillSection``).

Checked before any process starts, so that a run cannot silently learn from the wrong
teacher: ``teacher.path`` must hold a ``...ForSequenceClassification`` model, and its
``tokenizer.json`` the content of the student's (``init.path``'s): the batches hold one set
of token ids, read by both models. The teacher's label map is checked against the data's
labels when the task has read them (``ClassifyDistillTask``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from finetune.classify_config import ClassifyConfig
from finetune.distill_config import DistillSection, same_tokenizer, tokenizer_file
from launcher.hf_dir import SEQUENCE_CLASSIFIER, architectures, is_architecture
from launcher.run_config import InitSection


class ClassifierTeacher(InitSection):
    path: str = Field(..., min_length=1)  # type: ignore[assignment]
    """The teacher: an HF sequence classifier directory (e.g. a `kiln classify` run's
    runs/NAME/hf/), trained on the same labels."""

    def problems(self) -> Iterable[tuple[str, str]]:
        found = list(super().problems())
        yield from found
        if found:
            return
        if not is_architecture(self.path, SEQUENCE_CLASSIFIER):
            kinds = architectures(self.path)
            yield (
                "path",
                f"{Path(self.path) / 'config.json'}: architectures {kinds or 'missing'}, not a "
                "sequence classifier (...ForSequenceClassification, e.g. a `kiln classify` export)",
            )


class ClassifyDistillConfig(ClassifyConfig):
    teacher: ClassifierTeacher
    distill: DistillSection = DistillSection()

    def problems(self) -> Iterable[tuple[str, str]]:
        yield from super().problems()
        if self.init.path is None or not Path(self.teacher.path).is_dir():
            return  # reported as init.path / teacher.path problems
        teacher, student = tokenizer_file(self.teacher.path), tokenizer_file(self.init.path)
        if not teacher.is_file():
            yield "teacher.path", f"{teacher}: missing (the teacher's tokenizer is needed)"
        elif student.is_file() and not same_tokenizer(teacher, student):
            yield (
                "teacher.path",
                f"{teacher} and the student's {student} (init.path) are different tokenizers: "
                "both models read the same token ids; distil from a teacher trained from a "
                "parent with the student's tokenizer",
            )

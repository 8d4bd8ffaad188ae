"""The distill stage's pieces, in-process: the loss against a fixture computed by hand, the cut
to the tokenizer's vocabulary, and the config's decisions and errors (teacher missing,
tokenizers differing, tokenizer defaulting to the teacher's, the student's shape from
``init.path``)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from finetune.distill import distill_loss
from finetune.distill_config import DistillConfig
from launcher.config import CONFIG_ROOT, ConfigError, load_config
from launcher.data.validation import IGNORE

from .classify_fixtures import tiny_parent

__all__ = ["tiny_parent"]  # fixture

RECIPE = CONFIG_ROOT / "finetune" / "distill-tiny.yaml"
NEO = Path("/work/shared/data/tokenizers/gpt-neo-test-tokenizer.json")

# 2 rows x 3 positions, vocabulary 3; the middle position of row 2 is not a target
STUDENT = [[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -1.0, 0.0]],
           [[0.0, 0.0, 0.0], [3.0, 1.0, 1.0], [-0.5, 1.5, 0.25]]]  # fmt: skip
TEACHER = [[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [1.5, 1.5, -2.0]],
           [[2.0, 0.0, -2.0], [0.0, 0.0, 9.0], [0.0, 1.0, 0.0]]]  # fmt: skip
TARGETS = [[2, 0, 1], [0, IGNORE, 1]]


def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def hand_loss(alpha: float, temperature: float) -> tuple[float, float, float]:
    """(summed loss, summed KL, summed CE) by the textbook formulas, one token at a time."""
    total = kls = ces = 0.0
    for s_row, t_row, y_row in zip(STUDENT, TEACHER, TARGETS, strict=True):
        for s, t, y in zip(s_row, t_row, y_row, strict=True):
            if y == IGNORE:
                continue
            p, q = softmax(t, temperature), softmax(s, temperature)
            kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
            ce = -math.log(softmax(s, 1.0)[y])
            total += alpha * temperature**2 * kl + (1 - alpha) * ce
            kls, ces = kls + kl, ces + ce
    return total, kls, ces


def test_loss_is_the_hand_computed_sum_over_target_tokens_at_t2_alpha_half():
    student = torch.tensor(STUDENT, requires_grad=True)
    total, kl, ce = distill_loss(
        student, torch.tensor(TEACHER), torch.tensor(TARGETS),
        alpha=0.5, temperature=2.0, vocab=3,
    )  # fmt: skip
    want = hand_loss(0.5, 2.0)
    assert total.dtype == torch.float32
    assert abs(total.item() - want[0]) < 1e-6, (total.item(), want[0])
    assert abs(kl.item() - want[1]) < 1e-6 and abs(ce.item() - want[2]) < 1e-6
    total.backward()  # the student gets a gradient, the ignored position none
    assert student.grad[1, 1].abs().max() == 0 and student.grad[0].abs().max() > 0


def test_alpha_zero_is_the_summed_next_token_cross_entropy():
    total, _, _ = distill_loss(
        torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS),
        alpha=0.0, temperature=2.0, vocab=3,
    )  # fmt: skip
    want = torch.nn.functional.cross_entropy(
        torch.tensor(STUDENT).flatten(0, 1), torch.tensor(TARGETS).flatten(), reduction="sum"
    )
    assert total.item() == pytest.approx(want.item(), abs=1e-6)


def test_logits_are_cut_to_the_tokenizers_vocabulary_when_row_counts_differ():
    """Student padded to 5 rows, teacher to 4: the extra columns change nothing."""
    student = torch.tensor(STUDENT)
    teacher = torch.tensor(TEACHER)
    padded_s = torch.cat([student, torch.full((2, 3, 2), 7.0)], -1)
    padded_t = torch.cat([teacher, torch.full((2, 3, 1), -3.0)], -1)
    args = {"alpha": 0.5, "temperature": 2.0, "vocab": 3}
    cut = distill_loss(padded_s, padded_t, torch.tensor(TARGETS), **args)[0]
    plain = distill_loss(student, teacher, torch.tensor(TARGETS), **args)[0]
    assert cut.item() == plain.item()


def config(*overrides: str) -> DistillConfig:
    return load_config(DistillConfig, RECIPE, overrides)


def test_a_missing_teacher_directory_is_a_config_error_naming_teacher_path(tmp_path):
    with pytest.raises(ConfigError) as error:
        config(f"teacher.path={tmp_path / 'nope'}")
    message = str(error.value)
    assert "teacher.path" in message and "no such directory" in message, message


def test_the_tokenizer_defaults_to_the_teachers(tiny_parent):
    cfg = config(f"teacher.path={tiny_parent}")
    assert cfg.tokenizer.path == str(tiny_parent)
    assert config(f"teacher.path={tiny_parent}", f"tokenizer.path={tiny_parent}")


def test_a_tokenizer_other_than_the_teachers_is_refused_naming_both_files(tiny_parent):
    with pytest.raises(ConfigError) as error:
        config(f"teacher.path={tiny_parent}", f"tokenizer.path={NEO}")
    message = str(error.value)
    assert "tokenizer.path" in message and str(NEO) in message, message
    assert str(tiny_parent / "tokenizer.json") in message, message


def test_an_init_path_student_takes_that_directorys_shape(tiny_parent, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(tiny_parent, student)
    cfg = config(f"teacher.path={tiny_parent}", f"init.path={student}", "data.seq_len=32")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_size) == (32, 2, 64)
    assert (cfg.model.n_heads, cfg.model.kv_heads, cfg.model.max_seq_len) == (2, 1, 64)
    assert cfg.model_width() == 32

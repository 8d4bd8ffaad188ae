"""The distill-classify stage: the loss against a fixture computed by hand, the config's and the
task's refusals (a teacher that is not a classifier, another tokenizer, other labels), and
short real runs on classify_fixtures' tiny parents: a 2-layer teacher trained by the classify
stage, distilled into a 1-layer student; a resume against a changed teacher.

The runs use one torch thread: on these tiny models two threads on two shared cores spend
their time waiting for each other (a run took 30 s instead of 2 s)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune.classify import classify
from finetune.classify_config import ClassifyConfig
from finetune.classify_metrics import classification_loss
from finetune.classify_model import load_classifier
from finetune.distill_classify import (
    STAGE,
    ClassifyDistillTask,
    TeacherMismatch,
    classifier_distill_loss,
)
from finetune.distill_classify_config import ClassifyDistillConfig
from launcher.checkpoint import CheckpointError
from launcher.cli import main as cli_main
from launcher.config import CONFIG_ROOT, ConfigError, load_config
from launcher.data.tokenizer import TextTokenizer
from launcher.rundir import PREEMPTED
from launcher.stages import find_stage

from .classify_fixtures import (
    LABELS,
    labelled,
    make_llama,
    metrics,
    save_tokenizer,
    settings,
    tiny_parent,
)

__all__ = ["labelled", "tiny_parent"]  # fixtures

RECIPE = CONFIG_ROOT / "finetune" / "distill-classify-tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ loss

# 4 examples x 3 classes; class weights 2, 0.5, 1; smoothing 0.1
STUDENT = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -1.0, 0.0], [-0.5, 1.5, 0.25]]
TEACHER = [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [1.5, 1.5, -2.0], [0.0, 3.0, 0.0]]
TARGETS = [2, 0, 1, 1]
CLASS_WEIGHT = [2.0, 0.5, 1.0]
SMOOTHING = 0.1


def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def hand_loss(alpha: float, temperature: float) -> tuple[float, float, float]:
    """(summed loss, summed weighted KL, summed CE), one example at a time. The CE of an
    example of class y, smoothed and weighted as torch does: (1 - e) w_y (-log p_y) plus
    e / C times the sum over classes c of w_c (-log p_c)."""
    total = kls = ces = 0.0
    classes = len(CLASS_WEIGHT)
    for s, t, y in zip(STUDENT, TEACHER, TARGETS, strict=True):
        w = CLASS_WEIGHT[y]
        p, q = softmax(t, temperature), softmax(s, temperature)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        nll = [-math.log(pc) for pc in softmax(s, 1.0)]
        smooth = sum(wc * n for wc, n in zip(CLASS_WEIGHT, nll, strict=True)) / classes
        ce = (1 - SMOOTHING) * w * nll[y] + SMOOTHING * smooth
        total += alpha * temperature**2 * kl * w + (1 - alpha) * ce
        kls, ces = kls + kl * w, ces + ce
    return total, kls, ces


def loss(alpha: float, student: torch.Tensor | None = None, teacher=None):
    labels = torch.tensor(TARGETS)
    weight = torch.tensor(CLASS_WEIGHT)
    return classifier_distill_loss(
        torch.tensor(STUDENT) if student is None else student,
        torch.tensor(TEACHER) if teacher is None else teacher,
        labels, weight[labels],
        alpha=alpha, temperature=2.0, class_weight=weight, smoothing=SMOOTHING,
    )  # fmt: skip


def test_loss_is_the_hand_computed_sum_at_t2_alpha_half_with_weights_and_smoothing():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    total, kl, ce = loss(0.5, student, teacher)
    want = hand_loss(0.5, 2.0)
    assert total.dtype == torch.float32
    assert abs(total.item() - want[0]) < 1e-6, (total.item(), want[0])
    assert abs(kl.item() - want[1]) < 1e-6 and abs(ce.item() - want[2]) < 1e-6
    total.backward()  # the student learns, the teacher gets no gradient
    assert student.grad.abs().max() > 0 and teacher.grad is None
    low = loss(0.5, torch.tensor(STUDENT, dtype=torch.bfloat16))[0]  # bf16 logits: fp32 math
    assert low.dtype == torch.float32 and abs(low.item() - want[0]) < 1e-2


def test_alpha_zero_is_classification_loss_and_alpha_one_the_weighted_kl():
    weight = torch.tensor(CLASS_WEIGHT)
    plain = classification_loss(torch.tensor(STUDENT), torch.tensor(TARGETS), weight, SMOOTHING)
    assert torch.equal(loss(0.0)[0], plain)
    total, kl, _ = loss(1.0)
    assert torch.equal(total, 4.0 * kl)
    assert abs(total.item() - hand_loss(1.0, 2.0)[0]) < 1e-6


# ---------------------------------------------------------------------------------- inputs


def untrained_classifier(out: Path, parent: Path, labels=LABELS) -> Path:
    """A classifier directory (``parent`` with a seeded new head for ``labels``) and the
    parent's tokenizer: a teacher as far as the checks go, without training one."""
    tokenizer = TextTokenizer.load(parent)
    model, _ = load_classifier(parent, list(labels), tokenizer.pad_id, seed=0)
    model.save_pretrained(out)
    tokenizer.save(out, model_max_length=64)
    return out


def distill_settings(root: Path, student: Path, teacher: Path, data: Path, name: str) -> dict:
    """``classify_fixtures.settings`` (micro 8 x accumulation 2, 15 steps an epoch) with the
    teacher, 3 epochs at 1e-2 (the rate at which the 2-layer teacher learns in 3 epochs)."""
    tree = settings(root, student, data, name)
    tree["train"]["epochs"], tree["optim"]["lr"] = 3, 1e-2
    return {**tree, "teacher": {"path": str(teacher)}}


def write_yaml(tree: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def line_of(path: str, text: str) -> int:
    return next(i for i, line in enumerate(open(path), 1) if text in line)


@pytest.fixture(scope="module")
def student_parent(tmp_path_factory) -> Path:
    """A 1-layer random parent with the teacher's tokenizer (the 2-layer ``tiny_parent``'s)."""
    return make_llama(tmp_path_factory.mktemp("student"), layers=1)


# ---------------------------------------------------------------------------- refusals


def test_a_teacher_that_is_not_a_classifier_is_a_config_error_naming_it(
    tmp_path, tiny_parent, student_parent, labelled, capsys
):
    path = write_yaml(
        distill_settings(tmp_path, student_parent, tiny_parent, labelled, "causal"),
        tmp_path / "run.yaml",
    )
    with pytest.raises(ConfigError) as info:
        load_config(ClassifyDistillConfig, path)
    [problem] = info.value.problems
    assert problem.key == "teacher.path"
    assert str(tiny_parent / "config.json") in problem.message
    assert "LlamaForCausalLM" in problem.message and "sequence classifier" in problem.message
    assert problem.where.endswith(f":{line_of(path, 'path: ' + str(tiny_parent))}")
    assert cli_main(["distill-classify", path]) == 2  # before any process
    assert "teacher.path" in capsys.readouterr().err


def test_a_teacher_with_another_tokenizer_is_a_config_error_naming_both_files(
    tmp_path, tiny_parent, student_parent, labelled
):
    teacher = untrained_classifier(tmp_path / "teacher", tiny_parent)
    save_tokenizer(teacher, cls_sep=True)  # [CLS] text [SEP]: other ids for the same text
    tree = distill_settings(tmp_path, student_parent, teacher, labelled, "tokenizer")
    with pytest.raises(ConfigError) as info:
        load_config(ClassifyDistillConfig, write_yaml(tree, tmp_path / "run.yaml"))
    [problem] = info.value.problems
    assert problem.key == "teacher.path"
    assert str(teacher / "tokenizer.json") in problem.message
    assert str(student_parent / "tokenizer.json") in problem.message
    # reformatted, the same tokenizer passes (JSON content is compared)
    path = teacher / "tokenizer.json"
    path.write_text(json.dumps(json.loads((student_parent / "tokenizer.json").read_text())))
    assert load_config(ClassifyDistillConfig, write_yaml(tree, tmp_path / "run.yaml"))


@pytest.mark.parametrize("labels", [("beta", "alpha", "gamma"), ("alpha", "beta", "delta")])
def test_teacher_labels_other_than_the_datas_stop_the_run_naming_both(
    tmp_path, tiny_parent, student_parent, labelled, labels
):
    teacher = untrained_classifier(tmp_path / "teacher", tiny_parent, labels)
    tree = distill_settings(tmp_path, student_parent, teacher, labelled, "labels")
    cfg = load_config(ClassifyDistillConfig, write_yaml(tree, tmp_path / "run.yaml"))
    with pytest.raises(TeacherMismatch) as info:
        STAGE.run(cfg)
    message = str(info.value)
    assert str(teacher / "config.json") in message
    assert str(list(labels)) in message and str(list(LABELS)) in message
    assert not (cfg.run_dir / "config.yaml").exists()  # refused before anything is written


def test_the_recipe_and_the_entry_point(tmp_path, tiny_parent, student_parent, labelled):
    teacher = untrained_classifier(tmp_path / "teacher", tiny_parent)
    cfg = load_config(
        ClassifyDistillConfig, RECIPE,
        [f"teacher.path={teacher}", f"init.path={student_parent}", "data.max_length=32",
         f"data.train=[{{paths: [{labelled / 'train.jsonl'}]}}]"],
    )  # fmt: skip
    assert (cfg.distill.alpha, cfg.distill.temperature) == (0.5, 2.0)
    assert cfg.checkpoint.best.metric == "eval/macro_f1"
    assert find_stage("distill-classify") is STAGE
    assert STAGE.config_class is ClassifyDistillConfig


# ---------------------------------------------------------------------------------- runs


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def last_eval(run_dir: Path) -> dict:
    return [m for m in metrics(run_dir) if "eval/macro_f1" in m][-1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_parent, labelled) -> Path:
    """The 2-layer parent trained by the classify stage: 3 epochs at 1e-2 (macro-F1 0.95)."""
    root = tmp_path_factory.mktemp("teacher")
    tree = settings(root, tiny_parent, labelled, "teacher")
    tree["train"]["epochs"], tree["optim"]["lr"] = 3, 1e-2
    find_stage("classify").run(ClassifyConfig.model_validate(tree))
    assert last_eval(root / "teacher")["eval/macro_f1"] >= 0.85
    return root / "teacher" / "hf"


@pytest.mark.slow
def test_a_distilled_student_learns_the_labels_and_the_teacher_stays_as_it_was(
    tmp_path, teacher, student_parent, labelled
):
    from transformers import AutoModelForSequenceClassification

    before = weights(teacher)
    tasks: list[ClassifyDistillTask] = []

    class Kept(ClassifyDistillTask):
        def __init__(self, cfg, runtime):
            super().__init__(cfg, runtime)
            tasks.append(self)

    results = {}
    for alpha in (0.5, 1.0):  # 1.0: the labels play no part, only the teacher teaches
        tree = distill_settings(tmp_path, student_parent, teacher, labelled, f"alpha{alpha}")
        cfg = ClassifyDistillConfig.model_validate({**tree, "distill": {"alpha": alpha}})
        classify(cfg, task_class=Kept)
        results[alpha] = last_eval(cfg.run_dir)
        in_memory = tasks[-1].teacher.state_dict()
        assert all(torch.equal(in_memory[k], v) for k, v in before.items())
        assert not any(p.requires_grad for p in tasks[-1].teacher.parameters())
    after = weights(teacher)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    # measured: 0.867 (alpha 0.5) and 0.754 (alpha 1); the same student alone 0.816; chance 1/3
    assert results[0.5]["eval/macro_f1"] >= 0.75, results[0.5]
    assert results[1.0]["eval/macro_f1"] >= 0.6, results[1.0]
    run_dir = tmp_path / "alpha0.5"
    logged = [m for m in metrics(run_dir) if "distill/kl" in m]
    assert len(logged) == 45 and all(m["distill/kl"] >= 0 and m["distill/ce"] > 0 for m in logged)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["best"]["eval/macro_f1"] == max(r["eval/macro_f1"] for r in report["epochs"])
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "hf")
    assert model.config.num_hidden_layers == 1 and model.config.id2label[2] == "gamma"
    # `kiln export` of the exported checkpoint gives the run's export
    folder = json.loads((run_dir / "hf" / "kiln.json").read_text())["weights_from"]
    if folder == "the last step":
        folder = str(run_dir / "checkpoints" / "step-00000045")
    out = tmp_path / "exported"
    assert cli_main(["export", folder, "--out", str(out), "--dtype", "fp32"]) == 0
    ours, theirs = weights(out), weights(run_dir / "hf")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_resume_against_a_changed_teacher_is_refused_naming_teacher_path(
    tmp_path, tiny_parent, student_parent, labelled
):
    teacher = untrained_classifier(tmp_path / "teacher", tiny_parent)
    tree = distill_settings(tmp_path, student_parent, teacher, labelled, "resume")
    tree["train"]["epochs"], tree["train"]["stop_after"] = 1, 3
    STAGE.run(ClassifyDistillConfig.model_validate(tree))
    run_dir = tmp_path / "resume"
    assert (run_dir / PREEMPTED).exists()
    original = weights(teacher)
    changed = dict(original)
    changed["score.weight"] = original["score.weight"] + 1e-3
    save_file(changed, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    del tree["train"]["stop_after"]
    with pytest.raises(CheckpointError) as info:
        STAGE.run(ClassifyDistillConfig.model_validate(tree))
    assert "teacher.path" in str(info.value) and str(teacher) in str(info.value)
    save_file(original, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    STAGE.run(ClassifyDistillConfig.model_validate(tree))  # the same teacher: it resumes
    steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert steps == list(range(1, 16)) and (run_dir / "hf").is_dir()

"""Classification pieces on their own (fast): metrics against scikit-learn, the weighted smoothed
loss against torch, early stopping on a scripted metric sequence, config and data errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from finetune.classify_callbacks import EarlyStopping
from finetune.classify_config import ClassifyConfig
from finetune.classify_data import class_weights, read_sets
from finetune.classify_metrics import classification_loss, confusion, metric_dict, scores
from finetune.classify_model import depth, layer_groups, load_classifier
from launcher.cli import main as cli_main
from launcher.config import ConfigError, load_config
from launcher.data.records import CorpusError
from launcher.errors import UserError
from launcher.state import TrainState

from .classify_fixtures import LABELS, config, labelled, settings, tiny_parent, write_records

__all__ = ["labelled", "tiny_parent"]  # fixtures


def test_metrics_equal_scikit_learn_on_a_fixed_prediction_set():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, true, rng.integers(0, 5, 300))
    pred[pred == 4] = 3  # class 4 is never predicted: precision 0/0 (0, as scikit-learn)
    labels = list(range(5))
    matrix = confusion(true, pred, 5)
    s = scores(matrix)
    p, r, f, support = precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
    assert np.array_equal(matrix, confusion_matrix(true, pred, labels=labels))
    for mine, theirs in ((s["precision"], p), (s["recall"], r), (s["f1"], f)):
        assert np.abs(mine - theirs).max() < 1e-9
    assert np.array_equal(s["support"], support)
    macro = f1_score(true, pred, labels=labels, average="macro", zero_division=0)
    assert abs(s["macro_f1"] - macro) < 1e-9
    assert abs(s["accuracy"] - (true == pred).mean()) < 1e-9
    flat = metric_dict(matrix, ["a", "b", "c", "d", "e"])
    assert flat["eval/macro_f1"] == s["macro_f1"] and flat["eval/precision/e"] == 0.0
    assert abs(flat["eval/recall/b"] - r[1]) < 1e-9


def test_weighted_smoothed_loss_sum_over_items_is_torchs_weighted_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g) * 3
    labels = torch.randint(0, 4, (12,), generator=g)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    items = weight[labels].sum()  # what ClassifyTask.items_in counts (the rows' weights)
    mine = classification_loss(logits, labels, weight, 0.1) / items
    theirs = F.cross_entropy(logits, labels, weight=weight, label_smoothing=0.1)
    assert abs(mine.item() - theirs.item()) < 1e-6


def test_class_weights_balanced_as_scikit_learn_and_given_ones():
    from collections import Counter

    from sklearn.utils.class_weight import compute_class_weight

    y = ["a"] * 6 + ["b"] * 3 + ["c"]
    expected = compute_class_weight("balanced", classes=np.array(["a", "b", "c"]), y=y)
    got = class_weights("balanced", ["a", "b", "c"], Counter(y))
    assert np.allclose(got, expected, atol=1e-12)
    assert class_weights({"b": 2.5}, ["a", "b", "c"], Counter(y)) == [1.0, 2.5, 1.0]


class ScriptedTrainer:
    """What EarlyStopping reads and calls on a trainer, with an evaluation per epoch."""

    def __init__(self, steps_per_epoch: int):
        self.state, self.steps_per_epoch = TrainState(), steps_per_epoch
        self.eval_results: dict = {}
        self.finished: str | None = None
        self.new_best = False

    def finish(self, reason: str) -> None:
        self.finished = reason


def test_early_stopping_stops_after_patience_evaluations_without_improvement():
    stopper = EarlyStopping("eval/macro_f1", "max", patience=2)
    trainer = ScriptedTrainer(steps_per_epoch=10)
    stopped_at, bests = None, []
    for epoch, value in enumerate([0.5, 0.7, 0.69, 0.68, 0.9], start=1):
        trainer.state.step = 10 * epoch
        trainer.eval_results = {"eval/macro_f1": value}
        stopper.on_step_end(trainer)
        if trainer.new_best:
            bests.append(epoch)
            trainer.new_best = False
        if trainer.finished:
            stopped_at = epoch
            break
    assert stopped_at == 4 and stopper.stopped_after == 4
    assert bests == [1, 2] and trainer.state.best_step == 20 and trainer.state.best_value == 0.7


def test_min_delta_keeps_the_first_best_and_min_mode():
    stopper = EarlyStopping("eval/loss", "min", patience=1, min_delta=1.0)
    trainer = ScriptedTrainer(steps_per_epoch=5)
    for epoch, value in enumerate([2.0, 1.5], start=1):
        trainer.state.step = 5 * epoch
        trainer.eval_results = {"eval/loss": value}
        stopper.on_step_end(trainer)
    assert trainer.state.best_step == 5 and trainer.finished and stopper.stopped_after == 2


def test_a_best_metric_the_evaluation_lacks_is_an_error():
    trainer = ScriptedTrainer(steps_per_epoch=5)
    trainer.eval_results = {"eval/loss": 1.0, "eval/accuracy": 0.5}
    with pytest.raises(UserError, match=r"classify.best_metric: 'eval/f1' is not a metric"):
        EarlyStopping("eval/f1").on_step_end(trainer)


# ----------------------------------------------------------------------------- config errors


def write_yaml(tmp_path, tiny_parent, labelled, **classify) -> str:
    import yaml

    tree = settings(tmp_path, tiny_parent, labelled, "cfg", **classify)
    path = tmp_path / "classify.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def line_of(path: str, text: str) -> int:
    return next(i for i, line in enumerate(open(path), 1) if text in line)


@pytest.mark.parametrize(
    ("classify", "eval_every", "key", "needle"),
    [
        ({"class_weights": {"alpha": 2.0, "delta": 3.0}}, "epoch", "classify.class_weights.delta",
         "label 'delta' is not in the training labels (alpha, beta, gamma)"),
        ({"layer_decay": 1.5}, "epoch", "classify.layer_decay", "less than or equal to 1"),
        ({"layer_decay": 0.0}, "epoch", "classify.layer_decay", "greater than 0"),
        ({"patience": 2}, 10, "classify.patience", "set eval.every: epoch"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key_and_line(
    tmp_path, tiny_parent, labelled, classify, eval_every, key, needle, capsys
):
    path = write_yaml(tmp_path, tiny_parent, labelled, **classify)
    text = Path(path).read_text().replace("every: epoch", f"every: {eval_every}")
    Path(path).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(ClassifyConfig, path)
    [problem] = [p for p in info.value.problems if p.key == key]
    assert needle in problem.message
    first = key.split(".")[-1] if key != "classify.patience" else "patience"
    assert problem.where.endswith(f":{line_of(path, first + ':')}")
    assert cli_main(["classify", path]) == 2  # a config error: exit 2, before any process
    assert key in capsys.readouterr().err


# ------------------------------------------------------------------------------- data errors


def test_bad_records_are_counted_and_unknown_validation_labels_stop_the_run(
    tmp_path, tiny_parent, labelled
):
    from launcher.data.tokenizer import TextTokenizer

    train = write_records(tmp_path / "train.jsonl", 30, seed=3)
    bad = [
        '{"label": "alpha"}',  # missing text
        '{"text": 5, "label": "beta"}',  # text not a string
        '{"text": "w1 w2"}',  # no label
        '{"text": "w1 w2", "label": [1]}',  # label neither string nor integer
        '{"text": "w1", "label": ',  # invalid JSON
    ]
    with open(train, "a") as f:
        f.write("\n".join(bad) + "\n")
    with open(train, "ab") as f:
        f.write(b'{"text": "\xff\xfe", "label": "alpha"}\n')  # invalid UTF-8
    cfg = config(tmp_path, tiny_parent, labelled, "bad")
    cfg.data.train[0].paths = [str(train)]
    tok = TextTokenizer.load(tiny_parent)
    sets = read_sets(cfg, tok)
    counts = {k: v for k, v in sets.counters.items() if k.startswith("skipped_")}
    assert counts == {
        "skipped_missing_text": 2,
        "skipped_missing_label": 1,
        "skipped_invalid_label": 1,
        "skipped_invalid_json": 1,
        "skipped_invalid_utf8": 1,
    }
    assert sets.labels == list(LABELS) and len(sets.splits["train"]) == 30
    cfg.data.on_error = "raise"
    with pytest.raises(CorpusError, match=rf"{train}:31: no string field 'text'"):
        read_sets(cfg, tok)
    cfg.data.on_error = "skip"
    validation = tmp_path / "validation.jsonl"
    validation.write_text(
        json.dumps({"text": "w1", "label": "beta"}) + "\n"
        + json.dumps({"text": "w2", "label": "delta"}) + "\n"
    )  # fmt: skip
    cfg.data.validation[0].paths = [str(validation)]
    with pytest.raises(
        CorpusError,
        match=rf"{validation}:2: label 'delta' not in the training labels \(alpha, beta, gamma\)",
    ):
        read_sets(cfg, tok)
    one = write_records(tmp_path / "one.jsonl", 10, labels=("alpha",))
    cfg.data.train[0].paths = [str(one)]
    with pytest.raises(CorpusError, match=rf"1 label\(s\) \(alpha\) in {one}"):
        read_sets(cfg, tok)


def test_integer_labels_sort_numerically_and_held_out_fractions_are_seeded(tmp_path, tiny_parent):
    from launcher.data.tokenizer import TextTokenizer

    path = tmp_path / "ints.jsonl"
    rows = [{"text": f"w{i % 30} w{i % 7}", "label": i % 11} for i in range(200)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tree = settings(tmp_path, tiny_parent, tmp_path, "ints")
    tree["data"] = {"train": [{"paths": [str(path)]}], "validation_fraction": 0.2,
                    "test_fraction": 0.1}  # fmt: skip
    cfg = ClassifyConfig.model_validate(tree)
    sets = read_sets(cfg, TextTokenizer.load(tiny_parent))
    assert sets.labels == [str(i) for i in range(11)]  # 2 before 10
    sizes = {k: len(v) for k, v in sets.splits.items()}
    assert sum(sizes.values()) <= 200 and 20 <= sizes["validation"] <= 60
    again = read_sets(cfg, TextTokenizer.load(tiny_parent))
    assert [e.tokens.tolist() for e in again.splits["test"]] == [
        e.tokens.tolist() for e in sets.splits["test"]
    ]


# ------------------------------------------------------------------------- layer-wise groups


def test_layer_groups_scale_by_depth_and_keep_the_no_decay_rule(tiny_parent):
    model, head = load_classifier(tiny_parent, list(LABELS), pad_id=3, seed=0)
    assert head == ["score.weight"]
    groups = layer_groups(model, weight_decay=0.1, decay=0.5)
    expected_scale = {}
    for name, _ in model.named_parameters():  # independent of classify_model.depth
        if name.startswith("model.layers."):
            expected_scale[name] = 0.5 ** (2 - int(name.split(".")[2]))
        elif name == "model.embed_tokens.weight":
            expected_scale[name] = 0.5**3
        else:  # final norm, head
            expected_scale[name] = 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            assert group["lr_scale"] == expected_scale[name], name
            no_decay = p.ndim < 2 or "embed" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert sorted(seen) == sorted(names.values())
    assert depth("bert.encoder.layer.0.attention.self.query.weight", 2) == 2


def test_the_new_head_is_seeded_by_name(tiny_parent):
    a, _ = load_classifier(tiny_parent, list(LABELS), pad_id=3, seed=5)
    b, _ = load_classifier(tiny_parent, list(LABELS), pad_id=3, seed=5)
    c, _ = load_classifier(tiny_parent, list(LABELS), pad_id=3, seed=6)
    assert torch.equal(a.score.weight, b.score.weight)
    assert not torch.equal(a.score.weight, c.score.weight)
    assert a.config.id2label == dict(enumerate(LABELS)) and a.config.pad_token_id == 3


def test_a_decoder_whose_pad_is_its_eos_is_refused(tmp_path):
    from finetune.classify_data import require_distinct_pad
    from launcher.data.tokenizer import TextTokenizer, TokenizerError

    from .classify_fixtures import word_tokenizer

    tok = TextTokenizer(word_tokenizer(), eos_token="</s>")  # no pad: falls back to EOS
    with pytest.raises(TokenizerError, match=r"set tokenizer\.pad_token"):
        require_distinct_pad(tok)

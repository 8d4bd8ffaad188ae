"""The reward stage's pieces on a random tiny Llama (fast): the loss against a hand formula,
ties, padding invariance, left truncation of the prompt, bad records, config refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from finetune.reward_config import RewardConfig
from finetune.reward_data import PairEncoder
from finetune.reward_model import load_reward_model, metrics_of, pair_losses, rewards, tally
from launcher.cli import main as cli_main
from launcher.config import CONFIG_ROOT, ConfigError, load_config
from launcher.data.batches import pad_examples
from launcher.data.examples import Example, ExampleSource, read_examples
from launcher.data.records import Record
from launcher.data.tokenizer import TextTokenizer

from .classify_fixtures import make_bert, tiny_parent

__all__ = ["tiny_parent"]  # fixture
REWARD_TINY = str(CONFIG_ROOT / "finetune" / "reward-tiny.yaml")


@pytest.fixture(scope="module")
def model_and_tok(tiny_parent):
    tok = TextTokenizer.load(tiny_parent)
    model, head = load_reward_model(tiny_parent, tok.pad_id, seed=3)
    assert head == ["score.weight"]
    return model.eval(), tok


def pair(tokens, rejected, margin=0.0) -> Example:
    mask = np.ones(len(tokens), dtype=bool)
    other = Example(rejected, np.ones(len(rejected), dtype=bool))
    return Example(tokens, mask, {"rejected": other, "margin": float(margin)})


PAIRS = [
    pair([6, 7, 8, 2], [6, 9, 2], 0.5),
    pair([10, 11, 12, 13, 14, 2], [10, 11, 15, 2], 0.0),
    pair([16, 2], [17, 18, 19, 20, 21, 22, 2], 1.25),
    pair([23, 24, 25, 2], [23, 24, 26, 2], -0.3),
]


def alone(model, tokens) -> float:
    """The score of one unpadded sequence (the last token's)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([list(tokens)])).logits[0, 0])


def test_loss_of_four_pairs_with_margins_equals_the_hand_formula(model_and_tok):
    model, tok = model_and_tok
    batch = pad_examples(PAIRS, tok.pad_id)
    with torch.no_grad():
        rc, rr = rewards(model, batch, tok.pad_id)
        got = float(pair_losses(rc, rr, batch["margin"], 0.01).sum())
    want = 0.0
    for p in PAIRS:
        c, r, m = (
            alone(model, p.tokens),
            alone(model, p.extras["rejected"].tokens),
            p.extras["margin"],
        )
        want += math.log1p(math.exp(-(c - r - m))) + 0.01 * (c + r) ** 2
    assert abs(got - want) < 1e-6, (got, want)
    assert abs(rc.std().item()) > 1e-3  # the scores differ: the comparison means something


def test_a_tie_counts_as_wrong(model_and_tok):
    model, tok = model_and_tok
    tie = pair([6, 7, 2], [6, 7, 2])
    sums = tally(model, [pad_examples([tie, PAIRS[0]], tok.pad_id)], tok.pad_id, 0.0, "cpu")
    c, r = alone(model, PAIRS[0].tokens), alone(model, PAIRS[0].extras["rejected"].tokens)
    out = metrics_of(sums)
    assert out["eval/pairs"] == 2 and out["eval/accuracy"] == (0.5 if c > r else 0.0)
    assert abs(out["eval/loss"] - (math.log(2) + math.log1p(math.exp(-(c - r - 0.5)))) / 2) < 1e-6


def test_scores_do_not_depend_on_the_padded_width(model_and_tok):
    model, tok = model_and_tok
    long = pair([*range(6, 40), 2], [*range(7, 45), 2])
    with torch.no_grad():
        short = rewards(model, pad_examples(PAIRS, tok.pad_id), tok.pad_id)
        wide = rewards(model, pad_examples([*PAIRS, long], tok.pad_id), tok.pad_id)
    for a, b in zip(short, wide, strict=True):
        assert (a - b[:4]).abs().max() < 1e-6


def record(data: dict) -> Record:
    return Record(data=data, id="", file="x.jsonl", line=1)


def test_an_overflowing_prompt_loses_its_start_and_keeps_the_response(model_and_tok):
    model, tok = model_and_tok
    encoder = PairEncoder(tok, max_seq_len=12)
    words = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14"
    base = {"prompt": words, "chosen": "w20 w21", "rejected": "w22 w23"}
    example = encoder(record(base))
    assert len(example) == 12 and example.tokens[-1] == tok.eos_id
    assert tok.decode(example.tokens[-3:-1].tolist()).split() == ["w20", "w21"]

    def score(data):
        e = encoder(record(data))
        return alone(model, e.tokens)

    first = score(base)
    assert score({**base, "prompt": "w29" + words[2:]}) == first  # cut away: no effect
    assert abs(score({**base, "chosen": "w20 w25"}) - first) > 1e-6  # the last word counts
    too_long = encoder(record({**base, "chosen": " ".join(["w1"] * 12)}))
    assert too_long.kind == "too_long"


def test_bad_records_are_counted_by_kind(tmp_path, model_and_tok):
    _, tok = model_and_tok
    good = {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"prompt": "w1", "chosen": "w3"}),
        json.dumps({**good, "rejected": "w3"}),
        json.dumps({**good, "margin": "big"}),
        '{"prompt": "w1", "chosen": "w3", "rejected": "w4", "margin": NaN}',
        json.dumps({**good, "chosen": 5}),
        json.dumps({"chosen": "w3", "rejected": "w4"}),
        json.dumps({"messages": [{"role": "user", "content": "w1"}], "chosen": "w3",
                    "rejected": [{"role": "assistant", "content": "w4"}], "margin": 2}),
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    found = read_examples(
        [ExampleSource(paths=[str(path)])], PairEncoder(tok, 64), key="data.train"
    )
    skipped = {k: v for k, v in found.counters.items() if k.startswith("skipped_")}
    assert skipped == {
        "skipped_invalid_json": 1,
        "skipped_missing_response": 1,
        "skipped_identical_pair": 1,
        "skipped_bad_margin": 2,
        "skipped_non_string_content": 1,
        "skipped_missing_prompt": 1,
    }
    assert len(found) == 2 and found.examples[1].extras["margin"] == 2.0
    with pytest.raises(Exception, match=r"pairs\.jsonl:2"):
        read_examples([ExampleSource(paths=[str(path)])], PairEncoder(tok, 64),
                      key="data.train", on_error="raise")  # fmt: skip


def test_a_parent_that_is_no_decoder_or_classifier_is_a_config_error(tmp_path, capsys):
    bert = make_bert(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"init\.path.*BertModel"):
        load_config(RewardConfig, REWARD_TINY, [f"init.path={bert}"])
    assert cli_main(["reward", REWARD_TINY, f"init.path={bert}"]) == 2
    assert "BertModel" in capsys.readouterr().err


def test_a_chat_prompt_is_cut_from_the_left_too(model_and_tok):
    _, tok = model_and_tok
    user = {"role": "user", "content": " ".join(f"w{i}" for i in range(1, 20))}
    data = {
        "messages": [user],
        "chosen": "w21",
        "rejected": [{"role": "assistant", "content": "w22"}],
    }
    full = PairEncoder(tok, 64)(record(data))
    cut = PairEncoder(tok, 10)(record(data))
    assert len(full) > 10 and len(cut) == 10
    assert cut.tokens.tolist() == full.tokens[-10:].tolist() and cut.tokens[-1] == tok.eos_id
    rejected = cut.extras["rejected"].tokens
    assert len(rejected) == 10 and rejected[-2] != cut.tokens[-2]

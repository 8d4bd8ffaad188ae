"""Small, fast inputs for the classification tests: a word-level tokenizer, a random tiny Llama
(or BERT) parent saved as an HF directory, labelled texts whose class shows in their words, and
configs for the classify stage (in-process or through the CLI)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from finetune.classify_config import ClassifyConfig
from launcher.data.tokenizer import TextTokenizer

LABELS = ("alpha", "beta", "gamma")
SHARED = [f"w{i}" for i in range(30)]
OWN = {label: [f"{label[0]}{i}" for i in range(12)] for label in LABELS}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[CLS]", "[SEP]"]


def text_of(label: str, rng: random.Random) -> str:
    """A text of shared words with a few of its class's own."""
    words = [rng.choice(SHARED) for _ in range(rng.randint(6, 14))]
    for _ in range(3):
        words.insert(rng.randint(0, len(words)), rng.choice(OWN[label]))
    return " ".join(words)


def write_records(path: Path, n: int, seed: int = 0, labels=LABELS) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        label = labels[i % len(labels)]
        lines.append(json.dumps({"text": text_of(label, rng), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def word_tokenizer(cls_sep: bool = False) -> Tokenizer:
    vocab = {w: i for i, w in enumerate(SPECIALS + SHARED + [w for v in OWN.values() for w in v])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if cls_sep:  # BERT's post-processor: [CLS] text [SEP]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
        )
    return tok


def save_tokenizer(out: Path, cls_sep: bool = False) -> TextTokenizer:
    if cls_sep:
        text = TextTokenizer(word_tokenizer(True), eos_token="[SEP]", pad_token="<pad>")
    else:
        text = TextTokenizer(word_tokenizer(), eos_token="</s>", bos_token="<s>", pad_token="<pad>")
    text.save(out, model_max_length=64)
    return text


def make_llama(out: Path, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = save_tokenizer(out)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def make_bert(out: Path) -> Path:
    from transformers import BertConfig, BertModel

    tok = save_tokenizer(out, cls_sep=True)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_parent(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> Path:
    """train.jsonl (240 records) and validation.jsonl (60), three balanced classes."""
    root = tmp_path_factory.mktemp("labelled")
    write_records(root / "train.jsonl", 240, seed=1)
    write_records(root / "validation.jsonl", 60, seed=2)
    return root


def settings(root: Path, parent: Path, data: Path, name: str, **classify) -> dict:
    """A classify config (as a dict) for the small inputs: 240 training examples, micro 8 x
    accumulation 2 (15 steps an epoch), 2 epochs, evaluation every epoch, constant LR."""
    return {
        "run": {"name": name, "output_dir": str(root), "seed": 7},
        "init": {"path": str(parent)},
        "data": {
            "train": [{"paths": [str(data / "train.jsonl")]}],
            "validation": [{"paths": [str(data / "validation.jsonl")]}],
            "test_fraction": 0.0,
            "max_length": 32,
        },
        "classify": classify,
        "train": {"global_batch_size": 16, "micro_batch_size": 8, "epochs": 2},
        "optim": {"lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "eval": {"every": "epoch"},
        "metrics": {"wandb": False, "progress_bar": False, "log_every": 1},
        "checkpoint": {"every": None, "keep_last": 1},
        "dist": {"zero_stage": 0},
    }


def config(root: Path, parent: Path, data: Path, name: str, **classify) -> ClassifyConfig:
    return ClassifyConfig.model_validate(settings(root, parent, data, name, **classify))


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

"""Run in a fresh process: score pairs with a plain HF reward model directory.

``python -m tests.finetune.reward_score HF_DIR [HF_DIR ...] PAIRS.jsonl`` prints a line of
JSON per directory: the chosen and rejected scores, accuracy, mean and std of all rewards."""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForSequenceClassification

from finetune.reward_data import PairEncoder
from launcher.data.examples import ExampleSource, read_examples
from launcher.data.tokenizer import TextTokenizer


def main(hf: str, pairs: str) -> dict:
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    tok = TextTokenizer.load(hf)
    found = read_examples([ExampleSource(paths=[pairs])], PairEncoder(tok, 128), key="pairs")
    chosen, rejected = [], []
    with torch.no_grad():
        for e in found.examples:
            for out, tokens in ((chosen, e.tokens), (rejected, e.extras["rejected"].tokens)):
                ids = torch.tensor([tokens.tolist()], dtype=torch.long)
                out.append(float(model(input_ids=ids).logits[0, 0]))
    every = torch.tensor(chosen + rejected, dtype=torch.float64)
    return {
        "chosen": chosen,
        "rejected": rejected,
        "accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen),
        "mean": float(every.mean()),
        "std": float(every.std(unbiased=False)),
        "pad_token_id": model.config.pad_token_id,
        "kiln_reward": getattr(model.config, "kiln_reward", None),
    }


if __name__ == "__main__":
    for hf in sys.argv[1:-1]:  # one process for several: a start-up costs seconds
        print(json.dumps(main(hf, sys.argv[-1])))

"""A small synthetic SFT set: the answer is copied from a field named in the question.

Chats like "name: tom; city: oslo; color: red" + "What is the city?" -> "oslo". A model
that has not been fine-tuned on it answers almost never exactly; one that learned the format
copies the right field and stops with end of turn. Used by the tiny SFT config, the tests
and the benchmark:

    python -m finetune.format_task OUT_DIR [--train N --validation N]   # write the data
    python -m finetune.format_task OUT_DIR --score runs/sft-tiny/hf     # held-out scores

``score`` runs what a user gets: the exported HF directory, its tokenizer's chat template
(``add_generation_prompt``), greedy generation stopped by the tokenizer's EOS.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIELDS = {
    "name": [
        "tom",
        "ann",
        "bob",
        "eve",
        "sam",
        "kim",
        "joe",
        "amy",
        "ned",
        "liz",
        "dan",
        "sue",
        "max",
        "ida",
        "ray",
    ],
    "city": [
        "oslo",
        "rome",
        "lima",
        "kiev",
        "baku",
        "doha",
        "riga",
        "bonn",
        "nice",
        "graz",
        "york",
        "bern",
    ],
    "color": ["red", "blue", "green", "black", "white", "pink", "brown", "gray", "gold", "teal"],
}


def chat(rng: random.Random) -> dict:
    """One conversation of the task (a system turn half of the time)."""
    values = {k: rng.choice(v) for k, v in FIELDS.items()}
    asked = rng.choice(sorted(FIELDS))
    record = "; ".join(f"{k}: {v}" for k, v in values.items())
    messages = [
        {"role": "user", "content": f"{record}\nWhat is the {asked}?"},
        {"role": "assistant", "content": values[asked]},
    ]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": "Answer with one word."})
    return {"messages": messages}


def write(out: Path, train: int = 2000, validation: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """``out/train.jsonl`` and ``out/validation.jsonl`` (disjoint random draws)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "validation.jsonl"
    for path, n in zip(paths, (train, validation), strict=True):
        path.write_text("".join(json.dumps(chat(rng)) + "\n" for _ in range(n)))
    return paths


def score(model_dir: Path, validation: Path, n: int = 50, max_new_tokens: int = 32) -> dict:
    """Greedy answers of the HF model in ``model_dir`` to the first ``n`` conversations of
    ``validation``: ``exact_match`` (the decoded answer equals the reference, both stripped,
    as in SFT's own ``eval/exact_match``) and ``stopped`` (EOS within ``max_new_tokens``), as
    fractions of ``n``. A tokenizer without a chat template (a pretraining export) is prompted
    with SFT's default one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.chat import DEFAULT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = tokenizer.chat_template or DEFAULT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chats = [json.loads(line)["messages"] for line in validation.read_text().splitlines()][:n]
    exact = stopped = 0
    for messages in chats:
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **prompt,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, prompt["input_ids"].shape[1] :].tolist()
        stopped += tokenizer.eos_token_id in new
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        exact += answer == messages[-1]["content"].strip()
    return {"exact_match": exact / len(chats), "stopped": stopped / len(chats), "n": len(chats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", type=Path, metavar="HF_DIR", help="score a model instead")
    args = parser.parse_args(argv)
    if args.score is not None:
        print(json.dumps(score(args.score, args.out / "validation.jsonl", args.validation)))
        return 0
    for path in write(args.out, args.train, args.validation, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A small synthetic SFT set: the answer is copied from a field named in the question.

Chats like "name: tom; city: oslo; color: red" + "What is the city?" -> "oslo". A model
that has not been fine-tuned on it answers almost never exactly; one that learned the format
copies the right field and stops with end of turn. Used by the tiny SFT config, the tests
and the benchmark: ``python -m finetune.format_task OUT_DIR [--train N --validation N]``.
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


def write(out: Path, train: int = 400, validation: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """``out/train.jsonl`` and ``out/validation.jsonl`` (disjoint random draws)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "validation.jsonl"
    for path, n in zip(paths, (train, validation), strict=True):
        path.write_text("".join(json.dumps(chat(rng)) + "\n" for _ in range(n)))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--validation", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write(args.out, args.train, args.validation, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Synthetic preference pairs for the reward and DPO tests: the prompt lists a few fields and
asks for one; ``chosen`` copies the asked field's value, ``rejected`` gives a value of the
same field that is absent from the prompt. A model can only tell them apart by looking back
at the prompt, so held-out pairwise accuracy well above 50% means it learned to compare."""

from __future__ import annotations

import json
import random
from pathlib import Path

from finetune.format_task import FIELDS


def preference(rng: random.Random, chat: bool = False, margin: bool = False) -> dict:
    """One pair: ``{prompt, chosen, rejected}`` (or ``messages`` when ``chat``; a ``margin``
    in [0, 1) when ``margin``)."""
    values = {k: rng.choice(v) for k, v in FIELDS.items()}
    asked = rng.choice(sorted(FIELDS))
    shown = set(values.values())
    wrong = rng.choice([v for v in FIELDS[asked] if v not in shown])
    question = "; ".join(f"{k}: {v}" for k, v in values.items()) + f"\nWhat is the {asked}?"
    if chat:
        record: dict = {"messages": [{"role": "user", "content": question}]}
    else:
        record = {"prompt": question + "\n"}
    record |= {"chosen": values[asked], "rejected": wrong}
    if margin:
        record["margin"] = round(rng.random(), 3)
    return record


def preferences(n: int, seed: int = 0, chat: bool = False, margin: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [preference(rng, chat, margin) for _ in range(n)]


def write_preferences(
    out: Path, train: int = 400, validation: int = 100, seed: int = 0, chat: bool = False
) -> tuple[Path, Path]:
    """``out/train.jsonl`` and ``out/validation.jsonl`` (independent draws)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "validation.jsonl"
    for i, (path, n) in enumerate(zip(paths, (train, validation), strict=True)):
        records = preferences(n, seed * 2 + i, chat)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def make_reward_model(parent: Path, out: Path, stats: bool = True, seed: int = 1234) -> Path:
    """A reward model of ``parent``'s vocabulary (the parent with an untrained score head,
    seeded), as a reward-stage export: pad token and (``stats``) ``kiln_reward`` in its
    config.json."""
    from finetune.reward_model import load_reward_model
    from launcher.data.tokenizer import TextTokenizer

    model, _ = load_reward_model(parent, TextTokenizer.load(parent).pad_id, seed)
    if stats:
        model.config.kiln_reward = {"mean": 0.1, "std": 0.5}
    model.save_pretrained(out)
    return out

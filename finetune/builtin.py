"""Fine-tuning data drawn from the built-in corpus's world: the chain's SFT chats, preference
pairs and RL prompts, seeded like the corpus (``BuiltinCorpusConfig.seed``) and byte-identical
for the same config; a folder already written from the same config is reused.

Every record asks about one *fact* of the world (the river through a town, a town's region, a
person's town or trade, where a river rises or ends) after a *context*: a short paragraph
stating that fact among ``distractors`` facts of *other* kinds about other entities, in a
seeded order, none of which names a value of the asked kind (a question about a town sees one
town). The answer is read from the context by copying its one value of the asked type.
Held-out facts are answered only by reading: they were never seen in training. Measured with
the demo models (12M and 4M parameters, pretrained 3 minutes): neither learns that copy in
2-5 minutes of SFT. Greedy answers name a frequent value of the right kind (exact match
0.16-0.28, also with distractors of the same kind, more steps, or answers tokenized like the
context); a direct probe of the pretrained model ("Elise Daleby lives in Ashford. ... Elise
Daleby lives in") ranks "Ashford" 44th (24th after 320 steps of pretraining): no induction
head has formed yet, and the chain's SFT effect is limited by that, not by the data. Records
are in a seeded order (kinds mixed):

- ``sft/<split>.jsonl``: ``{"id", "messages": [user: context + question, assistant: " " +
  answer]}`` (the leading space: see ``records``)
- ``pairs/<split>.jsonl``: ``{"id", "messages": [user], "chosen": " " + answer, "rejected": " "
  + a value of the same kind the context does not name}`` (the reward and DPO stages' chat
  pairs: a reward model learns to check an answer against the context)
- ``prompts/<split>.jsonl``: ``{"id", "messages": [user], "answer"}`` (PPO and GRPO read the
  prompt only; scoring scripts use the answer)

Splits (``train``, ``validation``, ``test``) go by a hash of the fact (kind and entity, not
the variant: a held-out fact was never seen with another context): 10% test, 10% validation,
whatever the number of records. Classification uses the corpus's own ``genre``
field instead. ``manifest.json`` is written last: a folder with a matching manifest is complete.

    python -m finetune.builtin OUT_DIR [--seed 0] [--variants 2] [--distractors 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from launcher import atomic
from launcher.config import Section
from pretrain.data.builtin import World

SPLITS = ("train", "validation", "test")
KINDS_DIRS = ("sft", "pairs", "prompts")
MANIFEST = "manifest.json"
VERSION = 6
"""Bumped whenever the records a config gives change (a reused folder must be the same)."""


class BuiltinFinetuneConfig(Section):
    seed: int = Field(0, ge=0)
    """The world's seed: the corpus's ``data.builtin.seed``, so both describe one world."""
    dir: str = "data/builtin-finetune"
    variants: int = Field(2, gt=0)
    """Contexts per fact (different distractors and orders)."""
    distractors: int = Field(3, ge=1)
    """Facts of other kinds in each context (at most one per kind: five)."""


@dataclass(frozen=True)
class Kind:
    """One kind of fact: the entities it is about, and for one entity its question, answer and
    the sentence that states it."""

    name: str
    entities: Callable[[World], list]
    key: Callable[[object], str]
    question: Callable[[object], str]
    answer: Callable[[object], str]
    statement: Callable[[object], str]


KINDS = (
    Kind(
        "river_of_town",
        lambda w: w.towns,
        lambda t: t.name,
        lambda t: f"Which river runs through {t.name}?",
        lambda t: t.river.name,
        lambda t: f"Through {t.name} runs the {t.river.name}.",
    ),
    Kind(
        "region_of_town",
        lambda w: w.towns,
        lambda t: t.name,
        lambda t: f"In which region is {t.name}?",
        lambda t: t.region,
        lambda t: f"{t.name} lies in {t.region}.",
    ),
    Kind(
        "town_of_person",
        lambda w: w.people,
        lambda p: p.name,
        lambda p: f"Where does {p.name} live?",
        lambda p: p.town.name,
        lambda p: f"{p.name} lives in {p.town.name}.",
    ),
    Kind(
        "trade_of_person",
        lambda w: w.people,
        lambda p: p.name,
        lambda p: f"What is the trade of {p.name}?",
        lambda p: p.trade[0],
        lambda p: f"{p.name} works as a {p.trade[0]}.",
    ),
    Kind(
        "source_of_river",
        lambda w: w.rivers,
        lambda r: r.name,
        lambda r: f"Where does the {r.name} rise?",
        lambda r: r.hills,
        lambda r: f"The {r.name} rises in {r.hills}.",
    ),
    Kind(
        "mouth_of_river",
        lambda w: w.rivers,
        lambda r: r.name,
        lambda r: f"Into which sea does the {r.name} flow?",
        lambda r: r.mouth,
        lambda r: f"The {r.name} flows into {r.mouth}.",
    ),
)


def split_of(fact_id: str) -> str:
    """``test`` for 10% of facts, ``validation`` for 10%, else ``train`` (by SHA-256)."""
    bucket = hashlib.sha256(fact_id.encode()).digest()[0] % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def facts(cfg: BuiltinFinetuneConfig) -> list[dict]:
    """Every record, in a fixed order: ``{id, split, context, question, answer, rejected}``."""
    world = World(cfg.seed)
    out = []
    for kind in KINDS:
        entities = kind.entities(world)
        values = sorted({kind.answer(e) for e in entities})
        others = [k for k in KINDS if k is not kind]
        for entity in entities:
            for variant in range(cfg.variants):
                fact_id = f"{kind.name}:{kind.key(entity)}"
                record_id = f"{fact_id}:{variant}"
                rng = random.Random(f"kiln-builtin-finetune:{cfg.seed}:{record_id}")
                answer = kind.answer(entity)
                sentences = [kind.statement(entity)]
                for other in rng.sample(others, len(others)):
                    if len(sentences) > cfg.distractors:
                        break
                    candidates = other.entities(world)
                    for _ in range(20):  # one naming no value of the asked kind, nor the entity
                        said = other.statement(rng.choice(candidates))
                        if kind.key(entity) not in said and not any(v in said for v in values):
                            sentences.append(said)
                            break
                rng.shuffle(sentences)
                context = " ".join(sentences)
                # the rejected answer: a value of the kind the context does not name (a
                # reward model learns to check an answer against the context)
                absent = [v for v in values if v != answer and v not in context]
                out.append(
                    {
                        "id": record_id,
                        "split": split_of(fact_id),
                        "context": context,
                        "question": kind.question(entity),
                        "answer": answer,
                        "rejected": rng.choice(absent),
                    }
                )
    # kinds mixed: the first records of a split (a scored sample) are not all of one kind
    random.Random(f"kiln-builtin-finetune:{cfg.seed}:order").shuffle(out)
    return out


def records(fact: dict) -> dict[str, dict]:
    """The fact as an SFT chat, a preference pair and a prompt."""
    user = {"role": "user", "content": f"{fact['context']}\n{fact['question']}"}
    # A leading space: kiln's tokenizers mark a word's start ("▁Ashford"), and a word right
    # after the template's newline would have none ("Ashford", "c ar penter" for "carpenter"):
    # with it, the answer is the very tokens of the context, so copying it needs no second
    # spelling (the demo models still do not copy: see the module's docstring). Scorers
    # (SFT's exact match, format_task.score) strip both sides.
    chosen, rejected = " " + fact["answer"], " " + fact["rejected"]
    answer = {"role": "assistant", "content": chosen}
    return {
        "sft": {"id": fact["id"], "messages": [user, answer]},
        "pairs": {"id": fact["id"], "messages": [user], "chosen": chosen, "rejected": rejected},
        "prompts": {"id": fact["id"], "messages": [user], "answer": fact["answer"]},
    }


def paths(out: Path) -> dict[str, dict[str, Path]]:
    """``{"sft" | "pairs" | "prompts": {split: file}}`` under ``out``."""
    return {kind: {s: out / kind / f"{s}.jsonl" for s in SPLITS} for kind in KINDS_DIRS}


def write_builtin_finetune(cfg: BuiltinFinetuneConfig) -> dict[str, dict[str, Path]]:
    """Write the records under ``cfg.dir`` (or reuse them); their paths by kind and split."""
    out = Path(cfg.dir)
    files = paths(out)
    wanted = {"version": VERSION, "config": cfg.model_dump()}
    manifest = out / MANIFEST
    if _saved(manifest, wanted) and all(
        p.is_file() for by_split in files.values() for p in by_split.values()
    ):
        return files
    manifest.unlink(missing_ok=True)
    lines: dict[tuple[str, str], list[str]] = {(k, s): [] for k in KINDS_DIRS for s in SPLITS}
    for fact in facts(cfg):
        split = fact["split"]
        for kind, record in records(fact).items():
            lines[kind, split].append(json.dumps(record, ensure_ascii=False) + "\n")
    counts = {}
    for (kind, split), rows in lines.items():
        path = files[kind][split]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, "".join(rows))
        counts[f"{kind}/{split}"] = len(rows)
    atomic.write_text(manifest, json.dumps({**wanted, "records": counts}, indent=2) + "\n")
    return files


def _saved(manifest: Path, wanted: dict) -> bool:
    """Whether ``manifest`` describes records made by ``wanted``; one that cannot be read
    (a run killed while writing it before it was atomic, an edit) means: write them again."""
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {k: saved.get(k) for k in wanted} == wanted


def prepare(**settings) -> Path:
    """``kiln pipeline``'s ``prepare`` hook: the data of ``BuiltinFinetuneConfig(**settings)``
    written (or reused); returns its folder."""
    cfg = BuiltinFinetuneConfig(**settings)
    write_builtin_finetune(cfg)
    return Path(cfg.dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--distractors", type=int, default=3)
    args = p.parse_args(argv)
    cfg = BuiltinFinetuneConfig(
        seed=args.seed, dir=str(args.out), variants=args.variants, distractors=args.distractors
    )
    write_builtin_finetune(cfg)
    counts = json.loads((args.out / MANIFEST).read_text())["records"]
    print(json.dumps(counts))


if __name__ == "__main__":
    main()

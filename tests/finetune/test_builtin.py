"""finetune/builtin.py: the chain's fine-tuning data from the built-in world."""

from __future__ import annotations

import json
import re

from finetune.builtin import (
    KINDS,
    SPLITS,
    BuiltinFinetuneConfig,
    facts,
    split_of,
    write_builtin_finetune,
)
from pretrain.data.builtin import World


def read(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_the_same_config_gives_the_same_bytes_and_is_reused(tmp_path):
    a = write_builtin_finetune(BuiltinFinetuneConfig(dir=str(tmp_path / "a")))
    b = write_builtin_finetune(BuiltinFinetuneConfig(dir=str(tmp_path / "b")))
    for kind, by_split in a.items():
        for split, path in by_split.items():
            assert path.read_bytes() == b[kind][split].read_bytes(), (kind, split)
    stamp = a["sft"]["train"].stat().st_mtime_ns
    write_builtin_finetune(BuiltinFinetuneConfig(dir=str(tmp_path / "a")))  # reused
    assert a["sft"]["train"].stat().st_mtime_ns == stamp
    other = write_builtin_finetune(BuiltinFinetuneConfig(dir=str(tmp_path / "c"), seed=1))
    assert other["sft"]["train"].read_bytes() != a["sft"]["train"].read_bytes()


def test_a_broken_manifest_means_the_records_are_written_again(tmp_path):
    """A manifest cut short (a kill while it was written) or edited into another shape was a
    JSONDecodeError traceback in every later run; now the records are written again."""
    cfg = BuiltinFinetuneConfig(dir=str(tmp_path / "a"), variants=1)
    files = write_builtin_finetune(cfg)
    want = {(k, s): p.read_bytes() for k, by in files.items() for s, p in by.items()}
    manifest = tmp_path / "a" / "manifest.json"
    whole = manifest.read_text()
    for broken in (whole[: len(whole) // 2], "[1, 2]", ""):
        manifest.write_text(broken)
        files["sft"]["train"].write_text("stale\n")
        again = write_builtin_finetune(cfg)
        assert {(k, s): p.read_bytes() for k, by in again.items() for s, p in by.items()} == want
        assert json.loads(manifest.read_text()) == json.loads(whole)
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_the_answer_is_read_from_the_one_sentence_of_its_kind_and_the_rejected_is_absent():
    cfg = BuiltinFinetuneConfig(variants=1)
    found = facts(cfg)
    world = World(cfg.seed)
    expected = sum(len(k.entities(world)) for k in KINDS)
    assert len(found) == expected  # one record per fact and variant, none dropped
    for fact in found:
        sentences = [s.rstrip(".") + "." for s in fact["context"].split(". ")]
        assert len(sentences) == 1 + cfg.distractors
        # the asked entity's sentence states the answer; no other sentence names either
        entity = fact["id"].split(":")[1]
        own = [s for s in sentences if re.search(rf"\b{re.escape(entity)}\b", s)]
        assert len(own) == 1 and fact["answer"] in own[0], fact
        assert all(fact["answer"] not in s for s in sentences if s != own[0]), fact
        # no other value of the asked kind is named: the answer is the context's one
        kind = next(k for k in KINDS if k.name == fact["id"].split(":")[0])
        values = {kind.answer(e) for e in kind.entities(world)}
        named = [v for v in values if re.search(rf"\b{re.escape(v)}\b", fact["context"])]
        assert named == [fact["answer"]], fact
        # the rejected answer: a value of the same kind, named nowhere in the context
        assert fact["rejected"] != fact["answer"] and fact["rejected"] not in fact["context"]


def test_answers_are_the_tokens_the_context_names(tmp_path):
    """The assistant's answer starts with a space: a trained tokenizer gives it the word-start
    tokens it has in the context (after the template's newline it would have others)."""
    from finetune.chat import encode_chat
    from launcher.data.tokenizer import TokenizerConfig
    from launcher.data.tokenizer_training import train_tokenizer

    files = write_builtin_finetune(BuiltinFinetuneConfig(dir=str(tmp_path / "ft")))
    chats = [r["messages"] for r in read(files["sft"]["train"])]
    texts = [m["content"] for chat in chats for m in chat]
    tok = train_tokenizer(TokenizerConfig(vocab_size=600), texts, tmp_path / "tok").tokenizer
    for chat in chats[:200]:
        assert chat[1]["content"] == " " + chat[1]["content"].strip()
        example = encode_chat(tok, chat)
        ids = example.tokens.tolist()
        trained = [i for i, m in zip(ids, example.loss_mask.tolist(), strict=True) if m]
        answer = trained[:-1]  # the end of turn aside
        context = ids[: ids.index(tok.eos_id)]
        assert any(context[i : i + len(answer)] == answer for i in range(len(context))), chat


def test_splits_are_by_fact_disjoint_and_shared_by_every_kind(tmp_path):
    files = write_builtin_finetune(BuiltinFinetuneConfig(dir=str(tmp_path)))
    facts_in = {}
    for split in SPLITS:
        ids = [r["id"] for r in read(files["sft"][split])]
        assert ids == [r["id"] for r in read(files["pairs"][split])]
        assert ids == [r["id"] for r in read(files["prompts"][split])]
        facts_in[split] = {i.rsplit(":", 1)[0] for i in ids}
        assert all(split_of(f) == split for f in facts_in[split])
    assert not facts_in["train"] & facts_in["validation"]
    assert not facts_in["train"] & facts_in["test"]
    total = sum(len(f) for f in facts_in.values())
    assert 0.05 < len(facts_in["test"]) / total < 0.15  # about 10%
    chat = read(files["sft"]["train"])[0]["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant"]
    pair = read(files["pairs"]["validation"])[0]
    assert pair["messages"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]

"""The GRPO stage: the rule reward, prompt records, config errors, the loss against TRL 1.16's
``GRPOTrainer.compute_loss`` (fp32 settings of /work/shared/NOTES.md "TRL as a numerical
anchor"), and real `kiln grpo` runs: learning on the pretrained tiny parent, exact resume,
2 ranks under ZeRO-2."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune.chat import generation_prompt
from finetune.grpo import GRPOTask, PromptEncoder, letter_share
from finetune.grpo_config import GRPOSection
from launcher.cli import main as kiln_main
from launcher.config import CONFIG_ROOT
from launcher.data.examples import ExampleSource, read_examples
from launcher.data.tokenizer import TextTokenizer

from .classify_fixtures import tiny_parent
from .fixtures import make_reward_model, write_preferences
from .sft_fixtures import write_jsonl
from .test_reward_runs import QUIET, SEED, kiln, losses, metrics

__all__ = ["tiny_parent"]  # fixture

GRPO_TINY = str(CONFIG_ROOT / "finetune" / "grpo-tiny.yaml")


def test_letter_share_is_the_vowel_share_of_the_letters():
    assert letter_share("aei bc") == pytest.approx(0.6)
    assert letter_share("AE 12 !") == 1.0
    assert letter_share("") == letter_share(" 42 ") == 0.0


def test_prompt_records_encode_and_bad_ones_are_counted(tiny_parent, tmp_path):
    tok = TextTokenizer.load(tiny_parent)
    chat = [{"role": "user", "content": "name the city"}]
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"messages": chat},
            {"prompt": "name the city"},
            {"messages": [*chat, {"role": "assistant", "content": "x"}]},
            {"completion": "x"},
            {"prompt": ""},
            {"prompt": "word " * 40},
        ],
    )
    got = read_examples([ExampleSource(paths=[str(data)])], PromptEncoder(tok, 20), key="k")
    chat_ids, plain_ids = (e.tokens.tolist() for e in got.examples)
    assert chat_ids == generation_prompt(tok, chat)  # ends with the "Assistant:\n" header
    assert plain_ids == tok.encode("name the city")
    assert not any(e.loss_mask.any() for e in got.examples)
    skipped = {k: v for k, v in got.counters.items() if k.startswith("skipped_")}
    assert skipped == {
        "skipped_ends_with_answer": 1,
        "skipped_not_a_prompt": 1,
        "skipped_empty_prompt": 1,
        "skipped_prompt_too_long": 1,
    }


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("grpo.group_size=1", "grpo.group_size"),
        ("train.global_batch_size=18", "train.global_batch_size"),
        ("grpo.reward=no_such_module:f", "grpo.reward"),
        ("grpo.reward=finetune.grpo:no_such_function", "grpo.reward"),
        ("grpo.reward=null", "grpo.reward"),
        ("grpo.reward_model=/no/such/dir", "grpo.reward"),  # both set
    ],
)
def test_config_errors_exit_2_naming_the_key(tiny_parent, tmp_path, capsys, override, key):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    args = [
        f"run.output_dir={tmp_path}", f"init.path={tiny_parent}", "data.max_seq_len=64",
        f"data.train=[{{paths: [{data}]}}]", "train.micro_batch_size=6", override,
    ]  # fmt: skip
    if "global_batch_size" not in override:
        args.append("train.global_batch_size=12")
    assert kiln_main(["grpo", GRPO_TINY, *args]) == 2
    assert key in capsys.readouterr().err


def test_raise_on_bad_data_exits_1_with_file_and_line(tiny_parent, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"completion": "x"}])
    args = [
        f"run.output_dir={tmp_path}", f"init.path={tiny_parent}", "data.max_seq_len=64",
        f"data.train=[{{paths: [{data}]}}]", "data.on_error=raise",
    ]  # fmt: skip
    assert kiln_main(["grpo", GRPO_TINY, *args]) == 1
    assert f"{data}:2: " in capsys.readouterr().err


def test_a_failing_reward_names_the_function_and_the_prompt(tmp_path):
    task = SimpleNamespace(cfg=SimpleNamespace(grpo=GRPOSection(reward="m:f")))
    task.reward_fn = lambda text: 1 / 0
    with pytest.raises(ValueError, match=r"grpo.reward m:f raised ZeroDivisionError.*p.jsonl:3"):
        GRPOTask._reward(task, "text", "p.jsonl:3")
    task.reward_fn = lambda text: float("nan")
    with pytest.raises(ValueError, match=r"grpo.reward m:f returned nan .*p.jsonl:4"):
        GRPOTask._reward(task, "text", "p.jsonl:4")


# ------------------------------------------------------------------------------ TRL anchor

PROMPTS = [[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]]  # equal lengths: no padding
COMPLETIONS = [[20, 21, 2], [22, 23, 24, 25], [26, 2], [27, 28, 29]]  # ends at EOS (2) or cut


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_trl_grpo_trainer_gives_kilns_loss(tiny_parent, tmp_path, loss):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_parent, dtype=torch.float32).eval()
    tok = TextTokenizer.load(tiny_parent)
    width = max(map(len, COMPLETIONS))
    completion_ids = torch.full((len(COMPLETIONS), width), tok.pad_id)
    completion_mask = torch.zeros_like(completion_ids)
    for row, ids in enumerate(COMPLETIONS):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    advantages = torch.tensor([1.2, -0.7, 0.4, -0.9])
    # old log-probs off the current ones, so that the ratio and its clip take part
    old = -3.0 + torch.randn(completion_ids.shape, generator=torch.Generator().manual_seed(0))
    prompt_ids = torch.tensor(PROMPTS)
    n_prompt = prompt_ids.shape[1]

    section = GRPOSection(loss=loss, temperature=0.7, epsilon=0.2, epsilon_high=0.28)
    task = GRPOTask.__new__(GRPOTask)
    task.cfg, task.reference = SimpleNamespace(grpo=section), None
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    ours_mask = torch.cat([torch.zeros_like(prompt_ids), completion_mask], 1)
    old_logp = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
    old_logp[:, n_prompt - 1 :] = old
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.cat([torch.ones_like(prompt_ids), completion_mask], 1),
        "completion_mask": ours_mask,
        "advantages": advantages,
        "old_logp": old_logp,
    }
    with torch.no_grad():
        ours = float(task.loss(model, batch)) / task.items_in(batch)

    args = GRPOConfig(
        output_dir=str(tmp_path), loss_type=loss, temperature=0.7, epsilon=0.2,
        epsilon_high=0.28, beta=0.0, num_generations=4, per_device_train_batch_size=4,
        bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 4),
        processing_class=AutoTokenizer.from_pretrained(tiny_parent),
    )
    trainer.current_gradient_accumulation_steps = 1
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": completion_mask.sum(),
    }
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, inputs))
    assert abs(theirs) > 1e-2  # not the trivial point
    assert abs(ours - theirs) < 1e-5, (ours, theirs)


# ------------------------------------------------------------------------------- real runs


def run_grpo(root: Path, name: str, parent: Path, data: Path, *extra: str, nproc: int = 1):
    return kiln(
        root, "grpo", GRPO_TINY, "--nproc", str(nproc),
        f"run.output_dir={root}", f"run.name={name}", f"run.seed={SEED}",
        f"init.path={parent}", f"data.train=[{{paths: [{data}]}}]",
        "checkpoint.every=null", *QUIET, *extra,
    )  # fmt: skip


def rewards(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["grpo/reward_mean"] for m in metrics(run_dir) if "grpo/reward_mean" in m}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """The synthetic preferences' prompts as chats (their answers are ignored)."""
    train, _ = write_preferences(tmp_path_factory.mktemp("prompts"), train=200, chat=True)
    return train


@pytest.mark.slow
def test_grpo_raises_the_rule_reward_within_30_steps(pretrained, prompts, tmp_path):
    run_grpo(tmp_path, "learn", pretrained, prompts)  # the recipe: 30 steps of 8 prompts x 4
    got = rewards(tmp_path / "learn")
    assert sorted(got) == list(range(1, 31))
    last = np.mean([got[s] for s in range(26, 31)])
    print(f"mean reward: step 1 {got[1]:.3f}, steps 26-30 {last:.3f}")
    assert last >= got[1] + 0.2, got
    samples = [json.loads(x) for x in (tmp_path / "learn" / "samples.jsonl").open()]
    assert len(samples) == 4 * 30 and {"where", "completion", "reward"} <= set(samples[0])
    rows = [m for m in metrics(tmp_path / "learn") if "grpo/reward_mean" in m]
    assert all(0 < m["time/generation"] <= m["time/rollout"] for m in rows)
    hf = tmp_path / "learn" / "hf"
    assert json.loads((hf / "tokenizer_config.json").read_text()).get("chat_template")
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_a_resume_continues_exactly(pretrained, prompts, tmp_path):
    steps = ["train.max_steps=6", "train.global_batch_size=16"]
    run_grpo(tmp_path, "whole", pretrained, prompts, *steps)
    run_grpo(tmp_path, "resumed", pretrained, prompts, *steps, "train.stop_after=3")
    assert max(losses(tmp_path / "resumed")) == 3
    run_grpo(tmp_path, "resumed", pretrained, prompts, *steps)
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(4, 7)] == [whole[s] for s in range(4, 7)]
    assert [rewards(tmp_path / "resumed")[s] for s in range(4, 7)] == [
        rewards(tmp_path / "whole")[s] for s in range(4, 7)
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_under_zero2(pretrained, prompts, tmp_path):
    run_grpo(tmp_path, "two", pretrained, prompts, "train.max_steps=3", "dist.zero_stage=2",
             "train.global_batch_size=16", "grpo.scale_rewards=batch", nproc=2)  # fmt: skip
    rows = metrics(tmp_path / "two")
    assert {m["dist/world_size"] for m in rows if "dist/world_size" in m} == {2.0}
    assert sorted(rewards(tmp_path / "two")) == [1, 2, 3]
    assert (tmp_path / "two" / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_a_reward_model_scores_the_completions(pretrained, prompts, tmp_path):
    rm = make_reward_model(pretrained, tmp_path / "rm")
    run_grpo(tmp_path, "rm", pretrained, prompts, "train.max_steps=2", "grpo.reward=null",
             f"grpo.reward_model={rm}", "train.global_batch_size=16")  # fmt: skip
    samples = [json.loads(x) for x in (tmp_path / "rm" / "samples.jsonl").open()]
    scores = {s["reward"] for s in samples}
    assert len(samples) == 8 and len(scores) > 1 and all(np.isfinite(list(scores)))
    assert sorted(rewards(tmp_path / "rm")) == [1, 2]

"""The PPO stage: config errors, the actor-critic's gathered log-probs and values, and real
`kiln ppo` runs: a rule reward learned with the KL held near its target, the first minibatch
of every iteration at ratio 1, an exact resume from the middle of an iteration, greedy
rollouts on 2 ranks vs 1, and ZeRO-3 on 2 ranks with a reward model and a separate critic."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.ppo import PPOTask, Rollout
from finetune.ppo_config import PPOSection
from finetune.ppo_model import ActorCritic, build_actor_critic, gather_responses
from launcher.cli import main as kiln_main
from launcher.config import CONFIG_ROOT

from .classify_fixtures import tiny_parent
from .fixtures import make_reward_model, write_preferences
from .sft_fixtures import write_jsonl
from .test_reward_runs import QUIET, SEED, kiln, losses, metrics

__all__ = ["tiny_parent"]  # fixture

PPO_TINY = str(CONFIG_ROOT / "finetune" / "ppo-tiny.yaml")


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ppo.rollout_size=24", "ppo.rollout_size"),
        ("ppo.reward_function=null", "ppo.reward_model"),
        ("ppo.reward_function=no_such_module:f", "ppo.reward_function"),
        ("ppo.max_new_tokens=64", "ppo.max_new_tokens"),
        ("ppo.critic=reward_model", "ppo.critic"),
    ],
)
def test_config_errors_exit_2_naming_the_key(tiny_parent, tmp_path, capsys, override, key):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    args = [f"run.output_dir={tmp_path}", f"init.path={tiny_parent}", "data.max_seq_len=64",
            f"data.train=[{{paths: [{data}]}}]", override]  # fmt: skip
    assert kiln_main(["ppo", PPO_TINY, *args]) == 2
    assert key in capsys.readouterr().err


def test_a_reward_model_of_another_vocabulary_is_refused(tiny_parent, tmp_path, capsys):
    other = tmp_path / "rm"
    other.mkdir()
    config = json.loads((tiny_parent / "config.json").read_text())
    config["vocab_size"] += 1
    config["architectures"] = ["LlamaForSequenceClassification"]
    (other / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    args = [f"run.output_dir={tmp_path}", f"init.path={tiny_parent}",
            f"data.train=[{{paths: [{data}]}}]", "ppo.reward_function=null",
            f"ppo.reward_model={other}"]  # fmt: skip
    assert kiln_main(["ppo", PPO_TINY, *args]) == 2
    assert "must share its tokenizer" in capsys.readouterr().err


def test_a_failing_rule_names_the_function_and_the_prompt():
    task = SimpleNamespace(cfg=SimpleNamespace(ppo=PPOSection(reward_function="m:f")))
    task.reward_fn = lambda text: 1 / 0
    with pytest.raises(ValueError, match=r"ppo.reward_function m:f raised ZeroDivisionError.*p:3"):
        PPOTask._rule(task, "text", "p:3")
    task.reward_fn = lambda text: float("inf")
    with pytest.raises(ValueError, match=r"ppo.reward_function m:f returned inf .*p:4"):
        PPOTask._rule(task, "text", "p:4")


def test_a_rollout_saved_by_other_ranks_is_not_taken():
    """Mid-iteration, a rollout's rows are spread over the saving ranks: on another world
    size nothing is loaded (the step then refuses to go on, naming the world size)."""
    saved = {key: torch.zeros(1) for key in Rollout.KEYS}
    same, other = Rollout(rank=1, world_size=2), Rollout(rank=0, world_size=1)
    same.load_state_dict([saved, {**saved, "start": torch.ones(1)}])
    other.load_state_dict([saved, saved])
    assert torch.equal(same.tensors["start"], torch.ones(1))
    assert other.tensors == {} and other.saved_world == 2


# ------------------------------------------------------------------------- the actor-critic


def test_gathered_log_probs_and_values_are_the_response_positions(tiny_parent):
    """Rows of different prompt lengths, right-padded: the [B, T] response log-probs equal a
    per-row forward's, at the positions that predict each response token."""
    model = build_actor_critic(tiny_parent, None, SEED, "value_head", None).eval()
    rows = [([5, 6, 7, 8], [20, 21, 2]), ([9, 10], [22, 23, 24, 25])]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    index = torch.zeros(2, 4, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        index[i] = (len(p) - 1 + torch.arange(4)).clamp(max=width - 2)
    with torch.no_grad():
        logits, values = model(ids, mask)
        logp, _ = gather_responses(logits, ids, index, 0.7)
        for i, (p, r) in enumerate(rows):
            alone = torch.tensor([p + r])
            own, own_values = model(alone, torch.ones_like(alone))
            expect = torch.log_softmax(own[0, len(p) - 1 : -1] / 0.7, -1)
            expect = expect.gather(-1, torch.tensor(r)[:, None])[:, 0]
            assert torch.allclose(logp[i, : len(r)], expect, atol=1e-5)
            assert torch.allclose(values[i, len(p) - 1], own_values[0, len(p) - 1], atol=1e-5)
    assert isinstance(model, ActorCritic) and values.shape == ids.shape


def test_the_judges_answer_log_probs_are_each_rows_own(tiny_parent):
    """The judge's KL terms: generated rows of different prompt and answer lengths, right-padded
    together, give each answer's summed log-probs (temperature 1) of a forward of that row
    alone; an answer cut at its first EOS keeps the EOS and drops what follows."""
    from finetune.judge import answer_logps, right_padded
    from finetune.ppo_model import load_actor

    model = load_actor(tiny_parent, None, SEED).eval()
    rows = [(torch.tensor([5, 6, 7, 8, 20, 21, 2]), 4, True), (torch.tensor([9, 10, 22]), 2, False)]
    ids, attention, start, length = right_padded(rows, pad_id=0)
    assert ids.shape == (2, 7) and start.tolist() == [4, 2] and length.tolist() == [3, 1]
    with torch.no_grad():
        got = answer_logps(model, ids, attention, start, length, torch.device("cpu"))
        for i, (row, s, _) in enumerate(rows):
            logits = model(input_ids=row[None]).logits[0]
            expect = torch.log_softmax(logits[s - 1 : -1], -1).gather(-1, row[s:, None]).sum()
            assert abs(got[i] - expect) < 1e-4, (i, got, expect)


# ------------------------------------------------------------------------------- real runs


def run_ppo(
    root: Path, name: str, parent: Path, data: Path, *extra: str, nproc: int = 1, check=True
):
    return kiln(
        root, "ppo", PPO_TINY, "--nproc", str(nproc),
        f"run.output_dir={root}", f"run.name={name}", f"run.seed={SEED}",
        f"init.path={parent}", f"data.train=[{{paths: [{data}]}}]",
        "checkpoint.every=null", *QUIET, *extra, threads=2 // nproc, check=check,
    )  # fmt: skip


def per_step(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(run_dir) if key in m}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """The synthetic preferences' prompts as chats (their answers are ignored)."""
    train, _ = write_preferences(tmp_path_factory.mktemp("prompts"), train=400, chat=True)
    return train


ITERATIONS = 40
PER_ITERATION = 4  # ppo-tiny.yaml: 2 passes x 32 responses / 16 per minibatch
KL_TARGET = 6.0


@pytest.fixture(scope="module")
def learned(pretrained, prompts, tmp_path_factory) -> Path:
    """40 iterations of the recipe with its rule reward (vowel share of the response)."""
    root = tmp_path_factory.mktemp("ppo")
    started = time.time()
    run_ppo(root, "learn", pretrained, prompts, f"train.max_steps={ITERATIONS * PER_ITERATION}",
            f"ppo.kl_target={KL_TARGET}", "checkpoint.every=80")  # fmt: skip
    print(f"kiln ppo: {ITERATIONS} iterations in {time.time() - started:.0f} s")
    return root / "learn"


@pytest.mark.slow
def test_ppo_raises_the_rule_reward_and_keeps_the_kl_near_its_target(learned):
    scores, kl = per_step(learned, "ppo/score"), per_step(learned, "ppo/kl")
    firsts = list(range(1, ITERATIONS * PER_ITERATION + 1, PER_ITERATION))
    assert sorted(scores) == firsts  # one rollout per iteration, at its first step
    first, last = scores[1], float(np.mean([scores[s] for s in firsts[-5:]]))
    final_kl = float(np.mean([kl[s] for s in firsts[-5:]]))
    print(f"mean score: iteration 1 {first:.3f}, last 5 {last:.3f}; KL {final_kl:.3f}")
    assert last >= first + 0.3
    assert final_kl < 2 * KL_TARGET
    # every iteration's first minibatch is the rollout's own policy: ratio 1, nothing clipped
    for step in firsts:
        row = next(m for m in metrics(learned) if m["step"] == step)
        assert row["ppo/ratio_max_dev"] <= 1e-6, step
        assert row["ppo/clipfrac"] == 0.0 and row["ppo/approxkl"] <= 1e-7, step
    samples = [json.loads(x) for x in (learned / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * ITERATIONS and {"response", "score", "where"} <= set(samples[0])


@pytest.mark.slow
def test_the_export_is_the_actor_and_kiln_export_writes_the_same(learned, tmp_path):
    hf = learned / "hf"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    exported = load_file(str(hf / "model.safetensors"))
    checkpoint = learned / "checkpoints" / f"step-{ITERATIONS * PER_ITERATION:08d}"
    kiln(tmp_path, "export", str(checkpoint), "--out", str(tmp_path / "out"), "--dtype", "fp32")
    again = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(again) == sorted(exported)
    assert all(torch.equal(again[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_a_resume_in_the_middle_of_an_iteration_continues_exactly(
    pretrained, prompts, learned, tmp_path
):
    """Stop 2 steps into the second iteration; the resumed run's next 3 steps (the rest of
    it from the saved rollout, then a new rollout from the saved RNG) equal the
    uninterrupted run's."""
    horizon, kl = f"train.max_steps={ITERATIONS * PER_ITERATION}", f"ppo.kl_target={KL_TARGET}"
    run_ppo(tmp_path, "resumed", pretrained, prompts, horizon, kl, "train.stop_after=6")
    assert max(losses(tmp_path / "resumed")) == 6
    run_ppo(tmp_path, "resumed", pretrained, prompts, horizon, kl, "train.stop_after=3")
    whole, resumed = losses(learned), losses(tmp_path / "resumed")
    for step in (7, 8, 9):
        assert abs(resumed[step] - whole[step]) <= 1e-6, (step, resumed[step], whole[step])
    assert per_step(tmp_path / "resumed", "ppo/score")[9] == per_step(learned, "ppo/score")[9]


GREEDY = ["ppo.do_sample=false", "ppo.rollout_size=16", "ppo.epochs=2", "train.max_steps=4",
          "train.global_batch_size=16", "train.micro_batch_size=4"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_greedy_rollouts_on_two_ranks_give_one_ranks_losses(pretrained, prompts, tmp_path):
    """rollout_size = global batch: every step's minibatch is the whole rollout, so the
    loss (a global token mean) does not depend on how rows are spread over ranks. Tolerance
    1e-5 of max(|loss|, 1): the policy loss is a mean of terms of the whitened advantages'
    scale (1), and at each iteration's first step (ratio 1) it is their mean, 0 up to
    rounding, so a relative bound on the loss alone would measure rounding of 0 (seen:
    1.5e-7 absolute on a loss of 6e-4)."""
    run_ppo(tmp_path, "one", pretrained, prompts, *GREEDY, "dist.zero_stage=0")
    run_ppo(tmp_path, "two", pretrained, prompts, *GREEDY, "dist.zero_stage=2", nproc=2)
    assert {m["dist/world_size"] for m in metrics(tmp_path / "two")} == {2.0}
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]  # 2 iterations of 2 steps
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * max(abs(one[step]), 1.0), (step, one, two)


@pytest.fixture
def reward_model(pretrained, tmp_path) -> Path:
    return make_reward_model(pretrained, tmp_path / "rm")


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_on_two_ranks_with_a_reward_model_and_its_critic(
    pretrained, prompts, reward_model, tmp_path
):
    """Sampled responses of different lengths to prompts of different lengths: the rollout's
    generation, frozen reference and reward model (ZeRO-3 inference engines) and the
    minibatch steps all complete (no rank waits for another's collective). The judge (held-out
    answers scored by the run's reward model, at the start and the end) too: at the start the
    actor is its reference, KL 0."""
    started = time.time()
    judge = f"judge={{prompts: [{{paths: [{prompts}]}}], examples: 6, max_new_tokens: 5}}"
    run_ppo(tmp_path, "z3", pretrained, prompts, "dist.zero_stage=3", "train.max_steps=4",
            "ppo.reward_function=null", f"ppo.reward_model={reward_model}", "ppo.critic=null",
            "ppo.max_new_tokens=12", judge, "eval.at_start=true", nproc=2)  # fmt: skip
    seconds = time.time() - started
    rows = metrics(tmp_path / "z3")
    assert {m["dist/world_size"] for m in rows} == {2.0}
    assert sorted(losses(tmp_path / "z3")) == [1, 2, 3, 4]
    lengths = per_step(tmp_path / "z3", "ppo/response_length")
    print(f"ZeRO-3, 2 ranks: one iteration + export in {seconds:.0f} s; lengths {lengths}")
    assert seconds < 120
    judged = {m["step"]: m for m in rows if "eval/kl" in m}
    assert sorted(judged) == [0, 4] and judged[0]["eval/kl"] == 0.0, judged
    assert judged[4]["eval/kl"] != 0.0 and judged[0]["eval/reward_std"] > 0
    saved = load_file(str(next((tmp_path / "z3" / "hf").glob("*.safetensors"))))
    assert not any("score" in k or "critic" in k for k in saved)


ONE_ITERATION = ["train.max_steps=4", "ppo.max_new_tokens=6"]


@pytest.mark.slow
def test_lora_trains_adapters_and_value_head_and_its_reference_is_the_parent(
    pretrained, prompts, tmp_path
):
    run_ppo(tmp_path, "lora", pretrained, prompts, *ONE_ITERATION, "peft={method: lora, r: 4}",
            "checkpoint.every=4")  # fmt: skip
    # the reference is the actor with its adapters off; B starts at 0: no KL at first
    assert per_step(tmp_path / "lora", "ppo/kl")[1] == 0.0
    saved = {}
    for path in (tmp_path / "lora" / "checkpoints" / "step-00000004").glob("model-*.safetensors"):
        saved.update(load_file(str(path)))
    parent = load_file(str(pretrained / "model.safetensors"))
    base = [k for k in saved if ".base_layer." in k]
    assert base
    for key in base:
        name = key.replace("policy.base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(saved[key], parent[name]), key
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)
    initial = build_actor_critic(pretrained, None, SEED, "value_head", None).value_head
    assert not torch.equal(saved["value_head.weight"], initial.weight.detach())
    assert (tmp_path / "lora" / "hf" / "model.safetensors").is_file()  # merged actor


@pytest.mark.slow
def test_a_reward_model_without_stats_warns_and_a_changed_one_stops_the_resume(
    pretrained, prompts, tmp_path
):
    rm = make_reward_model(pretrained, tmp_path / "rm", stats=False)
    model = ["ppo.reward_function=null", f"ppo.reward_model={rm}", "ppo.critic=value_head"]
    first = run_ppo(tmp_path, "rm", pretrained, prompts, *ONE_ITERATION, *model,
                    "train.stop_after=2")  # fmt: skip
    assert "no kiln_reward statistics" in first.stdout + first.stderr
    make_reward_model(pretrained, rm, stats=False, seed=2)  # another head, same place
    again = run_ppo(tmp_path, "rm", pretrained, prompts, *ONE_ITERATION, *model, check=False)
    out = again.stdout + again.stderr
    assert again.returncode != 0 and "ppo.reward_model" in out, out[-3000:]
    assert "changed since the checkpoint" in out and "model.safetensors" in out
    assert max(losses(tmp_path / "rm")) == 2  # nothing trained against the other model

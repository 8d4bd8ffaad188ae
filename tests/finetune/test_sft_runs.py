"""Real `kiln sft` runs: export, resume (same and other world size), 2 ranks vs 1, LoRA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.config import PeftSection
from finetune.data import SFTEncoder
from finetune.peft_setup import load_parent
from launcher.data.records import Record
from launcher.data.tokenizer import TextTokenizer

from .sft_fixtures import losses, metrics, run_sft, varied_chats, write_jsonl


@pytest.fixture
def parent(pretrained):
    """The pretrained tiny model every SFT test starts from (tests/finetune/conftest.py)."""
    return pretrained


STEPS = ["train.epochs=null", "train.max_steps=20", "checkpoint.every=null",
         "train.micro_batch_size=2", "train.global_batch_size=8"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_and_two_ranks_match_one_uninterrupted_run(parent, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", varied_chats(40))
    val = "data.validation={fraction: 0.1}"
    # its step-10 checkpoint (kept beside the last) is where the resumed run starts: one launch
    # less than a second run stopped there
    run_sft(tmp_path, "whole", parent, data, *STEPS, val, "checkpoint.every=10",
            "checkpoint.keep_last=2")  # fmt: skip
    whole = losses(tmp_path, "whole")
    assert sorted(whole) == list(range(1, 21))
    # the export: a plain HF model whose tokenizer's chat template gives kiln's ids
    hf = tmp_path / "whole" / "hf"
    lineage = json.loads((hf / "kiln.json").read_text())
    assert lineage["stage"] == "sft" and lineage["parent"]["path"] == str(parent.resolve())
    chat = varied_chats(3)[2]["messages"]
    ids = AutoTokenizer.from_pretrained(hf).apply_chat_template(chat, return_dict=False)
    tok = TextTokenizer.load(parent)
    kiln_ids = SFTEncoder(tok, 512)(Record(data={"messages": chat}, id="", file="", line=1))
    assert ids == kiln_ids.tokens.tolist()
    samples = (tmp_path / "whole" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 and all("completion" in json.loads(s) for s in samples)

    step10 = tmp_path / "whole" / "checkpoints" / "step-00000010"
    run_sft(tmp_path, "resumed", parent, data, *STEPS, val, f"checkpoint.resume={step10}")
    resumed = losses(tmp_path, "resumed")
    assert sorted(resumed) == list(range(11, 21))
    assert [resumed[s] for s in range(11, 21)] == [whole[s] for s in range(11, 21)]  # exact

    run_sft(tmp_path, "two", parent, data, *STEPS, val, "train.stop_after=5", nproc=2)
    assert {m["dist/world_size"] for m in metrics(tmp_path, "two")} == {2.0}
    two = losses(tmp_path, "two")
    assert max(two) == 5  # stopped (and saved) after 5 steps
    for step in range(1, 6):
        assert two[step] == pytest.approx(whole[step], rel=1e-5), step
    run_sft(tmp_path, "two", parent, data, *STEPS, val, "train.stop_after=3")  # on 1 rank
    after = losses(tmp_path, "two")
    assert {m["dist/world_size"] for m in metrics(tmp_path, "two") if m["step"] > 5} == {1.0}
    for step in range(6, 9):
        assert after[step] == pytest.approx(whole[step], rel=1e-5), step


def base_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def check_lora_run(parent, run_dir, lora: PeftSection) -> None:
    """Base tensors untouched, every adapter tensor moved, the merged export = the adapter
    model (fp32)."""
    (folder,) = sorted((run_dir / "checkpoints").glob("step-*"))
    saved = {}
    for path in folder.glob("model-*.safetensors"):
        saved |= load_file(str(path))
    start = dict(load_parent(parent, lora, seed=1234).named_parameters())
    parent_model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    base = dict(parent_model.named_parameters())
    adapters = [n for n in saved if "lora_" in n]
    assert adapters and len(adapters) == sum("lora_" in n for n in start)
    for name, value in saved.items():
        if "lora_" in name:
            assert not torch.equal(value, start[name].detach()), name
        else:
            assert torch.equal(value, base[base_name(name)].detach()), name
    adapter_model = load_parent(parent, lora, seed=0).eval()
    adapter_model.load_state_dict(saved, strict=False)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        diff = (adapter_model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()
    assert diff < 1e-5


LORA = ["peft={method: lora, r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        "train.epochs=null", "train.max_steps=6", "checkpoint.every=null",
        "train.micro_batch_size=2", "train.global_batch_size=4", "optim.lr=1e-2"]  # fmt: skip


@pytest.mark.slow
def test_lora_trains_only_adapters_and_exports_a_merged_model(parent, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", varied_chats(12))
    run_sft(tmp_path, "lora", parent, data, *LORA, "dist.zero_stage=0")
    check_lora_run(parent, tmp_path / "lora", PeftSection(r=4, alpha=8))
    assert metrics(tmp_path, "lora")[-1]["model/trainable_params"] > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_under_zero3_on_two_ranks(parent, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", varied_chats(12))
    run_sft(tmp_path, "lora3", parent, data, *LORA, "dist.zero_stage=3", nproc=2)
    assert {m["dist/world_size"] for m in metrics(tmp_path, "lora3")} == {2.0}
    check_lora_run(parent, tmp_path / "lora3", PeftSection(r=4, alpha=8))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_tuning_exports_its_adapter_and_refuses_merge(parent, tmp_path, method):
    """Prefix / prompt tuning (prompt with activation checkpointing): the export is the
    adapter alone, which peft loads on the parent to give the trained model's logits;
    `kiln export --merge` is refused with the reason, and exit 1."""
    data = write_jsonl(tmp_path / "chats.jsonl", varied_chats(12))
    peft = f"peft={{method: {method}, num_virtual_tokens: 4}}"
    extra = ["train.activation_checkpointing=true"] if method == "prompt" else []
    run_sft(tmp_path, method, parent, data, peft, *LORA[1:], "dist.zero_stage=0", *extra)
    hf = tmp_path / method / "hf"
    assert (hf / "adapter_config.json").is_file() and not (hf / "model.safetensors").exists()
    assert metrics(tmp_path, method)[-1]["model/trainable_params"] > 0

    cfg = PeftSection(method=method, num_virtual_tokens=4)
    (folder,) = sorted((tmp_path / method / "checkpoints").glob("step-*"))
    saved = {}
    for path in folder.glob("model-*.safetensors"):
        saved |= load_file(str(path))
    trained = load_parent(parent, cfg, seed=0).eval()
    trained.load_state_dict(saved, strict=False)
    untrained = load_parent(parent, cfg, seed=1234).eval()
    base = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, hf).eval()
    ids = torch.tensor([list(range(3, 30))])
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, loaded(input_ids=ids).logits
        assert (want - got).abs().max() < 1e-5
        assert (untrained(input_ids=ids).logits - got).abs().max() > 1e-3  # it was trained

    def export(*flags: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "launcher", "export", str(folder), *flags]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    refused = export("--out", str(tmp_path / "merged"), "--merge")
    assert refused.returncode == 1 and not (tmp_path / "merged").exists()
    assert f"peft.method={method}: virtual tokens are inputs" in refused.stderr
    assert "cannot be merged" in refused.stderr
    done = export("--out", str(tmp_path / "again"), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "again" / "adapter_config.json").is_file()

"""A starting model's config.json that is not an HF config (hand-edited, truncated by a full
disk, another tool's file) is one config error naming the file and the key that points at
it, in every stage that reads one; never a traceback from deep inside a check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.config_files import ConfigError
from launcher.hf_dir import (
    CAUSAL_LM,
    SEQUENCE_CLASSIFIER,
    ConfigFileError,
    architectures,
    is_architecture,
    read_config,
)
from launcher.stages import find_stage

BROKEN = {
    "truncated": (b'{"architectures": ["LlamaForCausalLM"], "hidden', "not JSON"),
    "a_list": (b'["LlamaForCausalLM"]', "a JSON list, not an object"),
    "null_architecture": (b'{"architectures": [null]}', "architectures is [None]"),
    "string_architectures": (b'{"architectures": "LlamaForCausalLM"}', "not a list"),
    "not_utf8": (b'{"architectures": ["Llama\xffForCausalLM"]}', "cannot be read"),
}


def model_dir(root: Path, content: bytes) -> Path:
    folder = root / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(content)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_read_config_names_the_file_and_the_fault(tmp_path, case):
    content, said = BROKEN[case]
    folder = model_dir(tmp_path, content)
    with pytest.raises(ConfigFileError, match=re.escape(said)) as raised:
        read_config(folder)
    assert str(raised.value).startswith(f"{folder / 'config.json'}: ")


def test_architectures_of_a_good_config(tmp_path):
    folder = model_dir(tmp_path, b'{"architectures": ["LlamaForCausalLM"]}')
    assert architectures(folder) == ["LlamaForCausalLM"]
    assert is_architecture(folder, CAUSAL_LM) and not is_architecture(folder, SEQUENCE_CLASSIFIER)
    bare = model_dir(tmp_path / "bare", b'{"model_type": "llama"}')
    assert architectures(bare) == [] and not is_architecture(bare, CAUSAL_LM)


# (stage, config file, the override that points at the broken directory, its key)
POINTERS = [
    ("sft", "configs/finetune/sft-tiny.yaml", "init.path"),
    ("reward", "configs/finetune/reward-tiny.yaml", "init.path"),
    ("dpo", "configs/finetune/dpo-tiny.yaml", "init.path"),
    ("ppo", "configs/finetune/ppo-tiny.yaml", "init.path"),
    ("grpo", "configs/finetune/grpo-tiny.yaml", "init.path"),
    ("classify", "configs/finetune/classify-tiny.yaml", "init.path"),
    ("distill", "configs/finetune/distill-tiny.yaml", "teacher.path"),
    ("distill-classify", "configs/finetune/distill-classify-tiny.yaml", "teacher.path"),
    ("compress", "configs/compress/tiny.yaml", "init.path"),
]


@pytest.mark.parametrize("case", ["truncated", "null_architecture"])
@pytest.mark.parametrize(("stage", "config", "key"), POINTERS, ids=[p[0] for p in POINTERS])
def test_every_stage_reports_a_broken_config_json_under_its_key(tmp_path, stage, config, key, case):
    folder = model_dir(tmp_path, BROKEN[case][0])
    schema = find_stage(stage).config_class
    with pytest.raises(ConfigError) as raised:
        load_config(schema, config, [f"{key}={folder}"])
    about = [p for p in raised.value.problems if str(folder) in p.message]
    assert about, str(raised.value)
    # once, under the key that points there (not again by a stage check behind it)
    assert [p.key for p in about] == [key], str(raised.value)
    assert f"{folder / 'config.json'}: " in about[0].message


def test_ppo_reward_model_with_a_broken_config_json(tmp_path):
    folder = model_dir(tmp_path, BROKEN["truncated"][0])
    schema = find_stage("ppo").config_class
    overrides = [f"ppo.reward_model={folder}", "ppo.reward_function=null"]
    with pytest.raises(ConfigError) as raised:
        load_config(schema, "configs/finetune/ppo-tiny.yaml", overrides)
    about = [p for p in raised.value.problems if str(folder) in p.message]
    assert [p.key for p in about] == ["ppo.reward_model"], str(raised.value)
    assert "not JSON" in about[0].message

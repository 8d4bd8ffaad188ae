"""finetune/common.py: the frozen companions' digests a resume checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from finetune.common import FrozenModels
from launcher.checkpoint import CheckpointError


def test_a_resume_against_changed_frozen_weights_is_refused_naming_the_key(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    saved = FrozenModels({"ppo.reward_model": tmp_path}).state_dict()
    assert list(saved["ppo.reward_model"]["weights"]) == ["model.safetensors"]
    FrozenModels({"ppo.reward_model": tmp_path}).load_state_dict(saved)  # unchanged: fine
    FrozenModels({}).load_state_dict(saved)  # not used any more (e.g. LoRA now): fine
    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"ppo.reward_model: the weights in .* changed.*"
                       r"files differing: model.safetensors"):  # fmt: skip
        FrozenModels({"ppo.reward_model": tmp_path}).load_state_dict(saved)


@pytest.mark.parametrize(
    ("saved", "refused"),
    [
        ("peft:\n  method: prefix\n", True),  # SFT keeps its peft section at the top
        ("classify:\n  peft:\n    method: prompt\n", True),  # classification under classify
        ("classify:\n  peft:\n    method: lora\n", False),
        ("classify:\n  freeze: none\n", False),
    ],
)
def test_merge_refusal_reads_the_peft_section_where_each_stage_keeps_it(tmp_path, saved, refused):
    from finetune.peft_setup import checkpoint_merge_refusal

    (tmp_path / "config.yaml").write_text(saved)
    reason = checkpoint_merge_refusal(tmp_path)
    assert (reason is not None) == refused
    if refused:
        assert "cannot be merged" in reason

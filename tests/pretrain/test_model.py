"""The decoder: exact size formula, FLOPs against torch's counter, Hugging Face round trip."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from launcher.config import CONFIG_ROOT
from pretrain.model import (
    ModelConfig,
    build_model,
    describe,
    flops_per_token,
    param_count,
    to_hf_config,
)

PRESETS = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
aten = torch.ops.aten


def load_preset(name: str, **changes: object) -> ModelConfig:
    """A preset exactly as shipped, optionally with some fields changed."""
    data = yaml.safe_load((CONFIG_ROOT / "model" / f"{name}.yaml").read_text(encoding="utf-8"))
    return ModelConfig.model_validate({**data, **changes})


def config(**changes: object) -> ModelConfig:
    fields = dict(vocab_size=512, d_model=384, n_layers=1, n_heads=6, ffn_size=1024, max_seq_len=64)
    return ModelConfig.model_validate({**fields, **changes})


# ------------------------------------------------------------------------------ size


def test_the_documented_presets_are_shipped() -> None:
    assert PRESETS == ["125m", "1b", "350m", "7b", "small", "tiny", "tiny-bert"]


@pytest.mark.parametrize("name", PRESETS)
def test_param_count_formula_equals_the_built_models_parameters(name: str) -> None:
    cfg = load_preset(name)
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())  # sized without allocating
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_param_count_formula_holds_for_grouped_query_attention_with_untied_embeddings() -> None:
    cfg = load_preset("tiny", n_heads=8, n_kv_heads=2, tie_embeddings=False)
    model = build_model(cfg, device="meta")
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 128)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert (
        param_count(cfg) == param_count(load_preset("tiny", n_heads=8, n_kv_heads=2)) + 2048 * 128
    )


def test_presets_have_their_advertised_sizes() -> None:
    assert abs(param_count(load_preset("125m")) - 125e6) / 125e6 < 0.05
    assert abs(param_count(load_preset("350m")) - 350e6) / 350e6 < 0.05
    assert 10e6 <= param_count(load_preset("small")) <= 20e6
    assert 0.9e6 <= param_count(load_preset("tiny")) <= 1.1e6
    # the published parameter counts of the models whose shapes we copy
    assert param_count(load_preset("1b")) == 1_100_048_384  # TinyLlama-1.1B
    assert param_count(load_preset("7b")) == 6_738_415_616  # Llama-2-7B


# ----------------------------------------------------------------------------- FLOPs

# On CPU, SDPA runs aten._scaled_dot_product_flash_attention_for_cpu (and its _backward), for
# which FlopCounterMode has no formula: it registers only the CUDA flash / efficient / cudnn
# kernels, so attention would silently count as 0 (about 6% of tiny's FLOPs at seq 64). We map
# the CPU kernels to torch's own SDPA formulas (the ones it uses for the CUDA kernels), so the
# count stays independent of ours. The argument order of the CPU ops matches the CUDA ones.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
            grad, q, k, v
        )
    ),
}


def test_flops_per_token_matches_torch_flop_counter_on_a_training_step() -> None:
    cfg = load_preset("tiny")
    batch, seq = 2, 64
    model = build_model(cfg, seed=0, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = {str(op): n / (batch * seq) for op, n in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops() / (batch * seq)

    # every projection and the lm_head: 4 * (2*128*128 + 2*128*64 + 3*128*352) + 2048*128
    n_matmul = 999_424
    assert counts["aten.mm"] == pytest.approx(6 * n_matmul, rel=0.02)
    # attention forward: QK^T and scores @ V over the full score matrix
    d_attn_seq = cfg.n_layers * cfg.n_heads * cfg.head_dim * seq
    forward = counts["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert forward == 4 * d_attn_seq
    # the flash backward does the 2x-forward gradient matmuls and also recomputes QK^T; PaLM's
    # 12 * n_layers * d_attn * seq counts model FLOPs, without that recompute, so take it out
    recompute = 2 * d_attn_seq
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == (
        2 * forward + recompute
    )
    assert total - recompute == pytest.approx(flops_per_token(cfg, seq), rel=0.02)
    assert flops_per_token(cfg, seq) == 6 * n_matmul + 12 * d_attn_seq


def test_flops_per_token_counts_a_tied_matrix_once_as_the_output_projection() -> None:
    tied, untied = load_preset("small"), load_preset("small", tie_embeddings=False)
    assert flops_per_token(tied, 256) == flops_per_token(untied, 256)
    assert flops_per_token(tied, 512) - flops_per_token(tied, 256) == 12 * 6 * 384 * 256


def test_describe_summarises_size_shape_and_flops() -> None:
    assert describe(load_preset("small"), 256) == (
        "LlamaForCausalLM 13.8M params (6 layers x 384, 6 heads, ffn 1024, vocab 8192, tied) "
        "9.0e7 FLOPs/token at seq 256"
    )
    assert "4 heads / 2 kv" in describe(load_preset("tiny"), 64)
    assert "6.74B params" in describe(load_preset("7b"), 4096)


# ----------------------------------------------------------------------- Hugging Face


def test_to_hf_config_carries_every_field_into_llama_config() -> None:
    cfg = config(n_kv_heads=2, rope_theta=5e5, dropout=0.1, init_std=0.01, norm_eps=1e-6)
    hf = to_hf_config(cfg, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert (hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == (384, 1024, 1)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (6, 2, 64)
    assert (hf.vocab_size, hf.max_position_embeddings) == (512, 64)
    assert hf.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    assert (hf.attention_dropout, hf.initializer_range, hf.rms_norm_eps) == (0.1, 0.01, 1e-6)
    assert (hf.attention_bias, hf.mlp_bias, hf.tie_word_embeddings) == (False, False, True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf._attn_implementation == "sdpa"


def test_special_token_ids_outside_the_vocabulary_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"eos_token_id 512 is outside the vocabulary 0\.\.511"):
        to_hf_config(config(), eos_token_id=512)


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_then_auto_from_pretrained_gives_identical_logits(tmp_path, tie) -> None:
    model = build_model(load_preset("tiny", tie_embeddings=tie), seed=0).eval()
    assert type(model) is LlamaForCausalLM
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(loaded) is LlamaForCausalLM
    assert loaded.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max().item()
    assert diff == 0.0
    for m in (model, loaded):
        shared = m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        assert shared is tie


def test_dtype_and_device_are_applied_when_building() -> None:
    model = build_model(load_preset("7b"), device="meta", dtype=torch.bfloat16)
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "meta")}


# ------------------------------------------------------------------------------ seeds


def test_same_seed_gives_identical_weights_and_another_seed_different_ones() -> None:
    cfg = load_preset("tiny")
    first, again, other = (build_model(cfg, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    for key in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight"):
        assert not torch.equal(first[key], other[key])
    assert first["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)


def test_residual_outputs_start_at_init_std_over_sqrt_2_n_layers_unless_turned_off() -> None:
    scaled = build_model(load_preset("tiny"), seed=0).state_dict()
    plain = build_model(load_preset("tiny", init_scaled_residual=False), seed=0).state_dict()
    residual = [k for k in scaled if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(residual) == 2 * 4  # tiny: 4 layers
    for key in residual:
        assert scaled[key].std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.05), key
        assert plain[key].std().item() == pytest.approx(0.02, rel=0.05), key
        # the same draws, scaled: turning it off gives back the unscaled init exactly
        torch.testing.assert_close(scaled[key] * (2 * 4) ** 0.5, plain[key])
    for key in scaled.keys() - residual:  # every other weight is untouched by the flag
        assert torch.equal(scaled[key], plain[key]), key
    assert scaled["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(
        0.02, rel=0.05
    )


def test_seeded_build_leaves_the_callers_random_stream_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model(load_preset("tiny"), seed=0)
    assert torch.equal(torch.rand(4), expected)


# --------------------------------------------------------------------------- problems


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_no_problems(name: str) -> None:
    assert list(load_preset(name).problems()) == []


def suggested(message: str) -> list[int]:
    return [int(n) for n in re.search(r"e\.g\. ([\d, ]+)$", message).group(1).split(", ")]


def test_n_heads_not_dividing_d_model_is_reported_with_valid_suggestions() -> None:
    [(key, message)] = config(n_heads=5).problems()
    assert key == "n_heads"
    assert message.startswith("n_heads (5) must divide d_model (384); e.g. ")
    assert suggested(message) == [3, 4, 6, 8]
    assert all(list(config(n_heads=n).problems()) == [] for n in suggested(message))


def test_n_kv_heads_not_dividing_n_heads_is_reported() -> None:
    [(key, message)] = config(n_heads=6, n_kv_heads=4).problems()
    assert key == "n_kv_heads"
    assert message == "n_kv_heads (4) must divide n_heads (6); e.g. 1, 2, 3, 6"


def test_odd_head_dim_is_reported_because_rope_needs_pairs() -> None:
    [(key, message)] = config(n_heads=128).problems()  # 384 / 128 = 3
    assert key == "n_heads"
    assert "= 3" in message and "even head dim" in message
    assert all(list(config(n_heads=n).problems()) == [] for n in suggested(message))


def test_non_positive_sizes_are_rejected_by_validation() -> None:
    with pytest.raises(ValidationError, match="d_model"):
        config(d_model=0)
    with pytest.raises(ValidationError, match="dropout"):
        config(dropout=1.0)

"""The compress stage's parts in-process, on tiny random models: pruning (unstructured and
structured), int8 through torchao, the atomic variant write, config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from finetune.compress import check_model, original_note, write_variant
from finetune.compress_config import CompressConfig
from finetune.compress_report import quantized_share, tensor_bytes
from finetune.compress_variants import (
    CompressError,
    channel_activations,
    channel_norms,
    gated_mlps,
    prunable_linears,
    prune_ffn,
    prune_unstructured,
    quantization_config,
    zero_share,
)
from launcher.config import ConfigError, load_config


def llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_zeroes_the_smallest_weights_for_good(scope) -> None:
    model = llama()
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(model)}
    shares = prune_unstructured(model, 0.5, scope)
    assert zero_share(model) >= 0.5
    if scope == "layer":
        assert all(share >= 0.5 for share in shares.values())
    else:  # one threshold: every kept weight is at least as large as every pruned one
        after = {n: m.weight for n, m in prunable_linears(model)}
        kept = torch.cat([before[n][w != 0].abs() for n, w in after.items()])
        gone = torch.cat([before[n][w == 0].abs() for n, w in after.items()])
        assert kept.min() >= gone.max()
    # permanent: plain parameters, no masks or weight_orig for save_pretrained to write
    assert not any("weight_orig" in k or "weight_mask" in k for k in model.state_dict())
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()  # head untouched


def test_ffn_pruning_that_drops_dead_channels_keeps_the_logits() -> None:
    model = llama()
    with torch.no_grad():
        for mlp in gated_mlps(model):
            mlp.down_proj.weight[:, :12] = 0  # 12 of 48 channels contribute nothing
    smaller = prune_ffn(model, 0.25, [channel_norms(m) for m in gated_mlps(model)])
    assert smaller.config.intermediate_size == 36 and model.config.intermediate_size == 48
    assert type(smaller) is LlamaForCausalLM
    assert smaller.lm_head.weight.data_ptr() == smaller.model.embed_tokens.weight.data_ptr()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(smaller(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    assert (
        sum(p.numel() for p in smaller.parameters())
        == sum(p.numel() for p in model.parameters()) - 2 * 12 * 3 * 32
    )


def test_activation_ranking_sees_channels_that_never_fire() -> None:
    model = llama()
    with torch.no_grad():
        for mlp in gated_mlps(model):
            mlp.up_proj.weight[5] = 0  # act(gate) * 0: channel 5 never fires
    x = ids()
    targets = x.clone()
    targets[1, 10:] = -100  # padding positions are not counted
    [first, second] = channel_activations(model, [{"input_ids": x, "targets": targets}])
    assert first.shape == (48,) and first[5] == 0 and second[5] == 0
    assert (first[torch.arange(48) != 5] > 0).all()


def test_int8_variants_store_quantized_layers_in_under_a_third_of_their_bytes(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    original = tmp_path / "original"
    llama().save_pretrained(original)
    for kind in ("int8-weight", "int8-dynamic"):
        model = AutoModelForCausalLM.from_pretrained(
            original, quantization_config=quantization_config(kind)
        )
        write_variant(tmp_path / kind, model, original, {"variant": kind})
        assert quantized_share(original, tmp_path / kind) <= 0.30
        stored = tensor_bytes(tmp_path / kind)
        assert stored["model.embed_tokens.weight"] == 64 * 32 * 4  # embeddings stay fp32
        lineage = json.loads((tmp_path / kind / "kiln.json").read_text())
        assert lineage["stage"] == "compress" and lineage["variant"] == kind
        assert lineage["parent"]["path"] == str(original.resolve())


def test_a_failed_variant_write_leaves_the_old_one(tmp_path) -> None:
    original = tmp_path / "original"
    llama().save_pretrained(original)
    out = tmp_path / "variants" / "unstructured"
    write_variant(out, llama(), original, {"variant": "unstructured"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Dying:
        def save_pretrained(self, folder, **_):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_variant(out, Dying(), original, {"variant": "unstructured"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_models_without_linear_layers_or_gated_mlps_are_named(tmp_path) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(CompressError, match=r"GPT2LMHeadModel .*no nn.Linear"):
        prunable_linears(gpt2)  # GPT-2's blocks are Conv1D, its only Linear is the head
    with pytest.raises(CompressError, match=r"GPT2LMHeadModel .*no gated MLP"):
        gated_mlps(gpt2)


def test_an_encoder_is_refused_naming_its_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(CompressError, match=r"config.json: .*BertForMaskedLM"):
        check_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert check_model(tmp_path) == "causal"
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"]})
    )
    assert check_model(tmp_path) == "classifier"


def test_the_original_row_says_when_it_stores_a_tied_head_twice(tmp_path) -> None:
    model = llama()
    model.save_pretrained(tmp_path / "dedup")
    both = tmp_path / "both"  # what an export from a gathered state dict writes
    both.mkdir()
    shutil.copy(tmp_path / "dedup" / "config.json", both)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()},
              both / "model.safetensors")  # fmt: skip
    assert "lm_head.weight" not in tensor_bytes(tmp_path / "dedup")
    assert original_note(tmp_path / "dedup") == "as given"
    assert original_note(both) == "as given; stores the tied lm_head.weight too (0.01 MB)"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml", "key", "needle"),
    [
        ("init:\n  path: {model}\nprune:\n  sparsity: 1.0\n", "prune.sparsity", "outside [0, 1)"),
        ("init:\n  path: {missing}\n", "init.path", "no such directory"),
        ("prune:\n  sparsity: 0.5\n", "init.path", "the model to compress is required"),
        ("init:\n  path: {model}\ncompare:\n  distilled: {missing}\n", "compare.distilled",
         "not an HF model directory"),
        ("init:\n  path: {model}\nvariants: [ffn, ffn]\n", "variants", "twice"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key_and_line(tmp_path, yaml, key, needle) -> None:
    model = tmp_path / "model"
    llama().save_pretrained(model)
    path = write(tmp_path, yaml.format(model=model, missing=tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as info:
        load_config(CompressConfig, path)
    [problem] = [p for p in info.value.problems if p.key == key]
    assert needle in problem.message
    if key != "init.path" or "path:" in path.read_text():
        assert problem.where is not None and problem.where.startswith(str(path))


def test_a_classifier_needs_its_labelled_data_and_gets_the_int8_variants(tmp_path) -> None:
    from transformers import LlamaForSequenceClassification

    model = tmp_path / "classifier"
    LlamaForSequenceClassification(llama().config).save_pretrained(model)
    path = write(tmp_path, f"init:\n  path: {model}\nvariants: [int8-weight, ffn]\n")
    with pytest.raises(ConfigError) as info:
        load_config(CompressConfig, path)
    found = {p.key: p.message for p in info.value.problems}
    assert "is a classifier: give its labelled data" in found["classification"]
    assert found["variants"].startswith("ffn is built for causal LMs")
    assert "int8-weight, int8-dynamic" in found["variants"]
    causal = tmp_path / "causal"
    llama().save_pretrained(causal)
    path = write(tmp_path, f"init:\n  path: {model}\ncompare:\n  lm: {causal}\n")
    with pytest.raises(ConfigError) as info:
        load_config(CompressConfig, path)
    found = {p.key: p.message for p in info.value.problems}
    assert f"{causal} is a causal LM and init.path a sequence classifier" in found["compare.lm"]

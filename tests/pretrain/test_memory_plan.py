"""`kiln plan`: the memory planner against the built model, saved tensors, DeepSpeed's own
estimators, and its command line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from launcher.cli import main
from launcher.optim import param_groups
from pretrain.memory import (
    GiB,
    Setup,
    Tensor,
    activation_bytes,
    deepspeed_knobs,
    load_model,
    param_tensors,
    parse_memory,
    plan,
)
from pretrain.memory.zero import _zero12_partition
from pretrain.model import ModelConfig, build_model, param_count

SMALL_GQA = dict(vocab_size=1000, d_model=256, n_layers=2, n_heads=4, ffn_size=704)


# --------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("tied", [True, False])
def test_param_tensors_are_the_built_models_parameters_in_order_and_groups(tied):
    cfg = ModelConfig(**SMALL_GQA, n_kv_heads=2, max_seq_len=128, tie_embeddings=tied)
    model = build_model(cfg, device="meta")
    built = [(name, p.numel()) for name, p in model.named_parameters()]
    assert [(t.name, t.numel) for t in param_tensors(cfg)] == built
    decay = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    flags = [id(p) in decay for _, p in model.named_parameters()]
    assert [t.decay for t in param_tensors(cfg)] == flags
    assert sum(t.numel for t in param_tensors(cfg)) == param_count(cfg)


def test_zero12_partition_counts_whole_parameters_touching_a_partition():
    # two parameters of 10 and 6 on 2 ranks: partitions of 8; rank 0 touches the 10,
    # rank 1 touches both (the 10 straddles the cut) -> its buffer holds 16 elements
    tensors = [Tensor("a", 10, True), Tensor("b", 6, True)]
    assert _zero12_partition(tensors, 2) == (8, 16)
    assert _zero12_partition(tensors, 1) == (16, 16)


# ------------------------------------------------------------------------------ activations


def _saved_bytes(cfg, dtype, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves for one forward + our loss, plus the
    logits and their fp32 copy, which are alive while the loss is computed."""
    torch.manual_seed(0)
    model = build_model(cfg, seed=0, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
        upcast = logits.float()  # as pretrain/task.py's loss does
        F.cross_entropy(upcast.flatten(0, 1), ids.flatten())
    for t in (logits, upcast):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_the_tensors_autograd_saves(precision, kv_heads, checkpointing):
    cfg = ModelConfig(**SMALL_GQA, n_kv_heads=kv_heads, max_seq_len=128)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    measured = _saved_bytes(cfg, dtype, checkpointing)
    acts = activation_bytes(cfg, Setup(micro_batch=2, seq_len=64, precision=precision))
    # with checkpointing the forward keeps the layer inputs; the recomputed layer comes later
    predicted = acts.checkpointed - acts.tokens * acts.per_layer if checkpointing else acts.plain
    # what is left out: RoPE's cos/sin tables and the token ids (< 1%)
    assert predicted == pytest.approx(measured, rel=0.01)


# -------------------------------------------------------------------------------- the plan


def test_zero0_fp32_is_sixteen_bytes_per_parameter_and_zero3_shards_states():
    cfg = load_model("1b")
    n = param_count(cfg)
    zero0 = plan(cfg, Setup(gpus=8, zero=0, precision="fp32"))
    assert zero0.params == 4 * n and zero0.optimizer == 8 * n
    assert zero0.peak(without=("activations", "buffers")) == 16 * n
    one = plan(cfg, Setup(gpus=1, zero=3)).optimizer
    eight = plan(cfg, Setup(gpus=8, zero=3)).optimizer
    assert eight == pytest.approx(one / 8, rel=1e-3)


def test_buffers_come_from_our_deepspeed_template():
    knobs, path = deepspeed_knobs(2, offload=False)
    assert path.name == "zero2.json" and knobs["overlap_comm"] is True
    cfg = load_model("125m")
    zero2 = plan(cfg, Setup(gpus=8, zero=2))
    # two bf16 buckets, and the copy the reduction makes of the filled part, plus its fp32
    # copy for the fp32 reduction (dist.reduce_dtype; both seen on CPU)
    rbs = knobs["reduce_bucket_size"]
    assert zero2.buffers == 2 * 2 * rbs + (2 + 4) * min(param_count(cfg), rbs)
    assert deepspeed_knobs(1, offload=False)[0]["overlap_comm"] is False  # DeepSpeed's default
    knobs3, path3 = deepspeed_knobs(3, offload=True, d_model=cfg.d_model)
    assert path3.name == "zero3-offload.json"
    # ZeRO-3's size knobs are "auto" in the template: sized to the model like the runtime
    assert knobs3["reduce_bucket_size"] == knobs3["stage3_max_live_parameters"] == 768 * 768
    assert knobs3["stage3_param_persistence_threshold"] == 7680


# Per-rank peaks in MiB (gradients, params + grads + optimizer, all live tensors) of the 125m
# preset, bf16, micro-batch 1 x 32 tokens, 2 ranks on CPU: the census of
# benchmarks/zero_memory.py, run with train.precision=bf16 and each dist.reduce_dtype.
MEASURED_BF16 = {
    ("fp32", 0): (707, 2357, 2593),
    ("fp32", 1): (707, 1650, 2122),  # DeepSpeed's BF16_Optimizer: fp32 gradients of everything
    ("fp32", 2): (236, 1179, 3793),
    ("fp32", 3): (457, 1356, 1358),
    ("bf16", 0): (707, 2357, 2357),
    ("bf16", 1): (317, 1260, 2132),
    ("bf16", 2): (317, 1260, 3086),
    ("bf16", 3): (280, 1105, 1106),
}


@pytest.mark.parametrize(("reduce_dtype", "zero"), MEASURED_BF16)
def test_gradient_memory_follows_dist_reduce_dtype_as_measured(reduce_dtype, zero):
    grads, states, total = (x * 2**20 for x in MEASURED_BF16[reduce_dtype, zero])
    setup = Setup(gpus=2, zero=zero, micro_batch=1, seq_len=32, reduce_dtype=reduce_dtype)
    p = plan(load_model("125m"), setup)
    assert p.grads == pytest.approx(grads, rel=0.01)
    assert p.peak(without=("activations", "buffers")) == pytest.approx(states, rel=0.06)
    assert p.total == pytest.approx(total, rel=0.09)


def test_fp32_gradient_reduction_costs_its_memory_in_the_plan(capsys):
    cfg = load_model("7b")
    n = param_count(cfg)
    both = {
        (zero, dtype): plan(cfg, Setup(gpus=8, zero=zero, reduce_dtype=dtype))
        for zero in (0, 1, 2, 3)
        for dtype in ("fp32", "bf16")
    }
    # ZeRO-0 accumulates in bf16 either way; only its all-reduce takes an fp32 copy
    assert both[0, "fp32"].grads == both[0, "bf16"].grads
    assert both[0, "fp32"].buffers == both[0, "bf16"].buffers + 4 * min(n, 5e8)
    # ZeRO-1: a whole fp32 gradient buffer beside the bf16 .grads: 6 bytes per parameter
    assert both[1, "fp32"].grads == 6 * n
    # ZeRO-2/3: the gradient partition in fp32 (no fp32 copy of it at the step)
    assert both[2, "fp32"].terms["grad_buffer"] == pytest.approx(4 * n / 8, rel=1e-3)
    assert both[3, "fp32"].terms["grad_partition"] == 2 * both[3, "bf16"].terms["grad_partition"]
    # (ZeRO-3 in bf16 turns its partition into fp32 at the step anyway: no dearer at the peak;
    # at 7b the activations of forward/backward may be the peak)
    for zero in (1, 2):
        wide, narrow = (both[zero, d].peak(without=("activations",)) for d in ("fp32", "bf16"))
        assert wide > narrow, zero
    assert main(["plan", "7b", "--gpus", "8", "--zero", "1", "--reduce-dtype", "bf16"]) == 0
    assert "gradients reduced in bf16" in capsys.readouterr().out


def test_activation_checkpointing_shrinks_activations_and_changes_the_total():
    cfg = load_model("7b")
    plain = plan(cfg, Setup(gpus=8, zero=3, seq_len=4096))
    ckpt = plan(cfg, Setup(gpus=8, zero=3, seq_len=4096, activation_checkpointing=True))
    assert ckpt.activations < plain.activations / 5
    assert plain.total - ckpt.total == pytest.approx(plain.activations - ckpt.activations)


# Agreement with DeepSpeed's own estimators (bf16 + fp32 Adam; no activations and no reduce
# buckets, which they leave out). Tolerances and the differences they cover:
#  * GPU, within 10%. The ZeRO-3 estimator assumes one layer gathered at a time (4 bytes per
#    parameter of the largest layer: 16-bit weights + gradient), so we plan it with the knobs
#    that give that (persistence threshold, max live parameters, prefetch bucket = 0). With
#    our template's values the planner adds what DeepSpeed then keeps: small parameters whole
#    on every GPU (<= 1e6 elements: norms and, with GQA, k/v projections), gathered
#    parameters resident up to stage3_max_live_parameters = 1e9 (nearly all of 1b) and a
#    prefetch buffer of up to 5e8 elements. What remains: ZeRO-3 keeps a 16-bit gradient
#    partition the estimator's 18 bytes/param leave out (+2/18), but turns it to fp32 one
#    sub-group (1e9 elements) at a time where the estimator assumes all at once (7b on 1
#    GPU: -8%); ZeRO-2's gradient buffer holds whole parameters that touch the partition
#    (+2..9%).
#  * CPU, within 13%: the estimators multiply by additional_buffer_factor=1.5 (an "estimation
#    factor"), we compare against the unpadded number. With ZeRO-2 offload we also count the
#    16-bit copy of the partition DeepSpeed keeps on the host (+2/16 = 12.5%). DeepSpeed's
#    ZeRO-2 offload formula uses 4 x *total* GPUs for a per-node figure (its ZeRO-2
#    non-offload and ZeRO-3 formulas use GPUs per node); for several nodes we compare against
#    it with GPUs per node.
CASES = [
    (preset, gpus, nodes, zero, offload)
    for preset in ("1b", "7b")
    for gpus, nodes in ((1, 1), (8, 1), (8, 4))
    for zero in (2, 3)
    for offload in (False, True)
]


@pytest.mark.parametrize(("preset", "gpus", "nodes", "zero", "offload"), CASES)
def test_planner_agrees_with_deepspeeds_estimators(preset, gpus, nodes, zero, offload):
    cfg = load_model(preset)
    n = param_count(cfg)
    largest = max(t.numel for t in param_tensors(cfg))
    # the estimators assume 16-bit gradients: DeepSpeed's default dtypes under bf16
    setup = Setup(gpus=gpus, nodes=nodes, zero=zero, offload=offload, reduce_dtype="bf16")
    knobs, _ = deepspeed_knobs(zero, offload, cfg.d_model)
    if zero == 3:  # one layer gathered at a time, as the estimator assumes
        knobs.update(
            stage3_param_persistence_threshold=0,
            stage3_max_live_parameters=0,
            stage3_prefetch_bucket_size=0,
        )
    ours = plan(cfg, setup, knobs=knobs)
    states = ours.peak(without=("activations", "buffers"))
    if zero == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            n, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload
        )
        if offload and nodes > 1:  # per node, like its other formulas (see above)
            cpu = n * max(4 * gpus, 16) * 1.5
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            n,
            largest,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=offload,
            cpu_offload_params=offload,
            zero_init=True,
        )
    assert states == pytest.approx(gpu, rel=0.10)
    assert ours.cpu == pytest.approx(cpu / 1.5, rel=0.13)


# ------------------------------------------------------------------------------ command line


def test_cli_prints_every_component_and_the_verdict(capsys):
    assert main(["plan", "1b", "--gpus", "8", "--zero", "3", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer states", "activations", "DeepSpeed buffers"):
        assert f"  {row}" in out
    assert "configs/deepspeed/zero3.json" in out
    assert "without activation checkpointing" in out and "fits: yes" in out
    expected = plan(load_model("1b"), Setup(gpus=8, zero=3, seq_len=2048))
    assert f"total (the largest)     {expected.total / GiB:8.2f}" in out


def test_cli_says_when_it_does_not_fit_and_what_to_try(capsys):
    # the optimizer step is the peak: a higher ZeRO stage helps, checkpointing would not
    assert main(["plan", "7b", "--zero", "0", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "--zero 1" in out and "--activation-checkpointing" not in out
    # activations are the peak: checkpointing helps
    assert main(["plan", "7b", "--gpus", "8", "--zero", "3", "--micro-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "try --activation-checkpointing, --offload" in out


def test_cli_takes_a_model_yaml_and_offload(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: model/small.yaml\nn_layers: 2\n")  # a preset, from anywhere
    assert main(["plan", str(path), "--zero", "3", "--offload", "--nodes", "2", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 layers" in out and "zero3-offload.json" in out and "CPU memory per node" in out


def test_bad_preset_names_the_argument_and_suggests_one(capsys):
    assert main(["plan", "1bb"]) == 2
    err = capsys.readouterr().err
    assert "MODEL_PRESET: no model preset or file '1bb'" in err and "did you mean '1b'" in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--gpus", "0"], "--gpus"),
        (["--nodes", "two"], "--nodes"),
        (["--zero", "4"], "--zero"),
        (["--micro-batch", "-1"], "--micro-batch"),
        (["--gpu-memory", "lots"], "--gpu-memory"),
        (["--precision", "fp16"], "--precision"),
    ],
)
def test_bad_flag_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "125m", *argv])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seq-len", "4096"], "--seq-len: 4096 is longer than the model's max_seq_len (2048)"),
        (["--offload", "--zero", "0"], "--offload: DeepSpeed offloads under ZeRO 1-3 only"),
    ],
)
def test_inconsistent_flags_name_the_flag(argv, message, capsys):
    assert main(["plan", "125m", *argv]) == 2
    assert message in capsys.readouterr().err


def test_memory_sizes_are_binary():
    assert parse_memory("80GB") == parse_memory("80GiB") == parse_memory("80") == 80 * GiB
    assert parse_memory("81559MiB") == 81559 * 2**20
    assert parse_memory("1.5T") == 1.5 * 2**40


def test_runtime_sizes_zero3_knobs_from_the_model_like_the_planner():
    from launcher.config import CONFIG_ROOT, load_config
    from launcher.runtime import deepspeed_config
    from pretrain.config import PretrainConfig

    tiny = CONFIG_ROOT / "pretrain" / "tiny.yaml"
    cfg = load_config(PretrainConfig, str(tiny), ["dist.zero_stage=3"])
    zero = deepspeed_config(cfg, torch.float32, 1)["zero_optimization"]
    d = cfg.model.d_model
    assert zero["reduce_bucket_size"] == zero["stage3_max_reuse_distance"] == d * d
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * d * d)
    assert zero["stage3_param_persistence_threshold"] == 10 * d
    knobs, _ = deepspeed_knobs(3, offload=False, d_model=d)
    assert all(knobs[k] == v for k, v in zero.items() if k.startswith(("stage3_max", "reduce")))

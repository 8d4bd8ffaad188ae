"""Checkpoints under bf16 for every ZeRO stage, and the dtypes gradients travel in.

DeepSpeed wraps our optimizer differently per stage and precision (ZeRO-0 + bf16: fp32
clones per parameter; ZeRO-1 + bf16 with fp32 accumulation: a BF16_Optimizer over flat fp32
partitions; ZeRO-2/3: its ZeRO optimizers): a checkpoint must hold the fp32 master values and
Adam moments whichever it is, and resume must continue exactly. bf16 is slow on CPU (~60
GFLOP/s), so the runs are 4 steps of the tiny model.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.callbacks import default_callbacks
from launcher.config import CONFIG_ROOT, load_config
from launcher.loop import Trainer
from launcher.runtime import build_runtime, deepspeed_config
from pretrain.config import PretrainConfig
from pretrain.prepare import prepare_inputs
from pretrain.task import PretrainTask

from .runs import torchrun_two

TINY = CONFIG_ROOT / "pretrain" / "tiny.yaml"
STEPS = 4
# The optimizer wrapper DeepSpeed 0.19 builds around ours under bf16 with fp32 accumulation.
WRAPPER = {
    0: "FP16_UnfusedOptimizer",
    1: "BF16_Optimizer",
    2: "DeepSpeedZeroOptimizer",
    3: "DeepSpeedZeroOptimizer_Stage3",
}


def config(root: Path, name: str, *overrides: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        TINY,
        [
            f"run.output_dir={root}",
            f"run.name={name}",
            f"data.builtin.dir={root / 'corpus'}",
            "data.seq_len=32",
            "train.global_batch_size=4",  # 4 micro-batches of 1 on 1 rank, 2 on each of 2
            "train.micro_batch_size=1",
            "data.num_workers=0",
            "train.precision=bf16",
            f"train.max_steps={STEPS}",
            "schedule.warmup_steps=1",
            "checkpoint.every=2",
            "checkpoint.resume=none",
            "eval.every=null",
            "eval.max_batches=1",
            "metrics.wandb=false",
            "metrics.progress_bar=false",
            "metrics.log_every=1",
            "metrics.peak_flops=1e12",  # skip the matmul probe (slow in bf16 on CPU)
            *overrides,
        ],
    )


def train(cfg: PretrainConfig, fit: bool = True, prepare: bool = True) -> Trainer:
    if prepare:
        prepare_inputs(cfg)
    # DeepSpeed's BF16_Optimizer runs gc.collect() six times while it builds: over the objects
    # of a whole pytest process, a second each. Frozen objects are not scanned.
    gc.freeze()
    # tiny bf16 matmuls: one thread is as fast, and far faster on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runtime = build_runtime(cfg)
    try:
        trainer = Trainer(cfg, runtime, PretrainTask(cfg, runtime), default_callbacks(cfg))
        trainer.setup()
        if fit:
            trainer.fit()
        return trainer
    finally:
        runtime.close()
        gc.unfreeze()
        torch.set_num_threads(threads)


def losses(cfg: PretrainConfig) -> dict[int, float]:
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}


def saved(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob(f"{kind}-*.safetensors")):
        out.update(load_file(str(path)))
    return out


def step_dir(cfg: PretrainConfig, step: int) -> Path:
    return cfg.run_dir / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bf16")


@pytest.fixture(scope="module")
def zero0_bf16(root):
    """4 uninterrupted bf16 steps under ZeRO-0, saving at steps 2 and 4."""
    cfg = config(root, "zero0-full", "dist.zero_stage=0")
    check_engine(train(cfg), 0)
    return cfg


def check_engine(trainer: Trainer, stage: int) -> None:
    """The wrapper DeepSpeed chose, and fp32 gradient accumulation (except where DeepSpeed
    has none: ZeRO-0) and reduction under bf16."""
    engine = trainer.engine
    assert trainer.runtime.world_size == 1 and engine.zero_optimization_stage() == stage
    assert type(engine.optimizer).__name__ == WRAPPER[stage]
    accum = torch.bfloat16 if stage == 0 else torch.float32
    assert engine.get_data_types() == (torch.bfloat16, accum)
    assert engine.communication_data_type == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_resume_gives_the_losses_of_an_uninterrupted_run(root, zero0_bf16, stage):
    full = (
        zero0_bf16 if stage == 0 else config(root, f"zero{stage}-full", f"dist.zero_stage={stage}")
    )
    if stage:
        check_engine(train(full), stage)
    moments = saved(step_dir(full, 2), "optimizer")
    assert len(moments) > 20 and max(m.abs().max().item() for m in moments.values()) > 0
    resumed = config(
        root,
        f"zero{stage}-resumed",
        f"dist.zero_stage={stage}",
        f"checkpoint.resume={step_dir(full, 2)}",
    )
    train(resumed)
    expected = losses(full)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses(resumed) == {s: expected[s] for s in range(3, STEPS + 1)}
    # the final states agree too: masters (fp32) and moments, bit for bit
    for kind in ("model", "optimizer"):
        a, b = saved(step_dir(full, STEPS), kind), saved(step_dir(resumed, STEPS), kind)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), kind


@pytest.mark.slow
def test_a_bf16_zero0_checkpoint_loads_under_zero3_fp32_with_equal_masters(root, zero0_bf16):
    source = step_dir(zero0_bf16, STEPS)
    # Resuming at the horizon trains nothing and saves what it loaded.
    cfg = config(
        root,
        "zero3-fp32",
        "dist.zero_stage=3",
        "train.precision=fp32",
        f"checkpoint.resume={source}",
    )
    trainer = train(cfg)
    assert trainer.runtime.zero_stage == 3 and trainer.runtime.dtype == torch.float32
    for kind in ("model", "optimizer"):
        a, b = saved(source, kind), saved(step_dir(cfg, STEPS), kind)
        assert a.keys() == b.keys() and len(a) > 20
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    # the bf16 weights were the masters rounded: the masters are not the bf16 weights
    masters = saved(source, "model")
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())
    shutil.rmtree(cfg.run_dir)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gradients_accumulate_and_reduce_in_dist_reduce_dtype_under_bf16(tmp_path, stage):
    def dtypes(precision: torch.dtype, *overrides: str) -> tuple:
        cfg = config(tmp_path, "x", f"dist.zero_stage={stage}", *overrides)
        ds = deepspeed_config(cfg, precision, 1)
        return ds["communication_data_type"], ds.get("data_types", {}).get("grad_accum_dtype")

    # DeepSpeed 0.19 raises NotImplementedError for fp32 accumulation under ZeRO-0 + bf16:
    # there it accumulates in bf16 (its default, the key left out)
    accum = None if stage == 0 else "fp32"
    assert dtypes(torch.bfloat16) == ("fp32", accum)
    assert dtypes(torch.bfloat16, "dist.reduce_dtype=bf16") == ("bf16", accum and "bf16")
    assert dtypes(torch.float32, "dist.reduce_dtype=bf16") == ("fp32", "fp32")


@pytest.mark.slow
def test_dist_reduce_dtype_bf16_reaches_the_engine(root):
    cfg = config(root, "reduce-bf16", "dist.zero_stage=2", "dist.reduce_dtype=bf16")
    trainer = train(cfg, fit=False)
    assert trainer.engine.get_data_types() == (torch.bfloat16, torch.bfloat16)
    assert trainer.engine.communication_data_type == torch.bfloat16


# ------------------------------------------------------------------------------- two ranks


def two_rank_runs(root: Path) -> list[tuple[int, PretrainConfig, PretrainConfig]]:
    """(stage, uninterrupted run, run resumed from its step 2) for every stage, 2 ranks."""
    out = []
    for stage in (0, 1, 2, 3):
        common = (f"dist.zero_stage={stage}", "dist.num_processes=2")
        full = config(root, f"zero{stage}-full", *common)
        resumed = config(
            root, f"zero{stage}-resumed", *common, f"checkpoint.resume={step_dir(full, 2)}"
        )
        out.append((stage, full, resumed))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_bf16_resume_gives_the_losses_of_an_uninterrupted_run_for_every_stage(
    tmp_path,
):
    runs = two_rank_runs(tmp_path)
    for _, full, resumed in runs:
        prepare_inputs(full)
        prepare_inputs(resumed)
    # One pair of processes runs all eight trainings in turn (a launch costs seconds).
    torchrun_two("-m", __name__, str(tmp_path))
    for stage, full, resumed in runs:
        lines = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {x["dist/world_size"] for x in lines} == {2.0}, stage
        accum = torch.float32 if stage else torch.bfloat16  # (ZeRO-0: DeepSpeed has no fp32)
        engine = [WRAPPER[stage], "torch.bfloat16", str(accum), "torch.float32"]
        assert json.loads((full.run_dir / "engine.json").read_text()) == engine, stage
        expected = losses(full)
        assert sorted(expected) == list(range(1, STEPS + 1)), stage
        assert losses(resumed) == {s: expected[s] for s in range(3, STEPS + 1)}, stage
        for kind in ("model", "optimizer"):
            a, b = saved(step_dir(full, STEPS), kind), saved(step_dir(resumed, STEPS), kind)
            assert a.keys() == b.keys() and len(a) > 20, (stage, kind)
            assert all(torch.equal(a[k], b[k]) for k in a), (stage, kind)


def _two_rank_worker(root: Path) -> None:
    """Under torchrun, 2 ranks: every stage's uninterrupted run, then its resumed run."""
    import torch.distributed as dist

    # Joining a second gloo group in the same torchrun worker hung here: every run keeps the
    # first one (Runtime.close would destroy it).
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    for _, full, resumed in two_rank_runs(root):
        trainer = train(full, prepare=False)
        engine = trainer.engine
        if trainer.runtime.is_main:
            wrapper = type(engine.optimizer).__name__
            dtypes = [*engine.get_data_types(), engine.communication_data_type]
            dtypes = [wrapper, *(str(t) for t in dtypes)]
            (full.run_dir / "engine.json").write_text(json.dumps(dtypes))
        train(resumed, prepare=False)
    destroy()


if __name__ == "__main__":
    _two_rank_worker(Path(sys.argv[1]))


def test_zero0_bf16_starts_from_the_model_weights_with_no_adam_step(root):
    """FP16_UnfusedOptimizer runs one AdamW step on zero gradients as it is built: the masters
    shrank by lr x weight decay and Adam's count started at 1 (other stages: 0)."""
    from launcher import snapshot

    cfg = config(root, "zero0-fresh", "dist.zero_stage=0")
    assert cfg.optim.weight_decay > 0
    trainer = train(cfg, fit=False)
    wrapper = trainer.engine.optimizer
    assert type(wrapper).__name__ == "FP16_UnfusedOptimizer"
    pairs = [
        (lo, hi)
        for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
        for lo, hi in zip(lows, highs, strict=True)
    ]
    assert pairs and all(torch.equal(hi, lo.detach().float()) for lo, hi in pairs)
    assert snapshot.adam_step(trainer.optimizer, trainer.engine) == 0.0

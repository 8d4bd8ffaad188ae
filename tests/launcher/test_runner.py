"""The one stage runner: a finished stage's model lands in ``runs/<name>/hf/`` whole or not at
all (a kill during the export leaves no ``hf/``; the next launch exports), with
``hf/kiln.json`` saying what made it."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.checkpoint import sha256_file
from launcher.config import CONFIG_ROOT
from launcher.errors import UserError
from launcher.run_config import BestSection, RunConfig
from launcher.runner import run_stage, share_tied_weights

from .test_item_loss import Toy, config


class ExportingToy(Toy):
    """The toy task with an export: its weights as safetensors (slowly, if asked to)."""

    def export(self, model, state_dict, out: Path) -> None:
        out.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()}, str(out / "model.safetensors")
        )
        if os.environ.get("SLOW_EXPORT"):
            time.sleep(60)  # killed in here
        (out / "config.json").write_text("{}")


def stage_config(root: Path):
    cfg = config(root, "stage", 2, 1).model_copy(deep=True)
    cfg.train.max_steps = 4
    cfg.checkpoint.resume = "auto"
    return cfg


def test_the_model_directory_is_whole_or_absent_and_says_where_it_comes_from(tmp_path):
    """SIGKILL during the export: no hf/ (only hf.tmp/); the re-run exports from the final
    checkpoint without training again, and writes the lineage."""
    env = {**os.environ, "SLOW_EXPORT": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(CONFIG_ROOT.parent), env.get("PYTHONPATH", "")])
    module = "tests.launcher.test_runner"
    proc = subprocess.Popen([sys.executable, "-m", module, str(tmp_path)], env=env)
    hf = tmp_path / "stage" / "hf"
    partial = hf.with_name("hf.tmp") / "model.safetensors"
    deadline = time.time() + 120
    while not partial.exists():
        assert proc.poll() is None and time.time() < deadline, "the export never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not hf.exists()
    cfg = stage_config(tmp_path)
    run_stage(cfg, ExportingToy)  # the next launch: resumes at step 4, exports
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "kiln.json", "model.safetensors"]
    lineage = json.loads((hf / "kiln.json").read_text())
    assert lineage["stage"] == "toy" and lineage["step"] == 4 and lineage["parent"] is None
    assert lineage["config_fingerprint"] == cfg.fingerprint()
    assert lineage["weights"] == {"model.safetensors": sha256_file(hf / "model.safetensors")}
    assert not hf.with_name("hf.tmp").exists()
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x)["step"] for x in lines if "train/loss" in x) == 4  # not retrained


@pytest.mark.parametrize("with_parent", [False, True])
def test_a_stage_started_from_a_parent_records_it(tmp_path, with_parent):
    parent = None
    if with_parent:
        parent = tmp_path / "parent"
        parent.mkdir()
        save_file({"w": Toy.build_model(None).weight.detach()}, str(parent / "model.safetensors"))
        (parent / "kiln.json").write_text(json.dumps({"stage": "pretrain", "step": 80}))
    cfg = stage_config(tmp_path)
    run_stage(cfg, ExportingToy, parent=parent)
    lineage = json.loads((cfg.run_dir / "hf" / "kiln.json").read_text())
    if not with_parent:
        assert lineage["parent"] is None
        return
    assert lineage["parent"]["path"] == str(parent.resolve())
    assert lineage["parent"]["lineage"] == {"stage": "pretrain", "step": 80}
    assert lineage["parent"]["weights"] == {
        "model.safetensors": sha256_file(parent / "model.safetensors")
    }
    # and the rest of the lineage: code, times, final metrics, the data's fingerprint
    assert lineage["code"]["package"] == "0.1.0" and lineage["run_name"] == cfg.run.name
    assert lineage["started_at"] <= lineage["finished_at"]
    assert lineage["final_metrics"]["train/loss"] > 0 and len(lineage["data_fingerprint"]) == 16
    # every checkpoint's manifest names the same parent
    manifests = list((cfg.run_dir / "checkpoints").glob("step-*/manifest.json"))
    assert manifests  # the final checkpoint at least
    for manifest in manifests:
        meta = json.loads(manifest.read_text())["meta"]
        assert meta["parent"] == {k: lineage["parent"][k] for k in ("path", "weights")}


def communication_threads() -> set[int]:
    """This process's threads of gloo and of the c10d store (Linux names them in /proc)."""
    tasks = Path("/proc/self/task")
    names = {int(t.name): (t / "comm").read_text().strip() for t in tasks.iterdir()}
    return {tid for tid, name in names.items() if "gloo" in name or "tcpstore" in name}


def test_a_finished_stage_leaves_no_process_group_behind(tmp_path):
    """The run's process groups die in `Runtime.close()`, not at interpreter shutdown: one
    that lives to shutdown is torn down with its gloo threads running, and a finished run's
    process aborts (SIGABRT, "terminate called without an active exception"; seen once in
    ~40 2-rank runs). Before the fix, DeepSpeed's engine (in reference cycles, and held by
    the Accelerator) and `torch.distributed.nn.functional`'s defaults (bound to the world
    group when torch._dynamo imports it mid-run) kept the world group and its 7 threads."""
    gc.collect()
    before = communication_threads()
    run_stage(stage_config(tmp_path), ExportingToy)
    assert (tmp_path / "stage" / "hf" / "model.safetensors").exists()
    assert communication_threads() - before == set()


class FailingToy(ExportingToy):
    """Fails in the second step's first micro-batch (4 micro-batches a step)."""

    calls = 0

    def loss(self, model, batch) -> torch.Tensor:
        self.calls += 1
        if self.calls == 5:
            raise ValueError("a bad batch at step 2")
        return super().loss(model, batch)


def test_a_failed_stage_leaves_no_process_group_behind_and_says_why(tmp_path):
    """The same for a run that fails mid-training: the error reaches the caller as raised,
    and the traceback's frames (which held the trainer and its engine) let the groups go."""
    gc.collect()
    before = communication_threads()
    with pytest.raises(ValueError, match="a bad batch at step 2"):
        run_stage(stage_config(tmp_path), FailingToy)
    assert communication_threads() - before == set()


def test_close_says_when_freeing_the_engine_fails_and_still_leaves_the_group(tmp_path, caplog):
    """close() runs in `finally` blocks, so a failure to free the engine must not replace the
    run's own error; it is logged (the groups may outlive close() then), not swallowed."""
    import torch.distributed as dist

    from launcher.runtime import build_runtime

    runtime = build_runtime(stage_config(tmp_path))
    assert dist.is_initialized()

    def broken() -> None:
        raise RuntimeError("engine already half torn down")

    runtime.accelerator.free_memory = broken
    with caplog.at_level("WARNING", logger="launcher.runtime"):
        runtime.close()
    assert not dist.is_initialized()
    warned = [r.getMessage() for r in caplog.records if r.name == "launcher.runtime"]
    assert warned == [
        "freeing the engine at close failed: RuntimeError: engine already half torn down"
    ]


if __name__ == "__main__":
    run_stage(stage_config(Path(sys.argv[1])), ExportingToy)


class ScriptedEval(ExportingToy):
    """Evaluations give 5, 3, 4, 6, 7 at steps 1..5: the best (lowest) is step 2's."""

    SCRIPT = (5.0, 3.0, 4.0, 6.0, 7.0)

    def evaluate(self, model):
        self.calls = getattr(self, "calls", 0) + 1
        return {"eval/loss": self.SCRIPT[self.calls - 1]}


def test_the_best_checkpoint_survives_pruning_and_is_what_the_stage_exports(tmp_path):
    cfg = stage_config(tmp_path).model_copy(deep=True)
    cfg.train.max_steps = 5
    cfg.eval.every = 1
    cfg.checkpoint.every = 1
    cfg.checkpoint.keep_last = 1
    cfg.checkpoint.best = BestSection(metric="eval/loss", mode="min")
    run_stage(cfg, ScriptedEval)
    root = cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000005"]
    assert (root / "best").resolve() == (root / "step-00000002").resolve()
    saved = load_file(str(next((root / "step-00000002").glob("model-*.safetensors"))))
    exported = load_file(str(cfg.run_dir / "hf" / "model.safetensors"))
    assert all(torch.equal(exported[k], saved[k]) for k in exported)  # step 2's, not 5's
    lineage = json.loads((cfg.run_dir / "hf" / "kiln.json").read_text())
    assert lineage["step"] == 5 and lineage["weights_from"].endswith("step-00000002")
    state = json.loads((root / "step-00000005" / "trainer.json").read_text())["train_state"]
    assert (state["best_step"], state["best_value"]) == (2, 3.0)  # remembered across resumes


def test_a_best_metric_the_evaluation_does_not_report_is_named(tmp_path):
    cfg = stage_config(tmp_path).model_copy(deep=True)
    cfg.eval.every = 1
    cfg.checkpoint.best = BestSection(metric="eval/accuracy", mode="max")
    with pytest.raises(UserError, match=r"checkpoint.best.metric: 'eval/accuracy' .*eval/loss"):
        run_stage(cfg, ScriptedEval)


def test_init_path_is_checked_before_anything_starts_and_sizes_the_model(tmp_path):
    from launcher.config import ConfigError, load_config

    yaml = tmp_path / "stage.yaml"
    yaml.write_text("run:\n  name: child\n")
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"init\.path: .*nowhere: no such directory"):
        load_config(RunConfig, yaml, [f"init.path={missing}"])
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_config(RunConfig, yaml, [f"init.path={parent}"])
    (parent / "config.json").write_text(json.dumps({"hidden_size": 96}))
    with pytest.raises(ConfigError, match="no weights"):
        load_config(RunConfig, yaml, [f"init.path={parent}"])
    save_file({"w": torch.zeros(2)}, str(parent / "model.safetensors"))
    cfg = load_config(RunConfig, yaml, [f"init.path={parent}"])
    assert cfg.model_width() == 96  # ZeRO-3's buffers are sized from the parent's width


def test_pretraining_refuses_an_init_path_it_would_not_read(tmp_path):
    """Pretraining builds the seeded `model`; an init.path would have been silently unread
    (a user expecting continued pretraining would have trained from scratch)."""
    from launcher.config import CONFIG_ROOT, ConfigError, load_config
    from pretrain.config import PretrainConfig

    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({"hidden_size": 96}))
    save_file({"w": torch.zeros(2)}, str(parent / "model.safetensors"))
    tiny = CONFIG_ROOT / "pretrain" / "tiny.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, tiny, [f"init.path={parent}"])
    [problem] = info.value.problems
    assert problem.key == "init.path" and f"would not read {parent}" in problem.message
    assert f"override 'init.path={parent}'" in str(info.value)  # where the value came from
    assert load_config(PretrainConfig, tiny).init.path is None  # without it: fine


@pytest.mark.parametrize("tie", [True, False])
def test_an_export_from_a_gathered_state_dict_stores_a_tied_head_once(tmp_path, tie) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=tie)  # fmt: skip
    model = LlamaForCausalLM(config)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # as ZeRO-3 gathers them
    model.save_pretrained(tmp_path, state_dict=share_tied_weights(model, gathered))
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tie
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name

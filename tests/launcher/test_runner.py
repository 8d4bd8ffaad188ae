"""The one stage runner: a finished stage's model lands in ``runs/<name>/hf/`` whole or not at
all (a kill during the export leaves no ``hf/``; the next launch exports), with
``hf/kiln.json`` saying what made it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from launcher.checkpoint import sha256_file
from launcher.config import CONFIG_ROOT
from launcher.runner import run_stage

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


if __name__ == "__main__":
    run_stage(stage_config(Path(sys.argv[1])), ExportingToy)

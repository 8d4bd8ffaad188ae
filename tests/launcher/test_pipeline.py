"""`kiln pipeline`: every stage's config checked before anything runs, a chain run as separate
processes, finished stages skipped, a stage whose parent changed set aside and re-run, a
failing stage named with its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from launcher.cli import main as kiln_main
from launcher.config import CONFIG_ROOT
from launcher.report import figure
from launcher.runner import weight_digests

TINY = str(CONFIG_ROOT / "pretrain" / "tiny.yaml")
SFT = str(CONFIG_ROOT / "finetune" / "sft-tiny.yaml")
QUIET = ["metrics.wandb=false", "metrics.progress_bar=false", "checkpoint.every=null"]


def write_pipeline(root: Path, pretrain: list[str] = (), sft: list[str] = ()) -> Path:
    spec = {
        "name": "chain",
        "output_dir": str(root / "runs"),
        "prepare": [{"call": "finetune.builtin:prepare",
                     "with": {"dir": str(root / "data"), "variants": 1}}],
        "stages": [
            {"stage": "pretrain", "config": TINY,
             "overrides": [f"data.builtin.dir={root / 'corpus'}", "train.max_steps=10",
                           "data.builtin.docs=200", *QUIET, *pretrain]},
            {"stage": "sft", "config": SFT,
             "overrides": ["data.train=[{paths: [{data}/sft/train.jsonl]}]",
                           "data.validation=null", "eval.every=null", "checkpoint.best=null",
                           "train.epochs=null", "train.max_steps=4", "schedule.warmup_steps=1",
                           *QUIET, *sft]},
        ],
    }  # fmt: skip
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def pipeline(root: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", "pipeline", str(config)],
        cwd=root, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
    )  # fmt: skip


def test_every_problem_of_every_stage_is_reported_before_anything_runs(tmp_path, capsys):
    config = write_pipeline(tmp_path, pretrain=["train.max_steps=-1"], sft=["optim.lr=-1"])
    assert kiln_main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2 problems in the stages" in err
    assert "stage pretrain (pretrain)" in err and "train.max_steps" in err
    assert "stage sft (sft)" in err and "optim.lr" in err
    assert "init.path" not in err  # the pretraining export is not written yet: not a problem
    assert not (tmp_path / "runs" / "chain" / "pretrain").exists()


def test_a_bad_pipeline_file_names_its_keys(tmp_path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"stages": [
        {"stage": "no-such-stage", "config": TINY},
        {"stage": "sft", "config": SFT, "overrides": ["ppo.reward_model={hf:nope}"]},
    ]}))  # fmt: skip
    assert kiln_main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stages.0.stage: unknown stage 'no-such-stage'" in err
    assert "stages.1.overrides: {hf:nope}: no stage before it" in err


def test_every_panel_of_a_stage_figure_has_labelled_axes():
    rows = [{"step": s, "train/tokens_seen": 100.0 * s, "train/loss": 5.0 / s} for s in (1, 2, 3)]
    rows[-1] |= {"eval/loss": 1.5, "eval/bits_per_byte": 2.0, "eval/perplexity": 4.5}
    fig = figure("pretrain", rows)
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert labels == [("tokens seen", "value"), ("tokens seen", "eval/bits_per_byte")]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "train/loss",
        "eval/loss",
    ]
    ppo = figure("ppo", [{"step": 1, "ppo/score": 0.2, "ppo/kl": 0.0, "train/loss": 1.0}])
    assert [ax.get_ylabel() for ax in ppo.axes] == ["ppo/score", "ppo/kl"]
    assert figure("sft", []) is None


@pytest.mark.slow
def test_a_chain_runs_skips_what_is_finished_and_reruns_what_changed(tmp_path):
    config = write_pipeline(tmp_path)
    first = pipeline(tmp_path, config)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    chain = tmp_path / "runs" / "chain"
    parent_hf, sft_hf = chain / "pretrain" / "hf", chain / "sft" / "hf"
    lineage = json.loads((sft_hf / "kiln.json").read_text())
    assert lineage["parent"]["path"] == str(parent_hf.resolve())
    assert lineage["parent"]["weights"] == weight_digests(parent_hf)  # what it loaded
    assert (chain / "logs" / "sft.log").read_text()
    report = (chain / "report.md").read_text()
    assert "| pretrain | pretrain | 10 |" in report and "| sft | sft | 4 |" in report
    for image in ("pretrain.png", "sft.png"):
        assert f"]({image})" in report
        with Image.open(chain / image) as png:
            assert png.format == "PNG" and png.size[0] > 200

    again = pipeline(tmp_path, config)  # nothing to do
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2

    # another pretraining export (as if re-trained): SFT is stale and runs again
    weights = load_file(str(parent_hf / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(parent_hf / "model.safetensors"))
    third = pipeline(tmp_path, config)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert "pretrain: finished earlier, skipped" in third.stdout
    assert "sft: its config or parent changed" in third.stdout
    assert len(list(chain.glob("sft-stale-*"))) == 1
    lineage = json.loads((sft_hf / "kiln.json").read_text())
    assert lineage["parent"]["weights"] == weight_digests(parent_hf)

    # a stage that fails: named, with its exit status and log; the pipeline exits 1
    missing = tmp_path / "missing.jsonl"
    config = write_pipeline(tmp_path, sft=[f"data.train=[{{paths: [{missing}]}}]"])
    failed = pipeline(tmp_path, config)
    assert failed.returncode == 1
    assert "stage sft (sft) failed: exit status 1" in failed.stderr
    assert str(chain / "logs" / "sft.log") in failed.stderr
    assert str(missing) in (chain / "logs" / "sft.log").read_text()


def test_a_failing_prepare_call_is_named_and_nothing_runs(tmp_path, capsys):
    config = write_pipeline(tmp_path)
    spec = yaml.safe_load(config.read_text())
    spec["prepare"][0]["with"]["variants"] = 0  # BuiltinFinetuneConfig: must be > 0
    config.write_text(yaml.safe_dump(spec))
    assert kiln_main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert "prepare.0: finetune.builtin:prepare: ValidationError" in err and "variants" in err
    assert not (tmp_path / "runs" / "chain" / "pretrain").exists()

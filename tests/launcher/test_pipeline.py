"""`kiln pipeline`: every stage's config checked before anything runs, a chain run as separate
processes, finished stages skipped, a stage whose parent changed set aside and re-run, a
failing stage named with its log."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from launcher.cli import main as kiln_main
from launcher.config import CONFIG_ROOT
from launcher.persist import DELAY_ENV
from launcher.report import figure

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


def pipeline_here(root: Path, config: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    """`kiln pipeline` in this process, from ``root``: (exit status, stdout, stderr). The
    stages still run as processes of their own; a new interpreter would only add its imports
    (seconds of CPU)."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    capsys.readouterr()
    code = kiln_main(["pipeline", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_problem_of_every_stage_is_reported_before_anything_runs(tmp_path, capsys):
    config = write_pipeline(tmp_path, pretrain=["train.max_steps=-1"], sft=["optim.lr=-1"])
    assert kiln_main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2 problems in the stages" in err
    assert "stage pretrain (pretrain)" in err and "train.max_steps" in err
    assert "stage sft (sft)" in err and "optim.lr" in err
    assert "init.path" not in err  # the pretraining export is not written yet: not a problem
    assert not (tmp_path / "runs" / "chain" / "pretrain").exists()


def test_a_pretrain_stage_given_a_parent_is_refused_before_anything_runs(tmp_path, capsys):
    config = write_pipeline(tmp_path)
    spec = yaml.safe_load(config.read_text())
    spec["stages"].append({**spec["stages"][0], "id": "again"})  # parent: the sft stage
    config.write_text(yaml.safe_dump(spec))
    assert kiln_main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert "1 problem in the stages" in err
    assert "stage again (pretrain): parent: 'sft' would not be read" in err
    assert "parent: null" in err
    assert not (tmp_path / "runs" / "chain").exists()


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


# ---------------------------------------------------------------- the reduced chain, run

TINY_CHAIN = CONFIG_ROOT / "pipeline" / "tiny.yaml"
STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "classify")
PARENTS = {"sft": "pretrain", "reward": "sft", "dpo": "sft", "ppo": "sft", "classify": "pretrain"}
WALL_CLOCK = ("time/", "throughput/", "memory/", "rollout/generation_tokens_per_s")


def sha256_of_weights(hf: Path) -> dict[str, str]:
    """The export's weight files hashed here, not by the code under test."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(hf.glob("*.safetensors"))
    }


def final_metrics(hf: Path) -> dict[str, float]:
    saved = json.loads((hf / "kiln.json").read_text())["final_metrics"]
    return {k: v for k, v in saved.items() if not k.startswith(WALL_CLOCK)}


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float, dict, dict]:
    """configs/pipeline/tiny.yaml as shipped, run in a fresh directory (its relative paths:
    data, corpus and runs land there); with every stage's final metrics and weights' SHA-256
    as it finished (a later test changes the chain)."""
    root = tmp_path_factory.mktemp("tiny-chain")
    started = time.time()
    done = pipeline(root, TINY_CHAIN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    chain = root / "runs" / "tiny-chain"
    finals = {s: final_metrics(chain / s / "hf") for s in STAGES}
    weights = {s: sha256_of_weights(chain / s / "hf") for s in STAGES}
    return root, done, time.time() - started, finals, weights


@pytest.mark.slow
@pytest.mark.serial  # a wall-clock limit
def test_the_reduced_chain_runs_every_stage_from_its_parent(tiny_chain):
    root, done, seconds, _, _ = tiny_chain
    print(f"reduced chain: {seconds:.0f} s")
    assert seconds < 300
    chain = root / "runs" / "tiny-chain"
    for stage, parent in PARENTS.items():
        lineage = json.loads((chain / stage / "hf" / "kiln.json").read_text())
        assert lineage["stage"] == stage
        assert lineage["parent"]["path"] == str((chain / parent / "hf").resolve())
        assert lineage["parent"]["weights"] == sha256_of_weights(chain / parent / "hf")
        assert (chain / "logs" / f"{stage}.log").read_text()
    # the table: one row per stage, before and after of each stage's measure
    report = (chain / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["stage", "kind", "steps", "seconds", "final train loss", "measure",
                      "before", "after", "change", "parent"]  # fmt: skip
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in (
        [c.strip() for c in line.strip("|").split("|")] for line in table[1:])}  # fmt: skip
    assert list(rows) == list(STAGES)
    measures = {stage: row["measure"] for stage, row in rows.items()}
    assert measures == {
        "pretrain": "bits per byte (unigram baseline)", "sft": "eval/exact_match",
        "reward": "eval/accuracy", "dpo": "held-out reward", "ppo": "held-out reward",
        "classify": "test macro-F1 (untrained head)",
    }  # fmt: skip
    for row in rows.values():
        assert row["steps"] != "-" and float(row["seconds"]) > 0, row
        float(row["before"]), float(row["after"])  # numbers, each
        assert row["change"] != "-"
    assert "sd, KL" in rows["dpo"]["change"] and "sd, KL" in rows["ppo"]["change"]
    for stage in STAGES:
        assert f"]({stage}.png)" in report
        with Image.open(chain / f"{stage}.png") as png:
            assert png.format == "PNG" and png.size[0] > 200
    assert "every stage finished; report:" in done.stdout


@pytest.mark.slow
def test_a_rerun_skips_a_changed_export_reruns_its_children_and_a_failure_is_named(
    tiny_chain, capsys, monkeypatch
):
    root, _, _, _, _ = tiny_chain
    chain = root / "runs" / "tiny-chain"
    code, out, _ = pipeline_here(root, TINY_CHAIN, capsys, monkeypatch)  # nothing to do
    assert code == 0 and out.count("finished earlier, skipped") == 6

    # another SFT export (as if re-trained): the stages built on it are stale and run again
    sft_hf = chain / "sft" / "hf"
    weights = load_file(str(sft_hf / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(sft_hf / "model.safetensors"))
    code, out, err = pipeline_here(root, TINY_CHAIN, capsys, monkeypatch)
    assert code == 0, out[-2000:] + err[-3000:]
    for stage in ("pretrain", "sft", "classify"):
        assert f"pipeline {stage}: finished earlier, skipped" in out
    for stage in ("reward", "dpo", "ppo"):
        assert f"{stage}: its config or parent changed" in out
        assert len(list(chain.glob(f"{stage}-stale-*"))) == 1
        lineage = json.loads((chain / stage / "hf" / "kiln.json").read_text())
        assert lineage["parent"]["weights"] == sha256_of_weights(sft_hf)

    # a stage that fails: named, with its exit status and log; the pipeline exits 1
    missing = root / "missing.jsonl"
    spec = yaml.safe_load(TINY_CHAIN.read_text())
    spec["stages"][-1]["overrides"].append(f"data.train=[{{paths: [{missing}]}}]")
    broken = root / "broken.yaml"
    broken.write_text(yaml.safe_dump(spec))
    code, _, err = pipeline_here(root, broken, capsys, monkeypatch)
    assert code == 1
    assert "stage classify (classify) failed: exit status 1" in err
    assert "its log: runs/tiny-chain/logs/classify.log" in err  # as the config says
    assert str(missing) in (chain / "logs" / "classify.log").read_text()


@pytest.mark.slow
def test_a_chain_stopped_during_sft_and_run_again_ends_as_an_uninterrupted_one(
    tiny_chain, tmp_path, capsys, monkeypatch
):
    """SIGTERM to the pipeline while SFT trains: the stage saves and stops, the pipeline
    stops; the same command again resumes SFT from its checkpoint and runs the rest. The
    reduced chain cut after reward (one stage after SFT shows "the rest"; each launch costs
    ~20 s), its finished pretraining and prepared data copied from the uninterrupted chain:
    SFT's and reward's final metrics (wall-clock ones aside) and weights equal the
    uninterrupted chain's exactly."""
    proc, config = chain_stopped_during_sft(tiny_chain, tmp_path, 3, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "pipeline stopped during sft" in out, out[-3000:]
    assert not (tmp_path / "runs" / "tiny-chain" / "sft" / "hf" / "kiln.json").exists()
    run_again_to_the_uninterrupted_end(tiny_chain, tmp_path, config, 3, capsys, monkeypatch)


@pytest.mark.slow
def test_a_chain_killed_during_sft_stops_its_stage_and_runs_again_to_the_same_end(
    tiny_chain, tmp_path, capsys, monkeypatch
):
    """SIGKILL to the pipeline (the OOM killer, `kill -9`) while SFT trains: it cannot pass
    anything on, so the stage learns it from the kernel (``follow_parent``: SIGTERM when its
    parent dies), saves and stops. Before, the stage ran on unseen, and running the command
    again failed: "sft is in use by another launch". The command is run again at once, while
    the stage still saves (its save slowed to 4 s): the new SFT launch waits for the stopping
    one to let go (the lock file says "stopping"), resumes from its checkpoint, and the chain
    (cut after SFT) ends as uninterrupted."""
    proc, config = chain_stopped_during_sft(
        tiny_chain, tmp_path, 2, signal.SIGKILL, {DELAY_ENV: "4"}
    )
    proc.communicate(timeout=60)
    sft = tmp_path / "runs" / "tiny-chain" / "sft"
    deadline = time.time() + 10
    while "stopping" not in (
        holder := json.JSONDecoder().raw_decode((sft / ".lock").read_text())[0]
    ):
        assert time.time() < deadline, f"the stage was not told to stop: {holder}"
        time.sleep(0.05)
    fd = os.open(sft / ".lock", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # still held: the orphan saves its checkpoint
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    run_again_to_the_uninterrupted_end(tiny_chain, tmp_path, config, 2, capsys, monkeypatch)
    sft_log = (tmp_path / "runs" / "tiny-chain" / "logs" / "sft.log").read_text()
    assert "runs/tiny-chain/sft is held by a launch that is stopping" in sft_log, sft_log[-3000:]
    assert "it let go after" in sft_log


def chain_stopped_during_sft(
    tiny_chain, tmp_path: Path, n_stages: int, sig: int, env: dict | None = None
):
    """The reduced chain's first ``n_stages`` in ``tmp_path``, its finished pretraining and
    prepared data copied from the uninterrupted chain, started as `kiln pipeline` (``env``
    added to its environment) and sent ``sig`` once SFT has logged step 2: (the pipeline's
    process, the cut chain's config)."""
    root = tiny_chain[0]
    for part in ("data", "runs/tiny-chain/pretrain"):
        shutil.copytree(root / part, tmp_path / part)
    state = json.loads((root / "runs" / "tiny-chain" / "pipeline.json").read_text())
    (tmp_path / "runs" / "tiny-chain" / "pipeline.json").write_text(
        json.dumps({"pretrain": state["pretrain"]})
    )
    spec = yaml.safe_load(TINY_CHAIN.read_text())
    assert [s["stage"] for s in spec["stages"][:n_stages]] == list(STAGES[:n_stages])
    spec["stages"] = spec["stages"][:n_stages]
    config = tmp_path / f"tiny-to-{STAGES[n_stages - 1]}.yaml"
    config.write_text(yaml.safe_dump(spec))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    command = [sys.executable, "-m", "launcher", "pipeline", str(config)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics_file = tmp_path / "runs" / "tiny-chain" / "sft" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
        if any(json.loads(x).get("step", 0) >= 2 for x in lines if x.strip()):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    return proc, config


def run_again_to_the_uninterrupted_end(tiny_chain, tmp_path, config, n_stages, capsys, monkeypatch):
    """The same command again: pretraining skipped, SFT resumed from its checkpoint, and every
    stage after pretraining ends with the uninterrupted chain's final metrics (wall-clock ones
    aside) and weights, exactly."""
    _, _, _, uninterrupted, weights = tiny_chain
    code, out, err = pipeline_here(tmp_path, config, capsys, monkeypatch)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "pretrain: finished earlier, skipped" in out
    sft_log = (tmp_path / "runs" / "tiny-chain" / "logs" / "sft.log").read_text()
    assert "resumed from" in sft_log or "resuming from" in sft_log, sft_log[-3000:]
    for stage in STAGES[1:n_stages]:  # pretraining: copied
        hf = tmp_path / "runs" / "tiny-chain" / stage / "hf"
        ours = final_metrics(hf)
        assert ours == uninterrupted[stage], (stage, ours, uninterrupted[stage])
        assert sha256_of_weights(hf) == weights[stage], stage


def test_a_failing_prepare_call_is_named_and_nothing_runs(tmp_path, capsys):
    config = write_pipeline(tmp_path)
    spec = yaml.safe_load(config.read_text())
    spec["prepare"][0]["with"]["variants"] = 0  # BuiltinFinetuneConfig: must be > 0
    config.write_text(yaml.safe_dump(spec))
    assert kiln_main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert "prepare.0: finetune.builtin:prepare: ValidationError" in err and "variants" in err
    assert not (tmp_path / "runs" / "chain" / "pretrain").exists()

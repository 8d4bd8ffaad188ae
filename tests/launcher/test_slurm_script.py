"""The rendered sbatch script, run by bash with stand-ins for srun/scontrol/sbatch: user values
stay literals, signals reach the trainer, a preempted run is requeued, stages chain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launcher.config import CONFIG_ROOT
from launcher.slurm import TemplateError, render

TINY = str(CONFIG_ROOT / "pretrain" / "tiny.yaml")
EVIL = "x; touch {canary} $(touch {canary}) `touch {canary}` ' \" \n touch {canary}"

FAKE_SRUN = """#!/bin/bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LOG"
trap 'echo USR1 >> "$FAKE_LOG"; [ -n "$PREEMPT" ] && touch "$PREEMPT"; exit 0' USR1
[ -n "$PREEMPT_NOW" ] && touch "$PREEMPT_NOW"
for _ in $(seq 40); do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo nodeA; echo nodeB; else echo "scontrol $*" >> "$FAKE_LOG"; fi
"""
FAKE_SBATCH = """#!/bin/bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LOG"
echo $((4000 + $(wc -l < "$FAKE_LOG")))
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "calls"),
    }
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[A-B]", SLURM_NNODES="2")
    return env


def submit(tmp_path, env, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "slurm",
            "submit",
            TINY,
            "--nodes",
            "2",
            f"run.output_dir={tmp_path / 'runs'}",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def calls(env) -> list:
    with open(env["FAKE_LOG"]) as f:
        lines = f.read().splitlines()
    return [json.loads(x) if x.startswith("[") else x for x in lines]


def test_a_hostile_config_value_and_job_name_stay_literal(tmp_path, fake_slurm):
    canary = tmp_path / "pwned"
    evil = EVIL.format(canary=canary)
    done = submit(
        tmp_path,
        fake_slurm,
        "run.name=evil",
        "data.builtin=null",
        "data.sources=[{paths: [a.jsonl]}]",
        f"data.sources.0.text_field={evil}",
        "--job-name",
        evil,
    )
    assert done.returncode == 0, done.stderr
    sbatch_call = calls(fake_slurm)[0]
    assert sbatch_call[sbatch_call.index("--job-name") + 1] == evil  # one argv element
    script = sbatch_call[-1]
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    # Run the rendered script itself with the stand-in srun: the value arrives as one argument.
    subprocess.run(["bash", script], env=fake_slurm, timeout=60, capture_output=True)
    srun_call = next(c for c in calls(fake_slurm)[1:] if isinstance(c, list))
    assert f"data.sources.0.text_field={evil}" in srun_call
    assert not canary.exists()


def test_usr1_to_the_batch_script_reaches_the_tasks_and_a_preempted_run_is_requeued(
    tmp_path, fake_slurm
):
    done = submit(tmp_path, fake_slurm, "run.name=pre")
    assert done.returncode == 0, done.stderr
    script = calls(fake_slurm)[0][-1]
    run_dir = tmp_path / "runs" / "pre"
    env = {**fake_slurm, "PREEMPT": str(run_dir / "PREEMPTED")}
    proc = subprocess.Popen(
        ["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 30
    while not any(isinstance(c, list) and sys.executable in c for c in calls(fake_slurm)):
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0
    log = calls(fake_slurm)
    assert "USR1" in log and "scontrol requeue 4242" in log
    srun_call = next(c for c in log if isinstance(c, list) and sys.executable in c)
    assert srun_call[srun_call.index("--main-addr") + 1] == "nodeA"
    assert srun_call[srun_call.index("--nodes") + 1] == "2"


def test_a_run_that_finished_is_not_requeued(tmp_path, fake_slurm):
    done = submit(tmp_path, fake_slurm, "run.name=done")
    script = calls(fake_slurm)[0][-1]
    env = {**fake_slurm}
    proc = subprocess.Popen(["bash", script], env=env)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)  # forwarded as TERM; no PREEMPTED file appears
    proc.wait(timeout=30)
    assert done.returncode == 0
    assert not any(isinstance(c, str) and "requeue" in c for c in calls(fake_slurm))


def test_export_is_chained_after_the_training_job(tmp_path, fake_slurm):
    done = submit(tmp_path, fake_slurm, "run.name=chain", "--then", "export")
    assert done.returncode == 0, done.stderr
    first, second = calls(fake_slurm)[:2]
    job = done.stdout.split("submitted job ")[1].split(":")[0]
    assert f"--dependency=afterok:{job}" in second
    assert f"submitted job {int(job) + 1} (export, after {job} succeeds)" in done.stdout
    with open(second[-1]) as f:
        assert "launcher export" in f.read()
    assert first[-1] != second[-1]


def test_a_bad_config_is_refused_before_anything_is_submitted(tmp_path, fake_slurm):
    done = submit(tmp_path, fake_slurm, "train.max_stepz=3")
    assert done.returncode == 2 and "train.max_stepz" in done.stderr
    assert not os.path.exists(fake_slurm["FAKE_LOG"])


def test_render_refuses_missing_values_and_quotes_everything():
    with pytest.raises(TemplateError, match="no value for B"):
        render("{{A}} {{B}}", {"A": 1})
    assert render("X={{A}} Y=({{B}})", {"A": "a b", "B": ["c", "d;e"]}) == "X='a b' Y=(c 'd;e')"

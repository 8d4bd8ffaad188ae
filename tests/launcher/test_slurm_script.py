"""The rendered sbatch script, run by bash with stand-ins for srun/scontrol/sbatch: user values
stay literals, signals reach the trainer, a preempted run is requeued, stages chain."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from launcher.config import CONFIG_ROOT
from launcher.launch import launch_env
from launcher.rundir import PREEMPTED, summary
from launcher.slurm import TemplateError, render, submit_main

TINY = str(CONFIG_ROOT / "pretrain" / "tiny.yaml")
EVIL = "x; touch {canary} $(touch {canary}) `touch {canary}` ' \" \n touch {canary}"

FAKE_SRUN = r"""#!/bin/bash
# The trap comes before the call is logged: the test signals as soon as it sees the call, and
# a USR1 before the trap would kill this stand-in (exit 138) under a loaded machine.
preempted() {  # what the trainer does: PREEMPTED, with this launch's id
    echo USR1 >> "$FAKE_LOG"
    [ -n "$PREEMPT" ] && echo "{\"launch\": \"$KILN_LAUNCH_ID\"}" > "$PREEMPT"
    exit 0
}
trap preempted USR1
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LOG"
[ -n "$SRUN_FAILS" ] && exit 1  # e.g. a node that cannot start the task
if [ -n "$SRUN_RUNS" ]; then  # run the task itself (one node)
    while [ "${1#--}" != "$1" ]; do shift; done
    exec "$@"
fi
[ -n "$PREEMPT_NOW" ] && touch "$PREEMPT_NOW"
for _ in $(seq 40); do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo nodeA; echo nodeB; else echo "scontrol $*" >> "$FAKE_LOG"; fi
"""
FAKE_SBATCH = """#!/bin/bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LOG"
if [ -n "$SBATCH_REFUSES" ] && [ "$(wc -l < "$FAKE_LOG")" -ge "${SBATCH_REFUSES_FROM:-1}" ]; then
    echo "$SBATCH_REFUSES" >&2; exit 1
fi
echo $((4000 + $(wc -l < "$FAKE_LOG")))
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_LOG"
"""
GRES_REFUSAL = (
    "sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification"
)


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "sbatch": FAKE_SBATCH}
    for name, body in {**fakes, "scancel": FAKE_SCANCEL}.items():
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
    export_log = tmp_path / "runs" / "chain" / "slurm" / f"export-{int(job) + 1}.out"
    assert f"log {export_log}" in done.stdout  # where the export job will write its log
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


def rendered(tmp_path, capsys, *extra: str) -> str:
    """Render the job script in this process (`--dry-run`); returns its text's path."""
    argv = [TINY, "--nodes", "1", f"run.output_dir={tmp_path / 'runs'}", *extra, "--dry-run"]
    assert submit_main(argv) == 0
    return shlex.split(capsys.readouterr().out.split("[kiln] ", 1)[1])[-1]


def stale_marker(run_dir) -> None:
    """PREEMPTED as the same job's previous run left it (restart 0; this is restart 1)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PREEMPTED).write_text(json.dumps({"step": 1, "launch": "4242.0"}))


def test_a_marker_left_by_an_earlier_launch_never_requeues(tmp_path, fake_slurm, capsys):
    script = rendered(tmp_path, capsys, "run.name=stale")
    stale_marker(tmp_path / "runs" / "stale")
    env = {**fake_slurm, "SLURM_RESTART_COUNT": "1", "SRUN_FAILS": "1"}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr  # srun's failure, not requeued
    assert "is from launch 4242.0, not 4242.1" in done.stdout
    assert not any(isinstance(c, str) and "requeue" in c for c in calls(fake_slurm))


@pytest.mark.slow
def test_a_launch_that_fails_before_training_removes_the_marker_and_is_not_requeued(
    tmp_path, fake_slurm, capsys
):
    """The real launcher, one node, one process: a setup failure (a checkpoint that is not
    there) after an earlier launch stopped early and left PREEMPTED."""
    overrides = ["run.name=stale", "checkpoint.resume=/nonexistent", "metrics.wandb=false"]
    script = rendered(tmp_path, capsys, *overrides, f"data.builtin.dir={tmp_path / 'corpus'}")
    run_dir = tmp_path / "runs" / "stale"
    stale_marker(run_dir)
    env = {**fake_slurm, "SLURM_RESTART_COUNT": "1", "SLURM_NNODES": "1", "SRUN_RUNS": "1"}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert "kiln: error:" in log and "/nonexistent" in log
    assert not (run_dir / PREEMPTED).exists()
    assert not any(isinstance(c, str) and "requeue" in c for c in calls(fake_slurm))


def test_the_grace_time_is_one_value_for_slurm_the_agent_and_the_job(tmp_path, capsys, monkeypatch):
    with open(rendered(tmp_path, capsys, "run.name=g", "checkpoint.grace=120")) as f:
        assert "#SBATCH --signal=B:USR1@120\n" in f.read()
    with open(rendered(tmp_path, capsys, "run.name=g", "--grace", "60")) as f:
        text = f.read()
    assert "#SBATCH --signal=B:USR1@60\n" in text and "checkpoint.grace=60" in text
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    # the agent waits the grace time less a margin for its own exit and the requeue
    assert launch_env(grace=300)["PET_SHUTDOWN_TIMEOUT"] == "270"
    assert launch_env(grace=60)["PET_SHUTDOWN_TIMEOUT"] == "30"


def test_a_gpu_request_on_a_cluster_without_gpus_is_one_line_and_leaves_nothing(
    tmp_path, fake_slurm
):
    env = {**fake_slurm, "SBATCH_REFUSES": GRES_REFUSAL}
    done = submit(tmp_path, env, "run.name=gpu", "--gpus-per-node", "1", "--then", "export")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--gpus-per-node 1" in done.stderr
    assert "--gpus-per-node 0 --nproc-per-node N" in done.stderr
    assert not (tmp_path / "runs").exists()  # no script, no run directory left behind


def test_a_refused_export_job_cancels_the_training_job_it_was_chained_to(tmp_path, fake_slurm):
    (tmp_path / "runs" / "keep").mkdir(parents=True)  # made by the user: stays
    env = {**fake_slurm, "SBATCH_REFUSES": "sbatch: error: QOSMaxSubmitJobPerUserLimit"}
    env["SBATCH_REFUSES_FROM"] = "2"  # the first sbatch (training) succeeds
    done = submit(tmp_path, env, "run.name=chain", "--then", "export")
    assert done.returncode == 1
    assert "QOSMaxSubmitJobPerUserLimit" in done.stderr and "cancelled again" in done.stderr
    assert "scancel 4001" in calls(fake_slurm)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["keep"]


@pytest.mark.parametrize(
    ("time_limit", "grace", "accepted"),
    [("2", None, False), ("2", "30", True), ("1", "30", False), ("1-0", None, True)],
)
def test_a_grace_that_leaves_no_time_to_train_is_refused(
    tmp_path, fake_slurm, time_limit, grace, accepted
):
    """Slurm signals `grace` seconds before the limit: with --time 2 (120 s) and the default
    300 s it would signal during start-up, the job would save nothing and not requeue."""
    extra = ["--time", time_limit, *(["--grace", grace] if grace else [])]
    done = submit(tmp_path, fake_slurm, "run.name=t", *extra)
    if accepted:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2 and not os.path.exists(fake_slurm["FAKE_LOG"])
    assert f"--time {time_limit}" in done.stderr and "--grace" in done.stderr
    if grace is None:  # the config's value: named as such
        assert "--grace (checkpoint.grace = 300)" in done.stderr
    assert ("--grace 30 or less" if time_limit == "2" else "a longer --time") in done.stderr


def test_the_batch_script_says_in_one_line_how_the_job_ended(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    requeue, line = summary(run_dir, "17.0", 0)
    assert (requeue, line) == (
        False,
        "[kiln] job 17 ended (exit status 0): the run finished; not requeued",
    )
    requeue, line = summary(run_dir, "17.2", 1)
    assert not requeue and "failed before saving a stop checkpoint" in line
    marker = {"launch": "17.2", "step": 397, "reason": "signal SIGUSR1", "seconds_to_save": 3.14}
    (run_dir / PREEMPTED).write_text(json.dumps(marker))
    requeue, line = summary(run_dir, "17.2", 0)
    assert requeue and line == (
        "[kiln] stopped at step 397 by signal SIGUSR1, checkpoint saved in 3.1 s: "
        "requeueing job 17 as restart 3"
    )
    requeue, line = summary(run_dir, "17.3", 0)
    assert not requeue and "is from launch 17.2, not 17.3" in line
    # scancel: the stop saved a checkpoint, but the user meant it: no requeue
    requeue, line = summary(run_dir, "17.2", 0, "COMPLETING")
    assert not requeue and "not requeued, submit it again to resume" in line
    assert summary(run_dir, "17.2", 0, "RUNNING")[0]

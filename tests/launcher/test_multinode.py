"""Two hosts for real (network namespaces joined by veth): without Slurm, and as a two-node
Slurm cluster that runs, preempts and requeues the rendered sbatch script."""

from __future__ import annotations

import re
import sys

import pytest

from .cluster import netns_pair, pids_in_netns, slurm_cluster
from .runs import QUIET, TINY, cmdline, env, losses, metrics, run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
LONG_STEPS = 40  # USR1 at step 10 leaves 30 steps of margin before the end
LONG = [
    f"train.max_steps={LONG_STEPS}",
    "checkpoint.every=1000",
    "train.global_batch_size=16",
]


def common(root, name: str, *extra: str, quiet=QUIET) -> list[str]:
    return [
        f"run.output_dir={root}",
        f"run.name={name}",
        f"data.builtin.dir={root / 'corpus'}",
        *quiet,
        *extra,
    ]


# What a user gets: wandb at its default (offline here: no API key), the progress display on
# (a plain line every log_every steps in a Slurm log); metrics every step, for the losses.
DEFAULTS = ("metrics.log_every=1", "eval.every=null")


def test_two_hosts_without_slurm_train_as_one_world_of_two(tmp_path):
    run(tmp_path, "onehost", "train.max_steps=8")  # 2 processes on one host: the reference
    plain = {
        k: v for k, v in env().items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    }
    with netns_pair() as net:
        main_addr = net.hosts[0][1]
        procs = []
        for rank, (ns, _, _) in enumerate(net.hosts):
            argv = [
                sys.executable,
                "-m",
                "launcher",
                "pretrain",
                TINY,
                "--nodes",
                "2",
                "--nproc",
                "1",
                "--node-rank",
                str(rank),
                "--main-addr",
                main_addr,
                "--main-port",
                "29877",
                *common(tmp_path, "twohosts", "train.max_steps=8"),
            ]
            log = open(tmp_path / f"host{rank}.log", "w")  # noqa: SIM115
            procs.append(net.run_in(ns, argv, cwd=tmp_path, env=plain, stdout=log, stderr=log))
        codes = [p.wait(timeout=300) for p in procs]
    logs = "\n".join((tmp_path / f"host{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    assert "GLOO_SOCKET_IFNAME=" in logs  # found by the launcher, named by nobody
    lines = metrics(tmp_path, "twohosts")
    assert {m["dist/world_size"] for m in lines} == {2.0}
    reference = losses(tmp_path, "onehost")
    assert losses(tmp_path, "twohosts") == pytest.approx(reference, rel=1e-6)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    with slurm_cluster(root) as c:
        yield c, root


def submit_command(root, name: str, *extra: str, grace: str = "60") -> list[str]:
    return [
        sys.executable,
        "-m",
        "launcher",
        "slurm",
        "submit",
        TINY,
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--nproc-per-node",
        "1",
        *(["--grace", grace] if grace else []),
        *common(root, name, *extra, quiet=DEFAULTS),
    ]


def submit(cluster, root, name: str, *extra: str, grace: str = "60") -> list[int]:
    c, _ = cluster
    wandb_default = {k: v for k, v in env().items() if k != "WANDB_MODE"}
    wandb_default["WANDB_DIR"] = str(root)  # wandb's own cache, not the user's
    argv = submit_command(root, name, *extra, grace=grace)
    done = c.run_in_controller(argv, env=wandb_default, cwd=str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    return [int(job) for job in re.findall(r"submitted job (\d+)", done.stdout)]


def left_behind(c) -> list[str]:
    """kiln's processes still alive on either node (the Slurm daemons excepted)."""
    pids = [p for ns in c.nodes for p in pids_in_netns(ns)]
    return [cmdline(p) for p in pids if "launcher" in cmdline(p)]


def slurm_log(root, name: str, job: int, kind: str = "pretrain") -> str:
    return (root / name / "slurm" / f"{kind}-{job}.out").read_text()


def test_a_two_node_slurm_job_trains_with_world_size_two(cluster):
    c, root = cluster
    job, export = submit(cluster, root, "slurm2", "train.max_steps=12", "--then", "export")
    info = c.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    log = slurm_log(root, "slurm2", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    lines = metrics(root, "slurm2")
    assert {m["dist/world_size"] for m in lines} == {2.0}
    assert max(losses(root, "slurm2")) == 12
    assert list((root / "slurm2" / "wandb").glob("offline-run-*"))  # wandb ran, offline
    # progress a person can read in a log file: plain lines, no bar frozen at 0%
    assert re.search(r"\[kiln\] step 12/12 \(100%\), loss [0-9.]+, .*tok/s", log), log[-4000:]
    assert "0%|" not in log and "0step" not in log
    assert f"[kiln] job {job} ended (exit status 0): the run finished; not requeued" in log
    # the chained export ran after it (afterok) and wrote a loadable HF directory
    assert c.wait(export, timeout=300)["JobState"] == "COMPLETED"
    assert (root / "slurm2" / "hf-export" / "model.safetensors").is_file()
    assert (root / "slurm2" / "slurm" / f"export-{export}.out").is_file()
    assert not left_behind(c)


def test_usr1_preempts_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(cluster):
    c, root = cluster
    run(root, "straight", *LONG)  # the same run on one host, never interrupted
    [job] = submit(cluster, root, "preempt", *LONG)
    wait_for(lambda: max(losses(root, "preempt"), default=0) >= 10, timeout=300)
    c.scancel("--signal=USR1", "--batch", str(job))
    info = c.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=900, restarts=1)
    log = slurm_log(root, "preempt", job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log[-4000:]
    assert info["ExitCode"] == "0:0", log[-4000:]
    # a preemption that saved reads as one: one summary line, no task failed or cancelled
    summary = re.search(
        r"\[kiln\] stopped at step (\d+) by signal SIGUSR1, checkpoint saved in ([0-9.]+) s: "
        rf"requeueing job {job} as restart 1\n",
        log,
    )
    assert summary, log[-4000:]
    assert 10 <= int(summary.group(1)) < LONG_STEPS and float(summary.group(2)) < 30
    # Slurm's own line for the requeue ("*** JOB 3 ON kilnA CANCELLED AT ... DUE TO JOB
    # REQUEUE ***") is the only one of its kind; no task failed, no step was cancelled.
    others = "\n".join(line for line in log.splitlines() if "DUE TO JOB REQUEUE" not in line)
    for alarm in ("error:", "CANCELLED", "Terminated", "Traceback", "closing signal"):
        assert alarm not in others, log[-4000:]
    assert log.count(f"[kiln] step {LONG_STEPS}/{LONG_STEPS}") == 1  # one last progress line
    final = losses(root, "preempt")
    assert max(final) == LONG_STEPS
    # "straight" ran on one host (DeepSpeed's shared-memory all-reduce), "preempt" over gloo
    # between hosts: another summation order, 2e-7 apart from step 2 on, 2.5e-6 by step 60 on
    # a quiet machine, 7.5e-5 once under heavy load (cause not pinned down: the same test alone
    # passed at 2e-5). A preemption bug (a lost or repeated batch, a
    # wrong moment) moves the loss by >1e-3.
    last = LONG_STEPS
    assert final[last] == pytest.approx(losses(root, "straight")[last], abs=2e-4)
    checkpoints = [p.name for p in (root / "preempt" / "checkpoints").glob("step-*")]
    assert checkpoints and not (root / "preempt" / "PREEMPTED").exists()
    assert not left_behind(c)


def test_the_time_limit_stops_saves_and_requeues_when_the_grace_leaves_time_to_train(cluster):
    c, root = cluster
    # the default grace (300 s) with a 2-minute limit would be signalled during start-up
    argv = submit_command(root, "limit", "--time", "2", grace="")
    done = c.run_in_controller(argv, env=env(), cwd=str(root))
    assert done.returncode == 2 and "--grace 30 or less" in done.stderr, done.stderr
    assert not (root / "limit").exists()
    # Slurm signals 30 s (plus its 30 s timer) before the limit; the job saves and requeues.
    [job] = submit(cluster, root, "limit", "train.max_steps=100000", "--time", "2", grace="30")
    c.wait(job, {"RUNNING", "PENDING"}, timeout=600, restarts=1)
    log = slurm_log(root, "limit", job)
    summary = re.search(r"stopped at step (\d+) by signal SIGUSR1, checkpoint saved", log)
    assert summary and "requeueing job" in log and "TIME LIMIT" not in log, log[-4000:]
    stopped = int(summary.group(1))
    assert (root / "limit" / "checkpoints" / f"step-{stopped:08d}" / "manifest.json").exists()
    # the requeued job resumes from that step
    resumed = f": step {stopped} (saved by 2 ranks"
    wait_for(lambda: resumed in slurm_log(root, "limit", job).split("restart 1 on")[-1], 300)
    # scancel: the run still saves its step (SIGTERM), but a cancelled job stays cancelled
    c.scancel(str(job))
    wait_for(lambda: "not requeued, submit it again" in slurm_log(root, "limit", job), 120)
    info = c.wait(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1"
    wait_for(lambda: not left_behind(c), timeout=60)


def test_a_gpu_request_on_a_cpu_cluster_is_one_line_and_leaves_nothing(cluster):
    c, root = cluster
    argv = submit_command(root, "gpus", "train.max_steps=12")
    argv[argv.index("--gpus-per-node") + 1] = "1"  # this cluster has no GPU GRES
    done = c.run_in_controller(argv, env=env(), cwd=str(root))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "--gpus-per-node 0 --nproc-per-node N" in done.stderr and "gres" in done.stderr
    assert not (root / "gpus").exists()

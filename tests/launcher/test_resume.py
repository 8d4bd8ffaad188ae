"""Resume for real: 2 ranks over gloo, stopped, crashed, corrupted, signalled, resized."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .runs import (
    alive,
    descendants,
    losses,
    metrics,
    rank_pids,
    run,
    start,
    wait_for,
    world_sizes,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ZERO3 = ["dist.zero_stage=3", "train.max_steps=20", "checkpoint.every=10"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def full(root):
    """20 uninterrupted steps, ZeRO-3, 2 ranks, one DataLoader worker each."""
    run(root, "full", *ZERO3)
    assert world_sizes(root, "full") == {2.0}
    return losses(root, "full")


def weights_and_moments(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("model-*.safetensors")) + sorted(
        folder.glob("optimizer-*.safetensors")
    ):
        out.update(load_file(str(path)))
    return out


def test_resume_after_a_stop_gives_losses_identical_to_an_uninterrupted_run(root, full):
    run(root, "half", *ZERO3, "train.stop_after=10")
    assert max(losses(root, "half")) == 10
    assert (root / "half" / "PREEMPTED").exists()
    run(root, "half", *ZERO3)
    resumed = losses(root, "half")
    assert world_sizes(root, "half") == {2.0}
    assert sorted(resumed) == list(range(1, 21)) == sorted(full)
    assert max(abs(resumed[s] - full[s]) for s in full) == 0.0
    assert not (root / "half" / "PREEMPTED").exists()


@pytest.mark.parametrize(("nproc", "stage"), [(1, 2), (2, 2)])
def test_a_zero3_checkpoint_loads_exactly_on_another_world_size_and_stage(root, full, nproc, stage):
    source = root / "full" / "checkpoints" / "step-00000010"
    name = f"elastic-{nproc}x{stage}"
    # Resuming at the horizon trains nothing and saves what it loaded: compare with the source.
    run(
        root,
        name,
        f"dist.zero_stage={stage}",
        "train.max_steps=10",
        f"checkpoint.resume={source}",
        nproc=nproc,
    )
    saved, loaded = (
        weights_and_moments(source),
        weights_and_moments(root / name / "checkpoints" / "step-00000010"),
    )
    assert saved.keys() == loaded.keys() and len(saved) > 30
    assert max((saved[k] - loaded[k]).abs().max().item() for k in saved) == 0.0
    # ...and training goes on from there with the schedule at step 11.
    shutil.rmtree(root / name)
    run(
        root,
        name,
        f"dist.zero_stage={stage}",
        "train.max_steps=20",
        f"checkpoint.resume={source}",
        nproc=nproc,
    )
    lines = [m for m in metrics(root, name) if "train/loss" in m]
    assert world_sizes(root, name) == {float(nproc)}
    assert [m["step"] for m in lines] == list(range(11, 21))
    reference = {m["step"]: m["train/lr"] for m in metrics(root, "full") if "train/lr" in m}
    assert lines[0]["train/lr"] == pytest.approx(reference[11], rel=1e-9)


def test_a_corrupted_newest_checkpoint_is_refused_and_auto_uses_the_previous(root, full):
    shutil.copytree(root / "full", root / "corrupt")
    (root / "corrupt" / "metrics.jsonl").unlink()
    shard = next((root / "corrupt" / "checkpoints" / "step-00000020").glob("model-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = run(root, "corrupt", *ZERO3, "train.max_steps=20")
    log = done.stdout + done.stderr
    assert f"{shard.name}: SHA-256 differs" in log
    assert "resumed from" in log and "step-00000010" in log
    assert losses(root, "corrupt") == {s: full[s] for s in range(11, 21)}


@pytest.mark.parametrize("moment", range(4))  # every target step, both keep_last values
def test_kill_9_of_one_rank_during_a_save_leaves_a_checkpoint_auto_resumes_from(root, moment):
    rng = random.Random(moment)
    name = f"kill-{moment}"
    keep = "1" if moment % 2 else "2"
    args = ["train.max_steps=30", "checkpoint.every=4", f"checkpoint.keep_last={keep}"]
    # PET_SHUTDOWN_TIMEOUT: the surviving rank is stuck in a collective; don't wait 2 minutes
    proc = start(root, name, *args, KILN_CHECKPOINT_DELAY="1.5", PET_SHUTDOWN_TIMEOUT="5")
    ckpts = root / name / "checkpoints"
    target = 4 * (2 + moment % 3)  # kill during the save at step 8, 12 or 16

    def saving() -> bool:
        return any(int(p.name[5:13]) >= target for p in ckpts.glob("step-*.tmp"))

    wait_for(saving)
    time.sleep(rng.uniform(0.0, 1.4))  # somewhere inside the save
    victims = rank_pids(proc.pid)
    assert len(victims) == 2
    os.kill(rng.choice(victims), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # a rank that died is a failed launch
    complete = sorted(p.name for p in ckpts.glob("step-????????"))
    assert complete, "no complete checkpoint was left"
    done = run(root, name, *args)
    resumed = re.search(r"resumed from (\S+): step (\d+)", done.stdout + done.stderr)
    assert resumed and Path(resumed.group(1)).name == complete[-1]  # the newest complete one
    assert max(losses(root, name)) == 30
    assert world_sizes(root, name) == {2.0}


SIGNALLED_STEPS = 40  # a signal at step 10 leaves 30 steps of margin before the end
SIGNALLED = [
    f"train.max_steps={SIGNALLED_STEPS}",
    "checkpoint.every=1000",
    "train.global_batch_size=16",  # 2 micro-batches per step and rank
]


def signal_run(root, name, target: str, delay: str = "0"):
    """Start a 40-step run, signal it at step >= 10, wait for it to exit cleanly."""
    args = SIGNALLED
    proc = start(root, name, *args, KILN_CHECKPOINT_DELAY=delay)
    wait_for(lambda: max(losses(root, name), default=0) >= 10)
    everyone = [proc.pid, *descendants(proc.pid)]
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2
    targets = {"launcher": [proc.pid], "one rank": ranks[1:], "all ranks": ranks}[target]
    for pid in targets:
        os.kill(pid, signal.SIGUSR1)
    # a stop that saved is a clean end: exit 0, and no agent traceback or warning saying so
    assert proc.wait(timeout=300) == 0, (root / f"{name}.log").read_text()[-3000:]
    assert not alive(everyone), "processes left behind"
    log = (root / f"{name}.log").read_text()
    assert "Traceback" not in log and "death signal" not in log and "closing signal" not in log
    return args


@pytest.fixture(scope="module")
def uninterrupted(root):
    run(root, "straight", *SIGNALLED)
    return losses(root, "straight")


@pytest.mark.parametrize(
    ("target", "delay"),
    [("launcher", "0"), ("one rank", "0"), ("all ranks", "0"), ("launcher", "35")],
)
def test_sigusr1_checkpoints_marks_preempted_and_resume_finishes_identically(
    root, uninterrupted, target, delay
):
    name = f"sig-{target.replace(' ', '-')}-{delay}"
    args = signal_run(root, name, target, delay)
    marker = root / name / "PREEMPTED"
    assert marker.exists()
    stopped = max(losses(root, name))
    assert 10 <= stopped < SIGNALLED_STEPS
    assert (root / name / "checkpoints" / f"step-{stopped:08d}" / "manifest.json").exists()
    run(root, name, *args)
    assert not marker.exists()
    final, last = losses(root, name), SIGNALLED_STEPS
    assert max(final) == last and final[last] == uninterrupted[last]
    assert world_sizes(root, name) == {2.0}


def test_sigterm_while_the_readers_are_stalled_saves_the_last_step_within_seconds(root):
    """Every DataLoader worker stopped (SIGSTOP: readers that never yield again), the ranks
    wait for a batch; a SIGTERM to the launcher still gives a checkpoint of the last completed
    step at once (not after the grace time), whose data state leaves out the batches taken
    for the step that never ran. (Resuming from such a state: test_preemption.py.)"""
    name = "stalled"
    proc = start(root, name, *SIGNALLED)
    wait_for(lambda: max(losses(root, name), default=0) >= 3)
    everyone = [proc.pid, *descendants(proc.pid)]
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2
    workers = [pid for rank in ranks for pid in descendants(rank)]
    assert len(workers) == 2  # one per rank
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    seen = {"step": -1, "since": time.monotonic()}

    def stalled() -> bool:  # no new step for 3 s: the prefetched batches are used up
        step = max(losses(root, name))
        if step != seen["step"]:
            seen.update(step=step, since=time.monotonic())
        return time.monotonic() - seen["since"] > 3

    wait_for(stalled, timeout=120)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert time.monotonic() - sent < 60
    assert not alive(everyone), "processes left behind"
    marker = json.loads((root / name / "PREEMPTED").read_text())
    stopped = max(losses(root, name))
    assert marker["step"] == stopped and marker["reason"] == "signal SIGTERM"
    assert marker["seconds_to_save"] < 30
    folder = root / name / "checkpoints" / f"step-{stopped:08d}"
    assert (folder / "manifest.json").exists()
    for rank in range(2):
        data = json.loads((folder / f"rank-{rank:05d}.json").read_text())["task"]["data"]
        assert data["batches"] == 2 * stopped  # 2 micro-batches per step, none of the next
    assert world_sizes(root, name) == {2.0}

"""A stop signal at any moment of a run leads to one checkpoint of the last completed step and
PREEMPTED, within the grace time; relaunched, the run ends exactly like one never stopped.

In-process (one rank, the real stage function), the signal sent by a hook at a chosen moment:
set-up, a step, the wait for data, an evaluation, a save, the export. Dropout is on, so the
RNG must resume exactly too. (Two ranks, a stalled reader and the launchers' forwarding:
test_resume.py.)
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from launcher import persist
from launcher.config import CONFIG_ROOT, load_config
from launcher.data.loader import StreamLoader
from launcher.rundir import PREEMPTED
from pretrain.config import PretrainConfig
from pretrain.task import PretrainTask
from pretrain.train import pretrain

from .runs import losses

pytestmark = pytest.mark.slow
STEPS = 6


def config(root, name: str, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        CONFIG_ROOT / "pretrain" / "tiny.yaml",
        [
            f"run.output_dir={root}",
            f"run.name={name}",
            f"data.builtin.dir={root / 'corpus'}",
            "data.num_workers=0",
            "model.dropout=0.1",  # the RNG matters: resume must restore it exactly
            f"train.max_steps={STEPS}",
            "schedule.warmup_steps=2",
            "eval.every=2",
            "eval.max_batches=2",
            "checkpoint.every=4",
            "metrics.wandb=false",
            "metrics.progress_bar=false",
            "metrics.log_every=1",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: one thread per process is stable and faster
    yield tmp_path_factory.mktemp("preempt")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(root):
    # DeepSpeed's first engine in a process draws from the global RNG, later ones do not:
    # one short run first, so that every run compared here starts alike.
    pretrain(config(root, "warm-up", "train.max_steps=2", "schedule.warmup_steps=1"))
    pretrain(config(root, "reference"))
    out = losses(root, "reference")
    assert sorted(out) == list(range(1, STEPS + 1))
    return out


@pytest.fixture
def unhandled():
    """Catch a SIGUSR1 that the run did not handle (its default would end pytest)."""
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGUSR1, previous)


def signal_on_call(monkeypatch, owner, name: str, call: int) -> list[int]:
    """Send this process SIGUSR1 inside the ``call``-th call of ``owner.name``."""
    calls = [0]
    real = getattr(owner, name)

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, hooked)
    return calls


def signal_in_data_wait(monkeypatch, batch: int) -> None:
    """SIGUSR1 while the loop waits for micro-batch ``batch`` (the second of a step's two)."""
    real = StreamLoader.__iter__

    def waiting(self):
        for n, item in enumerate(real(self), 1):
            if n == batch:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield item

    monkeypatch.setattr(StreamLoader, "__iter__", waiting)


# moment -> (how to send the signal, the step whose checkpoint the stop leaves)
MOMENTS = {
    "setup": (lambda mp: signal_on_call(mp, PretrainTask, "build_model", 1), 0),
    "step": (lambda mp: signal_on_call(mp, PretrainTask, "loss", 5), 3),  # step 3, 1st micro
    "data wait": (lambda mp: signal_in_data_wait(mp, 6), 2),  # step 3's 2nd micro-batch
    "eval": (lambda mp: signal_on_call(mp, PretrainTask, "evaluate", 1), 2),
    "save": (lambda mp: signal_on_call(mp, PretrainTask, "state_dict", 1), 4),
    "export": (lambda mp: signal_on_call(mp, PretrainTask, "export", 1), STEPS),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_signal_at_any_moment_saves_once_marks_and_resumes_identically(
    root, reference, unhandled, monkeypatch, moment
):
    hook, step = MOMENTS[moment]
    name = f"usr1-{moment.replace(' ', '-')}"
    saves = signal_on_call(monkeypatch, persist, "save", 0)  # counts, never signals
    evals = signal_on_call(monkeypatch, PretrainTask, "evaluate", 0)
    with monkeypatch.context() as mp:
        hook(mp)
        pretrain(config(root, name))
    assert unhandled == [], "SIGUSR1 reached the default handler: the run did not catch it"
    run_dir = root / name
    marker = json.loads((run_dir / PREEMPTED).read_text())
    assert marker["step"] == step and marker["reason"] == "signal SIGUSR1"
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert 0 <= marker["seconds_to_save"] < 30
    saved_steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved_steps[-1] == f"step-{step:08d}"  # nothing trained past the stop
    # One save per signal: the stop's, or the periodic/final one it came during, not both.
    assert saves[0] == len([s for s in (4, STEPS) if s <= step]) + (step not in (4, STEPS))
    assert evals[0] == step // 2  # eval.every=2: none started after the signal
    assert not (run_dir / "hf").exists()  # no export after a stop
    assert max(losses(root, name), default=0) == step

    saves[0] = 0
    pretrain(config(root, name))  # the requeued job
    assert not (run_dir / PREEMPTED).exists()
    assert saves[0] == len([s for s in (4, STEPS) if s > step])  # not the step it resumed at
    assert losses(root, name) == reference
    assert (run_dir / "hf" / "model.safetensors").is_file()

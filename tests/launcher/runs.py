"""Starting real multi-process runs (`python -m launcher pretrain ... --nproc N`) from tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher.config import CONFIG_ROOT

TINY = str(CONFIG_ROOT / "pretrain" / "tiny.yaml")
QUIET = [
    "metrics.wandb=false",
    "metrics.progress_bar=false",
    "metrics.log_every=1",
    "eval.every=null",
]


def command(
    root: Path, name: str, *overrides: str, nproc: int = 2, recipe: str = TINY
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launcher",
        "pretrain",
        recipe,
        "--nproc",
        str(nproc),
        f"run.output_dir={root}",
        f"run.name={name}",
        f"data.builtin.dir={root / 'corpus'}",
        *QUIET,
        *overrides,
    ]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", **extra}


def run(
    root: Path,
    name: str,
    *overrides: str,
    nproc: int = 2,
    check: bool = True,
    recipe: str = TINY,
    **extra_env,
):
    done = subprocess.run(
        command(root, name, *overrides, nproc=nproc, recipe=recipe),
        cwd=root,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def start(root: Path, name: str, *overrides: str, nproc: int = 2, **extra_env) -> subprocess.Popen:
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        command(root, name, *overrides, nproc=nproc),
        cwd=root,
        env=env(**extra_env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def metrics(root: Path, name: str) -> list[dict]:
    path = root / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def world_sizes(root: Path, name: str) -> set[float]:
    """Every world size the run's metrics report (a multi-process test asserts it)."""
    return {m["dist/world_size"] for m in metrics(root, name)}


def losses(root: Path, name: str) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(root, name) if "train/loss" in m}


def wait_for(predicate, timeout: float = 180, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pids(launcher_pid: int) -> list[int]:
    """The training ranks: the processes whose parent is the elastic agent (DataLoader workers
    are one level further down)."""
    agent = [p for p in descendants(launcher_pid) if "launcher.agent" in cmdline(p)]
    if not agent:
        return []
    return [p for p in descendants(agent[0]) if _parent(p) == agent[0]]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two(*target: str, timeout: float = 600) -> None:
    """Run ``target`` (a script and its arguments, or "-m", a module, ...) as 2 processes under
    torchrun on a free port: one thread each, wandb off, the repository importable. Fails
    the test, with the output's tail, unless it exits 0."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(CONFIG_ROOT.parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    done = subprocess.run(
        [*command, f"--master-port={free_port()}", *target],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

"""Turning `kiln STAGE CONFIG --nproc N` into the `accelerate launch` command that runs it.

Inside a launched worker (WORLD_SIZE is set) the stage runs in-process; the world it is part
of becomes the config's dist.num_processes / dist.num_nodes, so the config is validated (and
batch sizes checked) against the world that really exists.
"""

from __future__ import annotations

import os
import shlex
import sys

from launcher.config import CONFIG_ROOT


def in_worker() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate, srun...)."""
    return "WORLD_SIZE" in os.environ


def world_overrides() -> list[str]:
    """dist.* overrides describing the world this worker belongs to."""
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return [f"dist.num_processes={local}", f"dist.num_nodes={max(1, world // local)}"]


def accelerate_command(
    stage: str,
    config: str,
    overrides: list[str],
    *,
    nproc: int,
    nodes: int,
    zero_stage: int,
    offload: bool = False,
) -> list[str]:
    """The `accelerate launch` command running ``stage`` on ``nproc`` processes per node."""
    name = f"zero{zero_stage}" + ("-offload" if offload and zero_stage else "")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG_ROOT / "accelerate" / f"{name}.yaml"),
        "--deepspeed_config_file",
        str(CONFIG_ROOT / "deepspeed" / f"{name}.json"),
        "--num_processes",
        str(nproc * nodes),
        "--num_machines",
        str(nodes),
        "-m",
        "launcher",
        stage,
        config,
        *overrides,
    ]


def launch_env() -> dict[str, str]:
    """The launcher's environment: the elastic agent must forward SIGUSR1 to the workers
    (by default it dies of it and orphans them; ../shared/NOTES.md)."""
    env = dict(os.environ)
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGUSR1")
    env.setdefault("PET_SHUTDOWN_TIMEOUT", "120")  # time for the checkpoint after a signal
    return env


def render(command: list[str]) -> str:
    return shlex.join(command)

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


def node_rank_from_env() -> int:
    """This node's rank: NODE_RANK, or Slurm's SLURM_NODEID (one task per node), else 0."""
    for var in ("NODE_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def accelerate_command(
    stage: str,
    config: str,
    overrides: list[str],
    *,
    nproc: int,
    nodes: int,
    zero_stage: int,
    offload: bool = False,
    node_rank: int = 0,
    main_addr: str | None = None,
    main_port: int | None = None,
) -> list[str]:
    """The `accelerate launch` command running ``stage`` on ``nproc`` processes per node.

    ``main_port``: every node must name the same one (29500 unless given); on one node an
    unset port is 0, a free one accelerate picks, so two runs started together on one
    machine never meet on 29500 (accelerate's own fallback checks the port, then binds it
    later: a race).

    Raises ``ValueError`` when several nodes are asked for without the main node's address.
    """
    name = f"zero{zero_stage}" + ("-offload" if offload and zero_stage else "")
    # accelerate's launcher, ending quietly (exit 128 + signal) after a stop signal
    command = [sys.executable, "-m", "launcher.agent"]
    command += ["--config_file", str(CONFIG_ROOT / "accelerate" / f"{name}.yaml")]
    command += ["--deepspeed_config_file", str(CONFIG_ROOT / "deepspeed" / f"{name}.json")]
    command += ["--num_processes", str(nproc * nodes), "--num_machines", str(nodes)]
    if nodes > 1:
        if not main_addr:
            raise ValueError("several nodes need the main node's address: --main-addr HOST")
        # "standard" = torchrun on every node (the default, pdsh, would ssh from node 0)
        command += ["--deepspeed_multinode_launcher", "standard"]
        command += ["--machine_rank", str(node_rank), "--main_process_ip", main_addr]
        command += ["--main_process_port", str(main_port or 29500)]
    else:
        command += ["--main_process_port", str(main_port or 0)]
    return [*command, "-m", "launcher", stage, config, *overrides]


def launch_env(
    extra: dict[str, str] | None = None,
    *,
    nproc: int | None = None,
    grace: float | None = None,
) -> dict[str, str]:
    """The launcher's environment: the elastic agent must forward SIGUSR1 to the workers
    (by default it dies of it and orphans them; ../shared/NOTES.md) and then give them the
    grace time (``checkpoint.grace``) to save, less a margin. With ``nproc``, the node's
    cores are shared among its ``nproc`` workers (OMP_NUM_THREADS)."""
    env = {**os.environ, **(extra or {})}
    if nproc:
        # unset, torchrun prints a banner and gives every worker 1 thread
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        env.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // nproc)))
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGUSR1")
    env.setdefault("PET_SHUTDOWN_TIMEOUT", str(shutdown_timeout(grace or DEFAULT_GRACE)))
    return env


DEFAULT_GRACE = 300.0
"""Seconds from a stop signal to the kill when the config does not say (checkpoint.grace)."""


def shutdown_timeout(grace: float) -> int:
    """Seconds the elastic agent waits for the workers after forwarding a stop signal before
    it kills them: the grace time less a margin (up to 30 s) for the agent's own exit and the
    batch script's requeue, which must happen before the scheduler's kill."""
    return max(1, int(grace - min(30.0, grace / 2)))


def render(command: list[str]) -> str:
    return shlex.join(command)

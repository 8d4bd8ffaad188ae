"""`python -m launcher STAGE CONFIG [key=value ...]` (also installed as `kiln`).

Parse, validate the whole config before anything starts, then run the stage here, or, for
several processes, print and run the `accelerate launch` command whose workers come back
here. Bad input is one message (exit 2 for a bad config, 1 for bad data), not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from launcher.config import ConfigError, dump_config, load_config
from launcher.errors import UserError
from launcher.launch import (
    accelerate_command,
    in_worker,
    launch_env,
    node_rank_from_env,
    render,
    world_overrides,
)
from launcher.network import socket_env
from launcher.stages import find_stage, stage_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Run a stage of kiln on a YAML config with dotted overrides.",
        epilog=f"stages: {', '.join(stage_names())}.  "
        "Example: kiln pretrain configs/pretrain/demo.yaml --nproc 2 optim.lr=1e-3",
    )
    parser.add_argument("stage", help="what to run: " + ", ".join(stage_names()))
    parser.add_argument("config", help="YAML run config (may `extends:` others)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--nproc", type=int, help="processes per node (sets dist.num_processes)")
    parser.add_argument("--nodes", type=int, help="number of nodes (sets dist.num_nodes)")
    parser.add_argument(
        "--node-rank", type=int, help="this node's rank (default: NODE_RANK or SLURM_NODEID)"
    )
    parser.add_argument("--main-addr", help="address of node 0 (default: MASTER_ADDR)")
    parser.add_argument(
        "--main-port", type=int, help="port on node 0 (default: MASTER_PORT or 29500)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser


def export_main(argv: list[str]) -> int:
    """`kiln export CHECKPOINT --out DIR [--dtype bf16|fp32]`."""
    import torch

    from launcher.checkpoint import read_manifest

    parser = argparse.ArgumentParser(prog="kiln export", description=export_main.__doc__)
    parser.add_argument(
        "checkpoint",
        help="a checkpoint (runs/<name>/checkpoints/step-N), or a run or its "
        "checkpoints folder for the newest one",
    )
    parser.add_argument("--out", required=True, help="the HF model directory to write")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    _configure_logging()
    folder = Path(args.checkpoint)
    for pointer in (folder / "latest", folder / "checkpoints" / "latest"):
        if pointer.is_file():  # a run or its checkpoints folder: the newest checkpoint
            folder = pointer.parent / pointer.read_text().strip()
            break
    try:
        stage = find_stage(read_manifest(folder)["meta"].get("stage", "pretrain"))
        if stage.export is None:
            raise UserError(f"stage {stage.name} has no export")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        stage.export(folder, Path(args.out), dtype)
    except (UserError, KeyError) as exc:
        print(f"kiln export: error: {exc}", file=sys.stderr)
        return 1
    print(f"[kiln] exported {folder} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["plan"]:
        from launcher.plan import main as plan_main

        return plan_main(argv[1:])
    if argv[:2] == ["slurm", "submit"]:
        from launcher.slurm import submit_main

        return submit_main(argv[2:])
    args = build_parser().parse_intermixed_args(argv)
    try:
        stage = find_stage(args.stage)
    except KeyError as exc:
        print(f"kiln: {exc.args[0]}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if in_worker():
        overrides += world_overrides()
    if args.nproc is not None:
        overrides.append(f"dist.num_processes={args.nproc}")
    if args.nodes is not None:
        overrides.append(f"dist.num_nodes={args.nodes}")
    try:
        config = load_config(stage.config_class, args.config, overrides)
    except ConfigError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    d = config.dist
    if stage.distributed and d.world_size > 1 and not in_worker():
        main_addr = args.main_addr or os.environ.get("MASTER_ADDR")
        rank = args.node_rank if args.node_rank is not None else node_rank_from_env()
        try:
            command = accelerate_command(
                args.stage,
                args.config,
                list(args.overrides),
                nproc=d.num_processes,
                nodes=d.num_nodes,
                zero_stage=d.zero_stage,
                offload=d.offload_optimizer or d.offload_params,
                node_rank=rank,
                main_addr=main_addr,
                main_port=args.main_port or int(os.environ.get("MASTER_PORT", 29500)),
            )
        except ValueError as exc:
            print(f"kiln: {exc}", file=sys.stderr)
            return 2
        extra = socket_env(main_addr) if d.num_nodes > 1 else {}
        shown = "".join(f"{k}={v} " for k, v in extra.items())
        print(f"[kiln] {shown}{render(command)}", flush=True)
        if args.dry_run:
            return 0
        return run_forwarding_signals(command, extra)
    if args.dry_run:
        print(f"[kiln] would run stage {args.stage} in this process")
        return 0
    _configure_logging()
    try:
        stage.run(config)
    except UserError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_forwarding_signals(command: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Run the launcher; a SIGTERM/SIGUSR1/SIGINT sent to us goes to it (and on to every
    worker, see launch_env), instead of killing us and orphaning the job."""
    proc = subprocess.Popen(command, env=launch_env(extra_env))
    previous = {
        sig: signal.signal(sig, lambda signum, _: proc.send_signal(signum))
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    }
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _configure_logging() -> None:
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )

"""`python -m launcher STAGE CONFIG [key=value ...]` (also installed as `kiln`).

Parse, validate the whole config before anything starts, run the stage, report bad input as
one message (exit 2 for a bad config, 1 for bad data) instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

from launcher.config import ConfigError, dump_config, load_config
from launcher.errors import UserError
from launcher.stages import find_stage, stage_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Run a stage of kiln on a YAML config with dotted overrides.",
        epilog=f"stages: {', '.join(stage_names())}.  "
        "Example: kiln prepare configs/pretrain/demo.yaml model=tiny optim.lr=1e-3",
    )
    parser.add_argument("stage", help="what to run: " + ", ".join(stage_names()))
    parser.add_argument("config", help="YAML run config (may `extends:` others)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--nproc", type=int, help="processes per node (sets dist.num_processes)")
    parser.add_argument("--nodes", type=int, help="number of nodes (sets dist.num_nodes)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stage = find_stage(args.stage)
    except KeyError as exc:
        print(f"kiln: {exc.args[0]}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
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
    try:
        stage.run(config)
    except UserError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 1
    return 0

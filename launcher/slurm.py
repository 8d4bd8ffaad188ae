"""`python -m launcher slurm submit CONFIG ...`: render slurm/*.sbatch safely and submit it.

Every value that comes from the user (config path, overrides, paths) is shell-quoted when it
is put into the script, so a config value like ``x; rm -rf /`` stays a literal string; the job
name, partition and time limit go to ``sbatch`` as separate arguments, never through a shell.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launcher.config import ConfigError, load_config
from launcher.stages import find_stage

TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


class TemplateError(ValueError):
    pass


def render(template: str, values: dict[str, object]) -> str:
    """Fill ``{{NAME}}`` placeholders: strings shell-quoted, ints as digits, lists as quoted
    words, and ``Raw`` values as they are. Every placeholder must have a value."""
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise TemplateError(f"no value for {', '.join(missing)}")

    def fill(match: re.Match) -> str:
        value = values[match.group(1)]
        if isinstance(value, Raw):
            return value.text
        if isinstance(value, bool) or not isinstance(value, int | str | list | Path):
            raise TemplateError(f"{match.group(1)}: unsupported value {value!r}")
        if isinstance(value, int):
            return str(value)
        if isinstance(value, list):
            return " ".join(shlex.quote(str(v)) for v in value)
        return shlex.quote(str(value))

    return _PLACEHOLDER.sub(fill, template)


class Raw:
    """Text the project itself wrote (an #SBATCH directive), inserted without quoting."""

    def __init__(self, text: str):
        self.text = text


def sbatch(script: Path, args: list[str], dependency: str | None = None) -> list[str]:
    command = ["sbatch", "--parsable", *args]
    if dependency:
        command.append(f"--dependency=afterok:{dependency}")
    return [*command, str(script)]


def _submit(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def _export_log(logs: Path) -> list[str]:
    return ["--output", str(logs / "export-%j.out")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln slurm submit", description="Submit a stage to Slurm.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stage", default="pretrain")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: no GPU request (CPU nodes)")
    p.add_argument(
        "--nproc-per-node", type=int, help="processes per node (default: the GPUs, or 1)"
    )
    p.add_argument("--partition")
    p.add_argument("--time", help="Slurm time limit, e.g. 24:00:00")
    p.add_argument("--job-name")
    p.add_argument(
        "--grace",
        type=int,
        help="seconds between USR1 and the kill (sets checkpoint.grace; default: the config's)",
    )
    p.add_argument("--then", choices=["export"], help="chain a job after this one succeeds")
    p.add_argument("--dry-run", action="store_true", help="render and print, submit nothing")
    return p


def submit_main(argv: list[str]) -> int:
    """`kiln slurm submit CONFIG [key=value ...] --nodes N --gpus-per-node G ...`."""
    args = build_parser().parse_intermixed_args(argv)
    stage = find_stage(args.stage)
    nproc = args.nproc_per_node or args.gpus_per_node or 1
    config_path = Path(args.config).resolve()
    # One grace time for the whole chain: Slurm's signal, the launcher's agent, the loop.
    overrides = [*args.overrides, *([f"checkpoint.grace={args.grace}"] if args.grace else [])]
    try:  # the same validation as a local launch, for the world the job will have
        cfg = load_config(
            stage.config_class,
            config_path,
            [*overrides, f"dist.num_processes={nproc}", f"dist.num_nodes={args.nodes}"],
        )
    except ConfigError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2
    run_dir = cfg.run_dir.resolve()
    logs = run_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    name = args.job_name or f"kiln-{args.stage}-{cfg.run.name}"
    gpu = f"#SBATCH --gpus-per-node={args.gpus_per_node}" if args.gpus_per_node else ""
    values = {
        "NODES": args.nodes,
        "GPUS_PER_NODE": nproc,
        "GPU_DIRECTIVE": Raw(gpu),
        "GRACE_SECONDS": cfg.checkpoint.grace,
        "REPO": TEMPLATES.parent,
        "PYTHON": sys.executable,
        "STAGE": args.stage,
        "CONFIG": config_path,
        "RUN_DIR": run_dir,
        # the job runs from the repository: the run directory is pinned to where it is now
        "OVERRIDES": [*overrides, f"run.output_dir={run_dir.parent}"],
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script = logs / f"{args.stage}-{stamp}.sbatch"
    script.write_text(render((TEMPLATES / "pretrain.sbatch").read_text(), values))
    # Paths and names go to sbatch as arguments, never into #SBATCH lines (a newline in a
    # path would otherwise start a shell command).
    extra = ["--job-name", name, "--output", str(logs / f"{args.stage}-%j.out")]
    extra += ["--partition", args.partition] if args.partition else []
    extra += ["--time", args.time] if args.time else []
    commands = [sbatch(script, extra)]
    export_script = None
    if args.then == "export":
        export_script = logs / f"export-{stamp}.sbatch"
        export_values = {**values, "OUT": run_dir / "hf-export"}
        export_script.write_text(render((TEMPLATES / "export.sbatch").read_text(), export_values))
    if args.dry_run:
        print(f"[kiln] {shlex.join(commands[0])}")
        if export_script:
            follow = sbatch(
                export_script, [*extra[:1], name + "-export", *_export_log(logs)], "JOBID"
            )
            print(f"[kiln] {shlex.join(follow)}")
        return 0
    job = _submit(commands[0])
    print(f"[kiln] submitted job {job}: log {logs / f'{args.stage}-{job}.out'}")
    if export_script:
        follow = _submit(
            sbatch(export_script, ["--job-name", name + "-export", *_export_log(logs)], job)
        )
        print(
            f"[kiln] submitted job {follow} (export, after {job} succeeds): {run_dir / 'hf-export'}"
        )
    return 0

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


class SubmitError(RuntimeError):
    """sbatch refused a job (or is not there); the message is one line for the user."""


def _submit(command: list[str], gpus_per_node: int = 0) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError(
            "sbatch not found: run `slurm submit` where Slurm's commands are (a login "
            "node), or add --dry-run to see the script and the sbatch command"
        ) from None
    if done.returncode != 0:
        said = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        if gpus_per_node and "gres" in said.lower():
            raise SubmitError(
                f"the cluster has no GPU to give for --gpus-per-node {gpus_per_node} "
                f"({said}); on CPU nodes use --gpus-per-node 0 --nproc-per-node N"
            )
        raise SubmitError(f"sbatch refused the job: {said}")
    return done.stdout.strip().split(";")[0]


MIN_TRAIN_SECONDS = 60
"""What a job needs between its start and Slurm's stop signal: launching the processes on
every node, building the model and the first step (about 40 s measured on a 2-node CPU
cluster), so that the signal finds a run it can checkpoint."""


def time_limit_seconds(text: str) -> int | None:
    """Slurm's --time formats ("minutes", "minutes:seconds", "hours:minutes:seconds",
    "days-hours", "days-hours:minutes", "days-hours:minutes:seconds") in seconds; None for
    no limit ("0", "UNLIMITED", "INFINITE"). ``ValueError`` for anything else."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE") or value == "0":
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ValueError(text)
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = [*parts, 0, 0][:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def check_grace(time_limit: str | None, grace: float, from_option: bool) -> str | None:
    """Why ``grace`` (seconds between Slurm's stop signal and its kill) leaves the job no
    time to train within ``time_limit``; None when it fits (or there is no limit)."""
    if time_limit is None:
        return None
    try:
        limit = time_limit_seconds(time_limit)
    except ValueError:
        return f"--time {time_limit}: not a Slurm time (minutes, or [days-]hours:minutes:seconds)"
    if limit is None or limit - grace >= MIN_TRAIN_SECONDS:
        return None
    named = f"--grace {grace:g}" if from_option else f"--grace (checkpoint.grace = {grace:g})"
    fits = (limit - MIN_TRAIN_SECONDS) // 2
    remedy = f"--grace {fits} or less, or a longer --time" if fits >= 10 else "a longer --time"
    when = f"{limit - grace:g} s after the start" if limit > grace else "as soon as it starts"
    return (
        f"--time {time_limit} ({limit} s) with {named}: Slurm sends the stop signal {grace:g} s "
        f"before the limit, {when}, and a job needs about {MIN_TRAIN_SECONDS} s to start "
        f"training before it can save a checkpoint. Use {remedy}"
    )


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
    problem = check_grace(args.time, cfg.checkpoint.grace, from_option=args.grace is not None)
    if problem:
        print(f"kiln: {problem}", file=sys.stderr)
        return 2
    run_dir = cfg.run_dir.resolve()
    logs = run_dir / "slurm"
    # Made here and removed again if sbatch refuses the job: a refusal leaves nothing behind.
    created = [d for d in (run_dir.parent, run_dir, logs) if not d.exists()]
    logs.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        return _render_and_submit(args, cfg, config_path, overrides, logs, nproc, written)
    except SubmitError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        for path in written:
            path.unlink(missing_ok=True)
        for directory in reversed(created):  # the deepest first; only if still empty
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        return 1


def _render_and_submit(args, cfg, config_path, overrides, logs, nproc, written) -> int:
    """Write the job script(s) (appended to ``written``) and submit them, or print them with
    --dry-run. ``SubmitError`` when sbatch refuses; a training job already submitted for a
    chain whose export job is refused is cancelled again."""
    run_dir = logs.parent
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
    written.append(script)
    script.write_text(render((TEMPLATES / "pretrain.sbatch").read_text(), values))
    # Paths and names go to sbatch as arguments, never into #SBATCH lines (a newline in a
    # path would otherwise start a shell command).
    extra = ["--job-name", name, "--output", str(logs / f"{args.stage}-%j.out")]
    extra += ["--partition", args.partition] if args.partition else []
    extra += ["--time", args.time] if args.time else []
    command = sbatch(script, extra)
    export_script = None
    if args.then == "export":
        export_script = logs / f"export-{stamp}.sbatch"
        written.append(export_script)
        export_values = {**values, "OUT": run_dir / "hf-export"}
        export_script.write_text(render((TEMPLATES / "export.sbatch").read_text(), export_values))
    export_args = ["--job-name", name + "-export", *_export_log(logs)]
    if args.dry_run:
        print(f"[kiln] {shlex.join(command)}")
        if export_script:
            print(f"[kiln] {shlex.join(sbatch(export_script, export_args, 'JOBID'))}")
        return 0
    job = _submit(command, args.gpus_per_node)
    if export_script:
        try:
            follow = _submit(sbatch(export_script, export_args, job), args.gpus_per_node)
        except SubmitError as exc:
            subprocess.run(["scancel", job], capture_output=True)
            raise SubmitError(f"{exc} (export job; training job {job} cancelled again)") from None
    print(f"[kiln] submitted job {job}: log {logs / f'{args.stage}-{job}.out'}")
    if export_script:
        print(
            f"[kiln] submitted job {follow} (export, after {job} succeeds): "
            f"log {logs / f'export-{follow}.out'}, model {run_dir / 'hf-export'}"
        )
    return 0

"""`python -m launcher STAGE CONFIG [key=value ...]` (also installed as `kiln`).

Parse, validate the whole config before anything starts, then run the stage here, or, for
several processes, print and run the `accelerate launch` command whose workers come back
here. Bad input is one message (exit 2 for a bad config, 1 for bad data), not a traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher import console
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
from launcher.rundir import LOCKED_ENV, RunDirBusy, RunLock, clear_marker, launch_id
from launcher.signals import STOP, child_env, follow_parent, notify
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
        "--main-port",
        type=int,
        help="port on node 0 (default: MASTER_PORT, else 29500 on several nodes, a free one)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every library's output (banners, deprecation warnings); "
        "default: kiln's lines, the progress bar and real problems",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser


def export_main(argv: list[str]) -> int:
    """`kiln export CHECKPOINT --out DIR [--dtype bf16|fp32] [--merge]`."""
    import torch

    from launcher.checkpoint import newest, read_manifest

    parser = argparse.ArgumentParser(prog="kiln export", description=export_main.__doc__)
    parser.add_argument(
        "checkpoint",
        help="a checkpoint (runs/<name>/checkpoints/step-N), or a run or its "
        "checkpoints folder for the newest one",
    )
    parser.add_argument("--out", required=True, help="the HF model directory to write")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="insist on one plain model with any adapters merged (LoRA); refused, with the "
        "reason, for adapters that cannot be merged (prefix and prompt tuning)",
    )
    args = parser.parse_args(argv)
    console.setup()
    folder = Path(args.checkpoint)
    for root in (folder, folder / "checkpoints"):  # a run or its checkpoints: the newest one
        found = newest(root)
        if found is not None:
            folder = found
            break
    try:
        stage = find_stage(read_manifest(folder)["meta"].get("stage", "pretrain"))
        if stage.export is None:
            raise UserError(f"stage {stage.name} has no export")
        refusal = stage.merge_refusal(folder) if args.merge and stage.merge_refusal else None
        if refusal is not None:
            raise UserError(f"--merge refused for {folder}: {refusal}")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        stage.export(folder, Path(args.out), dtype)
    except (UserError, KeyError) as exc:
        print(f"kiln export: error: {exc}", file=sys.stderr)
        return 1
    print(f"[kiln] exported {folder} -> {args.out}")
    return 0


def predict_main(argv: list[str]) -> int:
    """`kiln predict HF_DIR FILE [--out preds.jsonl]`: label every record's text with a
    sequence classifier (a `kiln classify` export, or any HF one), in this process alone."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from launcher.data.records import CorpusError, read_records

    parser = argparse.ArgumentParser(prog="kiln predict", description=predict_main.__doc__)
    parser.add_argument("model", help="an HF sequence-classification directory (runs/NAME/hf)")
    parser.add_argument("file", help="jsonl (plain, .gz, .zst) or parquet records")
    parser.add_argument("--out", help="write {line, label, score} lines here (default: stdout)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    console.setup()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
        rows = []
        for item in read_records(args.file):
            text = None if isinstance(item, CorpusError) else item.data.get(args.text_field)
            if not isinstance(text, str):
                where = item if isinstance(item, CorpusError) else item.where
                print(f"kiln predict: skipped {where}: no text", file=sys.stderr)
                continue
            rows.append((item.line, text))
    except (OSError, ValueError, UserError) as exc:
        print(f"kiln predict: error: {exc}", file=sys.stderr)
        return 1
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (closed below)
    try:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            inputs = tokenizer(
                [text for _, text in chunk], padding=True, truncation=True, return_tensors="pt"
            )
            with torch.no_grad():
                probs = model(**inputs).logits.float().softmax(-1)
            score, index = probs.max(-1)
            for (line, _), s, i in zip(chunk, score.tolist(), index.tolist(), strict=True):
                label = model.config.id2label[i]
                out.write(json.dumps({"line": line, "label": label, "score": s}) + "\n")
    finally:
        if args.out:
            out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    follow_parent()  # started by a kiln pipeline: stop when it dies
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["pipeline"]:
        from launcher.pipeline import pipeline_main

        return pipeline_main(argv[1:])
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    if argv[:1] == ["plan"]:  # the pretraining model's memory planner (pretrain/memory/)
        planner = find_stage("pretrain").plan
        return planner(argv[1:]) if planner else 2
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
        STOP.install()  # first thing: a stop signal during set-up is remembered, not fatal
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
    console.setup(args.verbose, config)  # before any worker starts: they inherit its settings
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
                main_port=args.main_port or int(os.environ.get("MASTER_PORT", 0)) or None,
            )
        except ValueError as exc:
            print(f"kiln: {exc}", file=sys.stderr)
            return 2
        extra = socket_env(main_addr) if d.num_nodes > 1 else {}
        shown = "".join(f"{k}={v} " for k, v in extra.items())
        print(f"[kiln] {shown}{render(command)}", flush=True)
        if args.dry_run:
            return 0
        lock = None
        if rank == 0:  # the main node's launcher holds the run directory for every node
            try:
                lock = take_run_dir(config.run_dir)
            except RunDirBusy as exc:
                print(f"kiln: error: {exc}", file=sys.stderr)
                return 1
            extra[LOCKED_ENV] = str(config.run_dir.resolve())
        launch_id()  # one id for every process of this launch (the PREEMPTED marker's)
        return run_forwarding_signals(
            command,
            extra,
            nproc=d.num_processes,
            grace=config.checkpoint.grace,
            pass_fds=(lock.fd,) if lock and lock.fd is not None else (),
            on_stop=_stopping(lock, config.checkpoint.grace),
        )
    if args.dry_run:
        print(f"[kiln] would run stage {args.stage} in this process")
        return 0
    lock = None
    try:
        if _holds_run_dir(config.run_dir):
            lock = take_run_dir(config.run_dir)
        STOP.listen(_stopping(lock, config.checkpoint.grace))
        with STOP.catching():
            stage.run(config)
        report_end()
    except UserError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 1
    finally:
        STOP.listeners.clear()
        if lock is not None:
            lock.release()
    return 0


def _stopping(lock: RunLock | None, grace: float) -> list:
    """What to do at a stop request: tell a launch started meanwhile on this run directory
    that it is about to be let go (it waits instead of failing "in use")."""
    return [] if lock is None else [lambda: lock.mark_stopping(grace)]


def take_run_dir(run_dir: Path) -> RunLock:
    """Lock the run directory for this launch (``RunDirBusy`` if another holds it), then
    remove a PREEMPTED marker left by an earlier launch: a failure from here on must not
    look like a preemption to the batch script."""
    launch_id()
    lock = RunLock(run_dir).acquire()
    clear_marker(run_dir)
    return lock


def _holds_run_dir(run_dir: Path) -> bool:
    """Whether this process must lock the run directory: it runs the stage alone, or it is
    global rank 0 of a world started without the kiln launcher (e.g. torchrun directly)."""
    if not in_worker():
        return True
    held = os.environ.get(LOCKED_ENV) == str(run_dir.resolve())
    return os.environ.get("RANK", "0") == "0" and not held


def run_forwarding_signals(
    command: list[str],
    extra_env: dict[str, str] | None = None,
    *,
    nproc: int | None = None,
    grace: float | None = None,
    pass_fds: tuple[int, ...] = (),
    on_stop: list | None = None,
) -> int:
    """Run the launcher; a SIGTERM/SIGUSR1/SIGINT sent to us goes to it (and on to every
    worker, see launch_env), instead of killing us and orphaning the job. ``pass_fds`` (the
    run directory's lock) stay open in it, so the lock lasts as long as the job does;
    ``on_stop`` are called at the first such signal."""
    ends = tempfile.mkdtemp(prefix="kiln-end-")
    env = launch_env({**(extra_env or {}), END_DIR_ENV: ends}, nproc=nproc, grace=grace)
    env = child_env(env)  # the agent stops its workers if this launcher dies (follow_parent)
    proc = subprocess.Popen(command, env=env, pass_fds=pass_fds)
    pending = list(on_stop or ())

    def forward(signum: int, _frame) -> None:
        notify(pending)
        pending.clear()
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code = proc.wait()
        if nproc and ended_cleanly(code, Path(ends), nproc):
            code = 0
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(ends, ignore_errors=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
END_DIR_ENV = "KILN_END_DIR"
"""A directory of this node's launch where each worker whose stage returned (it finished, or
it stopped after saving) writes a file named by its local rank."""


def report_end() -> None:
    """Worker: this rank's stage returned; the node's launcher reads it (``ended_cleanly``)."""
    directory = os.environ.get(END_DIR_ENV)
    if directory and os.path.isdir(directory):
        rank = os.environ.get("LOCAL_RANK", "0")
        Path(directory, rank).write_text(f"{STOP.name or 'finished'}\n")


def ended_cleanly(code: int, ends: Path, nproc: int) -> bool:
    """Whether an agent that exited ``code`` ended only because it was sent a stop signal
    while every one of its ``nproc`` workers returned normally (saved and stopped, or done):
    the agent then exits 128 + the signal (launcher/agent.py), but nothing failed, and a
    task that exits non-zero makes srun cancel the other nodes and logs read like a crash."""
    if code not in {128 + int(sig) for sig in STOP_SIGNALS}:
        return False
    return sum(1 for _ in ends.iterdir()) >= nproc

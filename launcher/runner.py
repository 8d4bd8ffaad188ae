"""One stage runner: what every stage does around the loop, so that a stage is a Task and a
config (``pretrain/train.py`` is the example).

In every process of the job: take over stop signals, build the runtime, seed, let the main
rank prepare the inputs (corpus, tokenizer, resolved config) while the others wait, build the
task and the trainer, resume, train. Then, unless the run stopped early (a signal: the grace
time was for the checkpoint, the export comes on resume), export the model as a plain HF
directory: into ``hf.tmp/``, renamed to ``hf/`` only when complete, so a kill mid-write never
leaves a half directory that a next stage would load. ``hf/kiln.json`` records where it comes
from: stage, step, config fingerprint, the checkpoint, the SHA-256 of every weight file (and
a parent's, for a stage that starts from one).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from launcher import persist
from launcher.callbacks import default_callbacks
from launcher.checkpoint import sha256_file
from launcher.config import save_config
from launcher.loop import Callback, Trainer
from launcher.run_config import RunConfig
from launcher.runtime import Runtime, build_runtime, seed_everything
from launcher.signals import STOP, Interrupted
from launcher.task import Task

LINEAGE = "kiln.json"


def run_stage(
    cfg: RunConfig,
    make_task: Callable[[RunConfig, Runtime], Task],
    *,
    prepare: Callable[[RunConfig], object] | None = None,
    callbacks: list[Callback] | None = None,
    parent: Path | None = None,
) -> dict[str, float]:
    """Train ``make_task(cfg, runtime)`` with the shared loop and export it to
    ``<run_dir>/hf/``; returns the last logged metrics. ``prepare`` runs on the main rank
    before any task is built; ``parent`` is the HF directory the stage started from (default:
    ``init.path``; its ``kiln.json`` and weights' digests go into the lineage)."""
    if parent is None and cfg.init.path is not None:
        parent = Path(cfg.init.path)
    with STOP.catching():  # the launcher's worker installed it already; in-process: from here
        wandb = cfg.metrics.resolved_wandb_mode() != "disabled"
        runtime = build_runtime(cfg, log_with="wandb" if wandb else None)
        try:
            return _run(cfg, runtime, make_task, prepare, callbacks, parent)
        except BaseException as failure:
            # The traceback's frames hold the trainer, and through it the engines and their
            # process groups: cleared, close() can free the groups of a failed run as well
            # (one that outlives close() aborts the process at exit, see Runtime.close).
            traceback.clear_frames(failure.__traceback__)
            raise
        finally:
            runtime.close()  # leave the process group: another run may follow in-process


def _run(cfg, runtime: Runtime, make_task, prepare, callbacks, parent) -> dict[str, float]:
    seed_everything(cfg.run.seed, runtime.rank)
    if runtime.is_main and prepare is not None:
        prepare(cfg)  # once, before the other ranks read what it writes
    runtime.barrier()
    task = make_task(cfg, runtime)  # reads and checks the stage's data: nothing written before
    if runtime.is_main:
        save_config(cfg, cfg.run_dir)  # the resolved config; every checkpoint copies it
    trainer = Trainer(cfg, runtime, task, callbacks or default_callbacks(cfg))
    if runtime.is_main and parent is not None:  # once: hashing a large parent takes seconds
        trainer.parent_info = parent_lineage(parent)
    trainer.setup()
    results = trainer.fit()
    if trainer.stopped or type(task).export is Task.export:  # stopped, or nothing to export
        runtime.barrier()
        return results
    best = persist.load_best_weights(trainer)  # checkpoint.best: export that one
    # Under ZeRO-3 the full weights exist nowhere: every rank takes part in gathering them.
    state = runtime.accelerator.get_state_dict(trainer.engine)
    if runtime.is_main:
        out = cfg.run_dir / "hf"
        model = runtime.accelerator.unwrap_model(trainer.engine)
        try:
            # the main rank alone: no collective to leave hanging
            with STOP.interruptible(), plain_model_construction():

                def write(tmp: Path) -> None:
                    task.export(model, share_tied_weights(model, state), tmp)
                    write_lineage(tmp, trainer, parent, best)

                export_atomically(out, write)
        except Interrupted:
            trainer.mark_stopped(pending="the export")
            runtime.barrier()
            return results
        for line in task.summary(results, trainer.state):
            print(f"[kiln] {line}")
        print(f"[kiln] metrics         {cfg.run_dir / 'metrics.jsonl'}")
        print(f"[kiln] model           {out}/ (HF format)")
    runtime.barrier()
    return results


@contextlib.contextmanager
def plain_model_construction() -> Iterator[None]:
    """Models built during the export (``from_config``, peft merges) are plain, not ZeRO-3
    partitioned: transformers builds under ``deepspeed.zero.Init`` whenever its DeepSpeed
    config says ZeRO-3, and that Init's collectives would wait forever for the other ranks,
    which are not exporting. transformers keeps that config behind a module-level weak
    reference (no public getter), restored after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def share_tied_weights(model, state: dict | None) -> dict | None:
    """``state`` with each tied alias (a tied Llama's ``lm_head.weight``) given its source's
    tensor, so that ``save_pretrained`` stores it once, as for the model's own state dict: a
    gathered state dict (ZeRO, accelerate) holds two equal copies, and transformers drops
    only aliases that share storage (the export was 20% larger for the tiny preset)."""
    import torch

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if state is None or not tied:
        return state
    state = dict(state)
    for alias, source in tied.items():
        if alias in state and source in state and torch.equal(state[alias], state[source]):
            state[alias] = state[source]
    return state


def export_atomically(out: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill ``out.tmp/``, then rename it to ``out``: ``out`` is whole or
    absent (an older ``out`` is replaced only once the new one is complete)."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def weight_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each weight file (safetensors) of an HF directory, by name. Hashed once per
    process per file version (path, size, mtime): a stage's parent is both its lineage and
    its frozen reference, and a large one takes seconds to hash."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        stat = path.stat()
        out[path.name] = _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return out


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def parent_lineage(parent: Path) -> dict:
    """A parent model directory's path and the SHA-256 of its weight files."""
    parent = Path(parent).resolve()
    return {"path": str(parent), "weights": weight_digests(parent)}


def code_version() -> dict:
    """The installed package's version and, in a git checkout, its commit (None otherwise;
    "+dirty" when tracked files differ from it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("kiln-llm")
    except PackageNotFoundError:
        package = None
    repo, commit = Path(__file__).resolve().parents[1], None
    if (repo / ".git").exists():
        try:
            git = ["git", "-C", str(repo)]
            head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True)  # fmt: skip
            if head.returncode == 0:
                commit = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except OSError:  # no git on this machine
            commit = None
    return {"package": package, "git_commit": commit}


def write_lineage(
    out: Path, trainer: Trainer, parent: Path | None = None, checkpoint: Path | None = None
) -> Path:
    """``out/kiln.json``: what made this model directory (written last, before the rename);
    ``checkpoint``: the one whose weights were exported, when not the last step's."""
    cfg = trainer.cfg
    data = getattr(cfg, "data", None)
    data_json = json.dumps(data.model_dump(mode="json"), sort_keys=True) if data else ""
    info = {
        "stage": trainer.task.name,
        "run_name": cfg.run.name,
        "step": trainer.state.step,
        "weights_from": str(checkpoint) if checkpoint else "the last step",
        "tokens": trainer.state.tokens,
        "config_fingerprint": cfg.fingerprint(),
        "data_fingerprint": hashlib.sha256(data_json.encode()).hexdigest()[:16],
        "run_dir": str(cfg.run_dir.resolve()),
        "weights": weight_digests(out),
        "code": code_version(),
        "started_at": trainer.started_at,
        "finished_at": time.time(),
        "final_metrics": trainer.last_logged,
        "parent": None,
    }
    if parent is not None:
        lineage = Path(parent).resolve() / LINEAGE
        info["parent"] = {
            **(trainer.parent_info or parent_lineage(parent)),
            "lineage": json.loads(lineage.read_text()) if lineage.exists() else None,
        }
    path = out / LINEAGE
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path

"""Saving and resuming a run: every rank's part, in order, with the collectives in between.

``save`` writes the trainer's named states (``Trainer.checkpoint_states``: weights and
moments, loop counters, the task's state — the data stream — RNG, and whatever the task adds;
``launcher/states.py`` says how each is stored) through ``launcher.checkpoint``'s atomic folder
protocol. ``resume`` applies ``checkpoint.resume`` (auto / must / none / a path): it finds the
newest checkpoint that verifies, every rank checking a share of the files, and loads it even
if it was written by another world size or ZeRO stage; a state the run asks for that the
checkpoint lacks is an error naming both.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
import yaml

from launcher import snapshot, states
from launcher.checkpoint import (
    CheckpointError,
    balance,
    commit,
    describe_files,
    find_resumable,
    prune,
    read_manifest,
    recover,
    step_dir,
    verify,
)

if TYPE_CHECKING:
    from launcher.loop import Trainer

log = logging.getLogger(__name__)
DELAY_ENV = "KILN_CHECKPOINT_DELAY"
"""Seconds to sleep inside every save (fault-injection for tests of slow saves and crashes)."""


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def checkpoint_root(trainer: Trainer) -> Path:
    return trainer.cfg.run_dir / "checkpoints"


def save(trainer: Trainer, reason: str) -> Path:
    """Write a checkpoint of the current step on every rank; returns its folder."""
    rt, cfg, step = trainer.runtime, trainer.cfg, trainer.state.step
    root = checkpoint_root(trainer)
    tmp, final = root / f"step-{step:08d}.tmp", step_dir(root, step)
    started = time.time()
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died here before
        tmp.mkdir(parents=True)
    rt.barrier()
    named = trainer.checkpoint_states()
    out = states.Saving(tmp, rt.rank, rt.world_size, rt.is_main)
    for name, state in named.items():  # every rank, in order: some gather (ZeRO-3)
        state.save(name, out)
    written = out.close()
    if rt.is_main:
        if (cfg.run_dir / "config.yaml").is_file():
            shutil.copy(cfg.run_dir / "config.yaml", tmp / "config.yaml")
            written.append("config.yaml")
        written += trainer.task.save_extras(tmp)
    if float(os.environ.get(DELAY_ENV, "0")) > 0:
        time.sleep(float(os.environ[DELAY_ENV]))
    files: dict[str, dict] = {}
    for share in _gather(describe_files(tmp, written), rt.world_size):
        files.update(share)
    if rt.is_main:
        meta = {
            "step": step,
            "stage": trainer.task.name,
            "reason": reason,
            "world_size": rt.world_size,
            "zero_stage": rt.zero_stage,
            "dtype": str(rt.dtype),
            "config_fingerprint": cfg.fingerprint(),
            "states": list(named),
            "saved_at": time.time(),
            "parent": trainer.parent_info,
        }
        commit(tmp, final, files, meta)
        protect = {trainer.resumed_from} if trainer.resumed_from else set()
        if trainer.state.best_step is not None:  # checkpoint.best: never pruned
            protect.add(step_dir(root, trainer.state.best_step))
        c = cfg.checkpoint
        removed = prune(root, c.keep_last, c.keep_every, protect | {final})
        log.info(
            "saved %s (%s) in %.1fs%s",
            final,
            reason,
            time.time() - started,
            f"; removed {', '.join(p.name for p in removed)}" if removed else "",
        )
    rt.barrier()
    trainer.last_saved_step = step
    return final


BEST = "best"


def mark_best(trainer: Trainer) -> Path:
    """Point ``checkpoints/best`` at the checkpoint of ``trainer.state.best_step`` (a
    relative symlink, replaced atomically; main rank)."""
    root = checkpoint_root(trainer)
    target = step_dir(root, trainer.state.best_step)
    if trainer.runtime.is_main:
        tmp = root / (BEST + ".tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.name)
        tmp.replace(root / BEST)
        best = trainer.cfg.checkpoint.best
        value = trainer.state.best_value
        log.info("best %s so far: %.6g at step %d", best.metric, value, trainer.state.best_step)
    return target


def load_best_weights(trainer: Trainer) -> Path | None:
    """Put the best checkpoint's weights (and moments) into the engine, for the export; None
    (nothing done) without ``checkpoint.best`` or when the last step is the best. Every rank
    calls it (ZeRO-3 collectives)."""
    best = trainer.state.best_step
    if trainer.cfg.checkpoint.best is None or best is None or best == trainer.state.step:
        return None
    folder = step_dir(checkpoint_root(trainer), best)
    if hasattr(trainer.engine, "empty_partition_cache"):
        # ZeRO-3 leaves parameters prefetched by the last evaluation's forwards in flight;
        # overwriting them fails ("Cannot partition a param in flight") until released.
        trainer.engine.empty_partition_cache()
    snapshot.load_weights(trainer.engine.module, trainer.optimizer, trainer.engine, folder)
    log.info("exporting the best checkpoint (step %d), not the last step's weights", best)
    return folder


def _check(folder: Path, trainer: Trainer) -> None:
    """Raise ``CheckpointError`` on every rank if any rank finds a problem in its share."""
    rt = trainer.runtime
    problem = None
    try:
        manifest = read_manifest(folder)
        names = sorted(manifest["files"])
        owner = balance([manifest["files"][n]["bytes"] for n in names], rt.world_size)
        mine = [n for n, r in zip(names, owner, strict=True) if r == rt.rank]
        verify(folder, manifest, mine, hashes=trainer.cfg.checkpoint.verify)
    except CheckpointError as exc:
        problem = str(exc)
    problems = [p for p in _gather(problem, rt.world_size) if p]
    if problems:
        raise CheckpointError(problems[0])


def resume(trainer: Trainer) -> Path | None:
    """Load the checkpoint ``checkpoint.resume`` asks for; returns it (None: fresh start).

    Raises ``CheckpointError`` for ``must`` without a checkpoint or an unusable given path."""
    mode, root = trainer.cfg.checkpoint.resume, checkpoint_root(trainer)
    if trainer.runtime.is_main:
        recover(root)  # what a process killed inside a save left half done
    trainer.runtime.barrier()
    if mode == "none":
        log.info("checkpoint.resume=none: starting fresh")
        return None
    if mode in ("auto", "must"):
        found = find_resumable(root, lambda folder: _check(folder, trainer))
        if found is None:
            if mode == "must":
                raise CheckpointError(
                    f"checkpoint.resume=must but {root} holds no usable checkpoint"
                )
            log.info("no checkpoint under %s: starting fresh", root)
            return None
        for reason in found.skipped:
            log.warning("not resuming from a newer checkpoint: %s", reason)
        folder = found.folder
    else:
        folder = Path(mode)
        _check(folder, trainer)
    load(trainer, folder)
    return folder


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _changed_settings(saved_config: Path, current: dict) -> str:
    if not saved_config.is_file():
        return ""
    before, after = _flat(yaml.safe_load(saved_config.read_text())), _flat(current)
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in keys)


def load(trainer: Trainer, folder: Path) -> None:
    rt = trainer.runtime
    manifest = read_manifest(folder)
    meta = manifest["meta"]
    if rt.is_main and meta["config_fingerprint"] != trainer.cfg.fingerprint():
        changed = _changed_settings(folder / "config.yaml", trainer.cfg.model_dump(mode="json"))
        log.warning("resuming %s with changed settings: %s", folder, changed or "unknown")
    named = trainer.checkpoint_states()
    src = states.Loading(folder, meta["world_size"], rt.rank, rt.world_size, meta.get("states"))
    task = f"{type(trainer.task).__name__}.states()"
    asked_by = {n: task for n in named if n not in states.LOOP_STATES}
    states.check_saved(named, src, asked_by)  # before anything is loaded
    for name, state in named.items():  # in order: weights before Adam's step count
        if state.saved_in(name, src):
            state.load(name, src)
        elif name not in states.LOOP_STATES:
            log.warning("%s holds no state %r: it keeps its default", folder, name)
    ignored = src.names() - named.keys()
    if ignored and rt.is_main:
        log.warning("%s: not loaded (this run has no such state): %s", folder, sorted(ignored))
    trainer.resumed_from = folder
    if folder.resolve().parent == checkpoint_root(trainer).resolve():
        trainer.last_saved_step = meta["step"]  # this run's own: saving it again adds nothing
    log.info(
        "resumed from %s: step %d (saved by %d ranks, ZeRO-%d; now %d ranks, ZeRO-%d)",
        folder,
        meta["step"],
        meta["world_size"],
        meta["zero_stage"],
        rt.world_size,
        rt.zero_stage,
    )

"""Checkpoint directories: atomic, verified, kept or pruned. The mechanism, not the decision.

A checkpoint is ``checkpoints/step-00001000/``. It is written as ``step-00001000.tmp/`` by
every rank, then rank 0 writes ``manifest.json`` (every file with its size and SHA-256, the
hashes computed by the ranks that wrote the files, and a hash of the manifest itself), renames
the folder, and only then moves the ``latest`` pointer and deletes old checkpoints. A folder
without a valid manifest is never loaded; ``find_resumable`` walks back to the newest one that
verifies and says why it skipped the others.

Whatever moment a process dies at, a complete checkpoint is never deleted before its successor
is in place: a checkpoint of the same step is renamed aside (``.old``) until the new one has
its name, one to prune is renamed (``.del``) before its files go, ``latest`` names an existing
folder or is absent for the instant of a replacement, and ``recover`` (run before resuming)
finishes or undoes what a dead process left half done.

(DeepSpeed writes shards straight to their final paths, Accelerate deletes the oldest
checkpoint before writing the new one, and torch.distributed.checkpoint loads a flipped byte
without complaint: ../shared/NOTES.md.)

Nothing here unpickles: tensors are safetensors, metadata JSON.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
ASIDE = ".old"  # a complete checkpoint while its replacement (same step) is renamed in
DOOMED = ".del"  # a checkpoint being deleted: never a candidate, whatever is left of it
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_CHUNK = 8 << 20


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded (incomplete, corrupt, tampered, missing)."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Make a file's content (or a directory's entries) durable before we rely on it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def balance(sizes: list[int], ranks: int) -> list[int]:
    """The rank that takes each item (writes a tensor, hashes a file), so that the largest
    total is small: the largest item first, each to the rank with the least so far. Every rank
    computes the same answer without talking to the others. (Round-robin by name gave the rank
    holding the embedding, and the rank hashing its files, ~60% of a 2-rank `small`
    checkpoint; everyone else waited for it.)"""
    totals = [(0, r) for r in range(ranks)]  # a heap of (total so far, rank)
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        total, rank = heapq.heappop(totals)
        out[i] = rank
        heapq.heappush(totals, (total + sizes[i], rank))
    return out


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of files this rank wrote (relative names), fsynced first."""
    out = {}
    for name in names:
        path = folder / name
        fsync_path(path)
        out[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def _manifest_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def commit(tmp: Path, final: Path, files: dict[str, dict], meta: dict) -> None:
    """Rank 0, after every rank finished writing: manifest, rename, then the pointer. An
    older checkpoint of the same step stays whole (renamed aside) until the new one is in
    place."""
    body = {"files": files, "meta": meta}
    manifest = {**body, "manifest_sha256": _manifest_digest(body)}
    path = tmp / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync_path(path)
    fsync_path(tmp)
    root = final.parent
    aside = final.with_name(final.name + ASIDE)
    if final.exists():
        _discard(aside)  # an earlier replacement that got through before its clean-up
        if _pointed(root) == final.name:
            (root / LATEST).unlink()  # absent for an instant, never naming a missing folder
        final.rename(aside)
    tmp.rename(final)
    fsync_path(root)
    _point(root, final.name)
    _discard(aside)


def _pointed(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def _point(root: Path, name: str) -> None:
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(name + "\n")
    pointer.replace(root / LATEST)


def _discard(folder: Path) -> None:
    """Delete a folder so that no moment of it looks like a checkpoint: rename, then delete."""
    if not folder.exists():
        return
    doomed = folder.with_name(folder.name.split(".")[0] + DOOMED)
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """Has a manifest that reads (cheap: the files are not hashed)."""
    try:
        read_manifest(folder)
    except CheckpointError:
        return False
    return True


def recover(root: Path) -> None:
    """Finish or undo what a process killed inside ``commit`` or ``prune`` left (rank 0,
    before looking for a checkpoint, with the run directory locked): put back a checkpoint
    that was renamed aside for a replacement that never arrived, drop the leftovers of
    deletions, and point ``latest`` at the newest complete checkpoint."""
    if not root.is_dir():
        return
    for aside in sorted(root.glob(f"step-*{ASIDE}")):
        final = aside.with_name(aside.name[: -len(ASIDE)])
        if final.exists():
            _discard(aside)  # the replacement is in place
        else:
            aside.rename(final)
            log.warning("%s: a replacement of this checkpoint did not complete; kept it", final)
    for doomed in root.glob(f"step-*{DOOMED}"):
        shutil.rmtree(doomed, ignore_errors=True)
    newest = next((f for _, f in candidates(root) if is_complete(f)), None)
    if newest is None:
        (root / LATEST).unlink(missing_ok=True)
    elif _pointed(root) != newest.name:
        _point(root, newest.name)


def newest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one; None if ``root`` has
    none (read-only: for `kiln export RUN`)."""
    named = _pointed(root)
    if named and (root / named).is_dir():
        return root / named
    return next((f for _, f in candidates(root) if is_complete(f)), None)


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint, checked against its own hash (``CheckpointError``)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save did not complete)")
    try:
        manifest = json.loads(path.read_text())
        body = {"files": manifest["files"], "meta": manifest["meta"]}
        recorded = manifest["manifest_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid manifest ({exc})") from None
    if _manifest_digest(body) != recorded:
        raise CheckpointError(f"{path}: the manifest was modified after it was written")
    return manifest


def verify(
    folder: Path, manifest: dict, names: list[str] | None = None, hashes: bool = True
) -> None:
    """Check files (all, or ``names``) against the manifest; ``CheckpointError`` names the file."""
    for name in names if names is not None else sorted(manifest["files"]):
        want = manifest["files"][name]
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the manifest says {want['bytes']} (truncated?)"
            )
        if hashes and sha256_file(path) != want["sha256"]:
            raise CheckpointError(
                f"{path}: SHA-256 differs from the manifest (corrupted or modified)"
            )


@dataclass(frozen=True)
class Found:
    folder: Path
    step: int
    skipped: tuple[str, ...]
    """Why newer folders were not used."""


def candidates(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders, newest first (``*.tmp`` never appear here)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def find_resumable(root: Path, check: Callable[[Path], None]) -> Found | None:
    """The newest checkpoint under ``root`` that passes ``check`` (which raises
    ``CheckpointError`` with a reason), or None."""
    skipped: list[str] = []
    for step, folder in candidates(root):
        try:
            check(folder)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return Found(folder, step, tuple(skipped))
    if skipped:
        log.warning("no usable checkpoint under %s: %s", root, "; ".join(skipped))
    return None


def prune(root: Path, keep_last: int, keep_every: int | None, protect: set[Path]) -> list[Path]:
    """Delete old checkpoints (after a successful save); never ``protect``ed ones, never the
    newest ``keep_last`` complete ones (so never the only one), never multiples of
    ``keep_every``. Unfinished ``.tmp`` folders go too (the run directory's lock says no
    other launch is writing one)."""
    removed, kept = [], 0
    protected = {p.resolve() for p in protect}
    for step, folder in candidates(root):
        newest = kept < keep_last and is_complete(folder)
        kept += newest
        if newest or (keep_every and step % keep_every == 0) or folder.resolve() in protected:
            continue
        _discard(folder)
        removed.append(folder)
    for tmp in root.glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    return removed

"""The checkpoint folder protocol: manifest, verification, fallback, retention, and a kill at
any moment of a save."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import pytest

from launcher import checkpoint
from launcher.checkpoint import (
    MANIFEST,
    CheckpointError,
    commit,
    describe_files,
    find_resumable,
    prune,
    read_manifest,
    recover,
    step_dir,
    verify,
)


def make_checkpoint(root, step: int, payload: bytes = b"weights" * 1000):
    tmp = root / f"step-{step:08d}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "model-00000-of-00001.safetensors").write_bytes(payload)
    (tmp / "trainer.json").write_text(json.dumps({"step": step}))
    files = describe_files(tmp, ["model-00000-of-00001.safetensors", "trainer.json"])
    commit(tmp, step_dir(root, step), files, {"step": step})
    return step_dir(root, step)


def check(folder):
    verify(folder, read_manifest(folder))


def test_a_committed_checkpoint_verifies_and_moves_the_latest_pointer(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    check(folder)
    assert (tmp_path / "latest").read_text().strip() == "step-00000010"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_flipped_byte_is_refused_naming_the_file(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    shard = folder / "model-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[1234] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"model-00000-of-00001\.safetensors: SHA-256 differs"
    ):
        check(folder)


def test_a_truncated_shard_is_refused_naming_the_file(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    shard = folder / "model-00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model-00000-of-00001\.safetensors: 100 bytes"):
        check(folder)


def test_a_missing_or_tampered_manifest_is_refused(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["trainer.json"]["bytes"] += 1
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="modified after it was written"):
        check(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        check(folder)


def test_auto_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    (newest / "trainer.json").write_text("{}")  # damaged after it was written
    unfinished = tmp_path / "step-00000030.tmp"  # a save that died half-way
    unfinished.mkdir()
    (unfinished / "trainer.json").write_text("{}")
    found = find_resumable(tmp_path, check)
    assert found.step == 10
    assert len(found.skipped) == 1 and "step-00000020/trainer.json" in found.skipped[0]
    assert find_resumable(tmp_path / "nothing", check) is None


def test_pruning_keeps_the_last_k_the_permanent_ones_and_the_protected_one(tmp_path):
    folders = {s: make_checkpoint(tmp_path, s) for s in (5, 10, 15, 20, 25, 30)}
    (tmp_path / "step-00000035.tmp").mkdir()
    removed = prune(tmp_path, keep_last=2, keep_every=10, protect={folders[5]})
    assert [p.name for p in removed] == ["step-00000015"]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert left == [f"step-{s:08d}" for s in (5, 10, 20, 25, 30)]  # and the stale .tmp is gone


# ------------------------------------------------------------------ a kill at every moment


class Killed(BaseException):
    """A simulated kill -9: nothing after it runs (``except Exception`` does not catch it)."""


OS_CALLS = ("rename", "replace", "unlink", "rmdir", "mkdir", "fsync")


@contextmanager
def killed_at(point: int):
    """Raise ``Killed`` at the ``point``-th moment: each line run in launcher/checkpoint.py and
    each os-level call (so also inside ``shutil.rmtree``). Yields a list holding the count."""
    seen = [0]
    real = {name: getattr(os, name) for name in OS_CALLS}

    def tick():
        seen[0] += 1
        if seen[0] == point:
            raise Killed

    for name in OS_CALLS:

        def call(*args, _real=real[name], **kwargs):
            tick()
            return _real(*args, **kwargs)

        setattr(os, name, call)

    def local(frame, event, arg):
        if event == "line":
            tick()
        return local

    def trace(frame, event, arg):
        return local if frame.f_code.co_filename == checkpoint.__file__ else None

    sys.settrace(trace)
    try:
        yield seen
    finally:
        sys.settrace(None)
        for name, function in real.items():
            setattr(os, name, function)


def pointer_target(root):
    """The folder ``latest`` names; it must exist whenever ``latest`` does."""
    if not (root / "latest").exists():
        return None
    target = root / (root / "latest").read_text().strip()
    assert target.is_dir(), f"latest names a missing folder: {target.name}"
    return target


@pytest.mark.parametrize(("old_steps", "new_step"), [((10,), 10), ((5, 10), 10), ((10,), 20)])
def test_a_kill_at_any_moment_of_commit_and_prune_leaves_a_complete_checkpoint(
    tmp_path, monkeypatch, old_steps, new_step
):
    """keep_last=1 (the worst case): re-saving the newest step (a finished run relaunched),
    or saving a new one that prunes the old. After the kill, `latest` names an existing
    folder, and resuming (recover, then the newest that verifies) finds a complete checkpoint:
    the new one, or the one it was replacing."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # slow here, and moot in-process
    outcomes, point = set(), 0
    while True:
        point += 1
        root = tmp_path / f"kill-{point}"
        for step in old_steps:
            make_checkpoint(root, step, payload=b"old" * 1000)
        tmp = root / f"step-{new_step:08d}.tmp"
        tmp.mkdir()
        (tmp / "model-00000-of-00001.safetensors").write_bytes(b"new" * 1000)
        files = describe_files(tmp, ["model-00000-of-00001.safetensors"])
        with killed_at(point):
            try:
                commit(tmp, step_dir(root, new_step), files, {"step": new_step})
                prune(root, keep_last=1, keep_every=None, protect={step_dir(root, new_step)})
                finished = True
            except Killed:
                finished = False
        pointer_target(root)  # at the moment of the kill
        recover(root)
        found = find_resumable(root, check)
        assert found is not None, f"no complete checkpoint after a kill at moment {point}"
        payload = (found.folder / "model-00000-of-00001.safetensors").read_bytes()[:3]
        assert (found.step, payload) in {(new_step, b"new"), (max(old_steps), b"old")}
        assert pointer_target(root) == found.folder
        assert not [p for p in root.iterdir() if p.name.endswith((".old", ".del"))]
        outcomes.add(payload)
        if finished:
            break
    assert found.step == new_step and payload == b"new"
    assert point > 40 and outcomes == {b"old", b"new"}  # the kills landed on both sides
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert left == [f"step-{new_step:08d}"]


def test_pruning_never_deletes_the_only_complete_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 10)
    (tmp_path / "step-00000020").mkdir()  # newer, but never completed (no manifest)
    prune(tmp_path, keep_last=1, keep_every=None, protect=set())
    assert find_resumable(tmp_path, check).step == 10
    assert not (tmp_path / "step-00000020").exists()

"""The checkpoint folder protocol: manifest, verification, fallback, retention."""

from __future__ import annotations

import json

import pytest

from launcher.checkpoint import (
    MANIFEST,
    CheckpointError,
    commit,
    describe_files,
    find_resumable,
    prune,
    read_manifest,
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

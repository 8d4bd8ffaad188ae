"""``launcher.atomic.write_text``: the file is the old one or the whole new one."""

from __future__ import annotations

import pytest

from launcher import atomic


def test_a_file_is_replaced_whole_and_no_temporary_file_is_left(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old\n")
    assert atomic.write_text(path, "new ✓\n") == path
    assert path.read_text(encoding="utf-8") == "new ✓\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(path, "half \ud800 written")  # fails inside the write
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]

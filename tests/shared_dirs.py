"""Fixture directories built once for every pytest process that wants them.

A session fixture is built once per pytest process: under pytest-xdist once per worker, and
`make test` runs two passes (the parallel one, then the serial one), so the tiny parent that
every fine-tuning test starts from was pretrained three times per `make test`, the genre
classifier twice. A directory built here is built by the first process that asks, under a
file lock that the others wait on, and reused by the rest: across the workers of one session
(their shared base directory) and, when ``KILN_TEST_SHARED`` names a directory (`make test`
makes a fresh one for its two passes and removes it after), across sessions too.

What lives here is read-only to its users: a test that writes runs next to a shared fixture
writes under a name of its own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

ENV = "KILN_TEST_SHARED"


def shared_base(tmp_path_factory) -> Path:
    """``$KILN_TEST_SHARED``, else the directory the session's xdist workers share (each has a
    basetemp of its own below it), else the session's basetemp."""
    if os.environ.get(ENV):
        base = Path(os.environ[ENV])
        base.mkdir(parents=True, exist_ok=True)
        return base
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``<shared base>/<name>``, filled by ``build(root)`` unless a process did so before.
    ``<name>.done`` is written only when ``build`` returned: a build that failed (or was
    killed) is started again from an empty directory by the next process that asks."""
    root = shared_base(tmp_path_factory) / name
    done = root.with_name(f"{name}.done")
    with FileLock(root.with_name(f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root)
            done.touch()
    return root

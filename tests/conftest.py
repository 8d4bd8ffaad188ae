"""Shared fixtures: the real web documents and tokenizers in ../shared/data."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

# Under pytest-xdist (`make test`'s first pass: 2 workers on 2 cores) each worker, and every
# run it starts, gets one core: two workers of 2 threads each would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KILN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    # Fail, not skip: these files are what the acceptance tests are about.
    assert SHARED_DATA.is_dir(), f"test data not found at {SHARED_DATA}; set KILN_SHARED_DATA"
    return SHARED_DATA


@pytest.fixture(scope="session")
def web_texts(shared_data) -> list[str]:
    """Every document of ../shared/data/web/*.json*.gz (real Common Crawl text)."""
    texts = []
    for path in sorted((shared_data / "web").glob("*.json*.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f if line.strip())
    assert len(texts) >= 20
    return texts


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """A module with a multi-process test (or a wall-clock limit) runs whole in `make test`'s
    serial pass: its module fixtures are then built once, not once per pass."""
    serial = {
        item.module.__name__
        for item in items
        if item.get_closest_marker("distributed") or item.get_closest_marker("serial")
    }
    for item in items:
        if item.module.__name__ in serial and not item.get_closest_marker("serial"):
            item.add_marker(pytest.mark.serial)

    # pytest-xdist's --dist loadfile hands out modules in collection order (`make test` turns
    # off its reordering by test count): a module that is one long fixture chain (minutes on
    # one worker) starts first, or it is the pass's tail while the other worker idles; a
    # `late` one last (it uses what a long chain builds, without waiting for it)
    def when(item) -> int:
        return (
            0
            if item.get_closest_marker("long_chain")
            else (2 if item.get_closest_marker("late") else 1)
        )

    items.sort(key=when)

"""Shared fixtures: the real web documents and tokenizers in ../shared/data."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

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

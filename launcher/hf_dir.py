"""What an HF model directory's ``config.json`` says about the model, read in one place.

Every stage that starts from a directory (``init.path``, a distillation teacher, a reward
model) asks here, so that a broken ``config.json`` is one config error naming the file, never
a traceback from deep in a check, and "is it a causal LM" means the same in every stage: an
entry of ``architectures`` that ends with ``ForCausalLM`` (transformers' own convention).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CAUSAL_LM = ("ForCausalLM",)
SEQUENCE_CLASSIFIER = ("ForSequenceClassification",)


class ConfigFileError(ValueError):
    """``config.json`` is missing, not JSON, or not the shape of an HF config."""


def read_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; ``ConfigFileError`` names the file and what is wrong
    (unreadable, not JSON, not an object, ``architectures`` not a list of strings)."""
    path = Path(folder) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot be read ({exc})") from exc
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ConfigFileError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigFileError(f"{path}: a JSON {type(config).__name__}, not an object")
    names = config.get("architectures")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        raise ConfigFileError(f"{path}: architectures is {names!r}, not a list of class names")
    return config


def config_problem(folder: str | Path) -> str | None:
    """Why ``folder/config.json`` is not a readable HF config, or None."""
    try:
        read_config(folder)
    except ConfigFileError as exc:
        return str(exc)
    return None


def architectures(folder: str | Path) -> list[str]:
    """The class names in ``config.json``'s ``architectures`` ([] when it names none)."""
    return list(read_config(folder).get("architectures") or [])


def is_architecture(folder: str | Path, suffixes: tuple[str, ...]) -> bool:
    """Whether one of the directory's architectures ends with one of ``suffixes``
    (``CAUSAL_LM``, ``SEQUENCE_CLASSIFIER``)."""
    return any(name.endswith(suffixes) for name in architectures(folder))

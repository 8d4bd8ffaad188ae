"""Stages (pretrain, sft, ...) plug into the launcher as entry points in group ``kiln.stages``.

A stage is a name, the config class it reads and a function that runs it. The launcher looks
stages up by name, so it never imports one it is not asked to run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from launcher.run_config import RunConfig

GROUP = "kiln.stages"


@dataclass(frozen=True)
class Stage:
    name: str
    config_class: type[RunConfig]
    run: Callable[[Any], Any]
    """Called with the validated config in every process of the job."""
    help: str = ""
    distributed: bool = False
    """Runs in several processes (through `accelerate launch`) when asked for."""
    export: Callable[[Path, Path, Any], Any] | None = None
    """Checkpoint folder -> plain HF directory (`kiln export`)."""
    merge_refusal: Callable[[Path], str | None] | None = None
    """Why a checkpoint folder cannot be exported as one plain model with its adapters merged
    (`kiln export --merge`), or None when it can; unset: every export is a plain model."""
    plan: Callable[[list[str]], int] | None = None
    """`kiln plan ARGS`: the memory planner of the stage's model, if it has one."""


def stage_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def find_stage(name: str) -> Stage:
    """The stage registered under ``name``; ``KeyError`` lists the ones that exist."""
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            stage = ep.load()
            if not isinstance(stage, Stage):
                raise TypeError(f"entry point {ep.value} is not a launcher.stages.Stage")
            return stage
    known = ", ".join(stage_names()) or "none (is the package installed? run `make setup`)"
    raise KeyError(f"unknown stage '{name}'; stages: {known}")

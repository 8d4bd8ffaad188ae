"""Typed run configuration: YAML recipes + presets + dotted overrides -> one validated object.

A run config is a pydantic model made of strict sections (unknown keys are errors). It is
assembled from:

* a YAML file, which may start from other files with ``extends: base.yaml`` (a path relative
  to the file, or to the repository's ``configs/`` folder);
* section presets: ``model: small`` (or ``model: {extends: small, n_layers: 8}``) loads
  ``configs/model/small.yaml`` into the ``model`` section;
* command-line overrides ``optim.lr=3e-4 data.sources.0.weight=2 model=125m``, applied in order.

Every problem found on the way (YAML syntax, unknown key, wrong type, impossible combination)
is collected with the dotted key and the file and line it came from, then raised once as
``ConfigError`` before any process starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from launcher import atomic
from launcher.config_files import (
    CONFIG_ROOT,
    ConfigError,
    Origins,
    Problem,
    build_tree,
    display_path,
    model_class,
)

__all__ = ["CONFIG_ROOT", "ConfigError", "Problem", "Section", "load_config"]


class Section(BaseModel):
    """Base of every config section: strict keys, attribute docstrings as field help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    def problems(self) -> Iterable[tuple[str, str]]:
        """Cross-field checks: yield ``(key relative to this section, message)``."""
        return ()


# -------------------------------------------------------------------------------- validation

S = TypeVar("S", bound=Section)


def _walk_loc(
    schema: type[BaseModel], tree: Any, loc: tuple
) -> tuple[list[str], type[BaseModel] | None]:
    """Turn a pydantic error location into tree keys (dropping union tags) and the model there."""
    keys: list[str] = []
    model: type[BaseModel] | None = schema
    node = tree
    for part in loc:
        if isinstance(node, dict) and part in node:
            keys.append(str(part))
            node = node[part]
            field = model.model_fields.get(str(part)) if model else None
            model = model_class(field.annotation) if field else None
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            keys.append(str(part))
            node = node[part]
        elif isinstance(part, str) and model and part in model.model_fields:
            keys.append(part)  # a missing key
            node = None
    return keys, model


def _where(origins: Origins, key: str) -> str:
    """Origin of a key, or of its nearest parent that has one."""
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return "default"


def _validation_problems(
    exc: ValidationError, schema: type[BaseModel], tree: dict, origins: Origins
) -> list[Problem]:
    problems = []
    for err in exc.errors():
        keys, _ = _walk_loc(schema, tree, err["loc"])
        key = ".".join(keys)
        if err["type"] == "extra_forbidden":
            _, parent = _walk_loc(schema, tree, err["loc"][:-1])
            allowed = list(parent.model_fields) if parent else []
            near = difflib.get_close_matches(keys[-1], allowed, n=1, cutoff=0.6)
            parent_key = ".".join(keys[:-1])
            if near:
                hint = f"did you mean '{parent_key + '.' if parent_key else ''}{near[0]}'?"
            else:
                hint = f"allowed keys here: {', '.join(allowed)}"
            message = f"unknown key; {hint}"
        elif err["type"] == "missing":
            message = "required key is missing"
        else:
            message = f"{err['msg']} (got {err['input']!r})"
        problems.append(Problem(key, message, _where(origins, key)))
    return problems


def _section_problems(obj: BaseModel, prefix: str = "") -> Iterator[tuple[str, str]]:
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            yield from _section_problems(value, f"{prefix}{name}.")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _section_problems(item, f"{prefix}{name}.{i}.")
    if isinstance(obj, Section):
        for key, message in obj.problems():
            yield f"{prefix}{key}", message


def _problems_of_valid_sections(
    schema: type[BaseModel], tree: dict, origins: Origins
) -> list[Problem]:
    """When the whole config is invalid, still report the cross-field problems of every
    section that is valid on its own (cross-section checks need the whole config)."""
    problems = []
    for name, field in schema.model_fields.items():
        section = model_class(field.annotation)
        if section is None or not isinstance(tree.get(name, {}), dict):
            continue
        try:
            valid = section.model_validate(tree.get(name, {}))
        except ValidationError:
            continue
        problems += [
            Problem(k, m, _where(origins, k)) for k, m in _section_problems(valid, f"{name}.")
        ]
    return problems


def load_config(
    schema: type[S],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> S:
    """Build a validated ``schema`` instance from a YAML file and dotted overrides.

    Raises ``ConfigError`` listing every problem, each with its dotted key and origin.
    """
    path = Path(path) if path is not None else None
    source = display_path(path) if path is not None else ""
    tree, origins, problems = build_tree(schema, path, overrides)
    try:
        config = schema.model_validate(tree)
    except ValidationError as exc:
        problems += _validation_problems(exc, schema, tree, origins)
        problems += _problems_of_valid_sections(schema, tree, origins)
        raise ConfigError(problems, source) from None
    problems += [Problem(k, m, _where(origins, k)) for k, m in _section_problems(config)]
    if problems:
        raise ConfigError(problems, source)
    return config


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML; ``load_config`` on it gives an equal object."""
    data = config.model_dump(mode="json")
    return (
        "# Fully resolved config written by kiln; loading it reproduces the run's settings.\n"
        + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    )


def save_config(config: BaseModel, run_dir: str | Path) -> Path:
    """Write ``config.yaml`` into ``run_dir`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(run_dir / "config.yaml", dump_config(config))

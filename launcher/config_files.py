"""Config files to one tree: YAML with line numbers, ``extends:``, section presets, overrides.

The tree is plain dicts and lists; beside it, ``Origins`` maps every dotted key to the file
and line (or the override) it came from, so a later validation error can say where to look.
Validation itself is ``launcher.config``'s job.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from launcher.errors import UserError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
"""Where presets (``configs/<section>/<name>.yaml``) and recipes live."""

Origins = dict[str, str]
"""dotted key -> where its value came from ("configs/x.yaml:12", "override 'a=1'")."""


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.key or '<root>'}: {self.message}"


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[Problem], source: str = ""):
        self.problems = problems
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in config"
        head += f" {source}" if source else ""
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


class _Loader(yaml.SafeLoader):
    """SafeLoader that records key lines, rejects duplicate keys and reads 3e-4 as a float."""

    key_lines: dict[int, tuple[dict, dict[str, int]]]


# YAML 1.1 (PyYAML) reads `3e-4` as a string; every ML config means a float.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    result: dict = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        lines[str(key)] = key_node.start_mark.line + 1
    loader.key_lines[id(result)] = (result, lines)
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parse_yaml(text: str, where: str) -> tuple[Any, Origins]:
    """Parse YAML; return the value and the origin ("where:line") of every dotted key."""
    loader = _Loader(text)
    loader.key_lines = {}
    try:
        value = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("", f"invalid YAML: {problem}", at)]) from None
    finally:
        loader.dispose()
    origins: Origins = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            _, lines = loader.key_lines.get(id(node), (None, {}))
            for k, v in node.items():
                key = f"{prefix}{k}"
                origins[key] = f"{where}:{lines[str(k)]}" if str(k) in lines else where
                walk(v, key + ".")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")

    walk(value, "")
    return value, origins


def _read_file(path: Path) -> tuple[dict, Origins]:
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [Problem("", f"cannot read config file: {exc.strerror}", where)]
        ) from None
    value, origins = _parse_yaml(text, where)
    if value is None:
        return {}, {}
    if not isinstance(value, dict):
        raise ConfigError([Problem("", "a config file must hold a mapping of keys", where)])
    return value, origins


# ----------------------------------------------------------------------------- tree assembly


def _prefixed(origins: Origins, prefix: str) -> Origins:
    return {f"{prefix}{k}" if k else prefix.rstrip("."): v for k, v in origins.items()}


def _drop_under(origins: Origins, key: str) -> None:
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]


def _merge(
    base: dict, over: dict, origins: Origins, over_origins: Origins, prefix: str = ""
) -> dict:
    """Deep-merge ``over`` into a copy of ``base``; mappings merge, everything else replaces."""
    out = dict(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, origins, over_origins, key + ".")
            if key in over_origins:
                origins.setdefault(key, over_origins[key])
        else:
            _drop_under(origins, key)
            out[k] = v
            origins.update(
                {o: w for o, w in over_origins.items() if o == key or o.startswith(key + ".")}
            )
    return out


def _find_file(ref: str, relative_to: Path | None, section: str = "") -> Path | None:
    """Where a reference points: a bare name in a section is ``configs/<section>/<name>.yaml``;
    a path (with a slash or a .yaml suffix) is looked up beside the referring file, then under
    ``configs/``, then from the working directory."""
    is_path = ref.endswith((".yaml", ".yml")) or "/" in ref
    if section and not is_path:
        candidates = [CONFIG_ROOT / section / f"{ref}.yaml"]
    else:
        name = Path(ref if is_path else f"{ref}.yaml")
        candidates = [relative_to / name] if relative_to is not None else []
        candidates += [CONFIG_ROOT / name, name]
    return next((c for c in candidates if c.is_file()), None)


def _presets(section: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / section).glob("*.yaml"))


def _load_preset(
    section: str, ref: str, relative_to: Path | None, where: str
) -> tuple[dict, Origins]:
    path = _find_file(ref, relative_to, section)
    if path is None:
        available = ", ".join(_presets(section)) or "none"
        near = difflib.get_close_matches(ref, _presets(section), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(
            [
                Problem(
                    section,
                    f"no preset '{ref}' in configs/{section}/ (available: {available}){hint}",
                    where,
                )
            ]
        )
    return _resolve_file(path, set(), section)


def _expand_sections(
    tree: dict, origins: Origins, relative_to: Path | None, schema: type[BaseModel]
) -> dict:
    """Replace ``section: name`` / ``section: {extends: name, ...}`` by the preset's content."""
    out = dict(tree)
    for name, value in tree.items():
        if not _is_section(schema, name):
            continue
        where = origins.get(name, "")
        if isinstance(value, str):
            preset, preset_origins = _load_preset(name, value, relative_to, where)
            _drop_under(origins, name)
            origins.update(_prefixed(preset_origins, name + "."))
            origins.setdefault(name, where)
            out[name] = preset
        elif isinstance(value, dict) and "extends" in value:
            body = {k: v for k, v in value.items() if k != "extends"}
            preset, preset_origins = _load_preset(name, str(value["extends"]), relative_to, where)
            own = {
                k: v
                for k, v in origins.items()
                if k.startswith(name + ".") and k != f"{name}.extends"
            }
            _drop_under(origins, name)
            merged_origins = _prefixed(preset_origins, name + ".")
            out[name] = _merge(preset, body, merged_origins, own, name + ".")
            origins.update(merged_origins)
            origins.setdefault(name, where)
    return out


def _is_section(schema: type[BaseModel], name: str) -> bool:
    field = schema.model_fields.get(name)
    return field is not None and model_class(field.annotation) is not None


def _resolve_file(
    path: Path, seen: set[Path], section: str = "", schema: type[BaseModel] | None = None
) -> tuple[dict, Origins]:
    """Read one file and everything it extends, bases first.

    With ``schema`` (a whole run config), each file's section presets are expanded before
    merging, so a child's ``model: {n_layers: 8}`` edits the base's ``model: small``.
    """
    path = path.resolve()
    if path in seen:
        raise ConfigError([Problem("extends", "circular extends", display_path(path))])
    tree, origins = _read_file(path)
    bases = tree.pop("extends", None)
    origins.pop("extends", None)
    if schema is not None:
        tree = _expand_sections(tree, origins, path.parent, schema)
    merged: dict = {}
    merged_origins: Origins = {}
    for ref in [bases] if isinstance(bases, str) else (bases or []):
        base_path = _find_file(str(ref), path.parent, section)
        if base_path is None:
            raise ConfigError(
                [Problem("extends", f"cannot find base config '{ref}'", display_path(path))]
            )
        base, base_origins = _resolve_file(base_path, seen | {path}, section, schema)
        merged = _merge(merged, base, merged_origins, base_origins)
    return _merge(merged, tree, merged_origins, origins), merged_origins


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
        raise ValueError("expected key=value with a dotted key, e.g. optim.lr=3e-4")
    value, _ = _parse_yaml(raw, f"override '{text}'") if raw.strip() else ("", {})
    return key.split("."), value


def _apply_override(tree: dict, origins: Origins, parts: list[str], value: Any, where: str) -> None:
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = int(part) if part.isdigit() else -1
            if not 0 <= index < len(node):
                raise ValueError(
                    f"'{'.'.join(parts[: depth + 1])}' is not an index of a {len(node)}-item list"
                )
            node = node[index]
        else:
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ValueError(f"'{'.'.join(parts)}' is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value
    key = ".".join(parts)
    _drop_under(origins, key)
    origins[key] = where


def model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple, dict):
        for arg in typing.get_args(annotation):
            found = model_class(arg)
            if found is not None:
                return found
    return None


def build_tree(
    schema: type[BaseModel], path: Path | None, overrides: typing.Iterable[str]
) -> tuple[dict, Origins, list[Problem]]:
    """Assemble the raw tree of a run config; bad overrides are returned as problems."""
    tree: dict = {}
    origins: Origins = {}
    if path is not None:
        tree, origins = _resolve_file(path, set(), schema=schema)
    problems: list[Problem] = []
    for text in overrides:
        where = f"override '{text}'"
        try:
            parts, value = _parse_override(text)
            if len(parts) == 1 and _is_section(schema, parts[0]) and isinstance(value, str):
                preset, preset_origins = _load_preset(parts[0], value, None, where)
                _drop_under(origins, parts[0])
                tree[parts[0]] = preset
                origins.update(_prefixed(preset_origins, parts[0] + "."))
                origins[parts[0]] = where
            else:
                _apply_override(tree, origins, parts, value, where)
        except ValueError as exc:
            problems.append(Problem(text.partition("=")[0], str(exc), where))
        except ConfigError as exc:
            problems.extend(exc.problems)
    return tree, origins, problems

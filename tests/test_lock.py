"""The versions a user installs are the versions CI tested: pyproject.toml's floors, the lock
(requirements/lock-cpu.txt, the constraints `make setup` installs with) and the environment
the tests run in must agree."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"


def _locked() -> dict[str, Version]:
    out = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, ver = line.partition("==")
        assert sep, f"{LOCK}:{n}: not an exact pin ('name==version'): {line!r}"
        out[canonicalize_name(name)] = Version(ver)
    return out


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return reqs + [Requirement(r) for r in project["optional-dependencies"]["dev"]]


def _floor(req: Requirement) -> Version | None:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_every_dependency_is_locked_within_its_range_and_its_floor_is_the_tested_series():
    locked = _locked()
    problems = []
    for req in _declared():
        name = canonicalize_name(req.name)
        if name not in locked:
            problems.append(f"{req.name}: declared in pyproject.toml but not in the lock")
            continue
        pin = locked[name]
        if not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}: the lock has {pin}, outside pyproject's '{req}'")
        floor = _floor(req)
        # A floor below the tested minor series promises versions nobody ran.
        if floor is None or floor.release[:2] != pin.release[:2]:
            problems.append(
                f"{req.name}: floor {floor} is not in the tested series {pin.major}.{pin.minor} "
                f"(lock {pin}); raise it in pyproject.toml"
            )
    assert not problems, "pyproject.toml and requirements/lock-cpu.txt disagree:\n" + "\n".join(
        problems
    )


def test_the_environment_is_the_locked_one():
    """`make setup` installs with the lock as constraints: any drift means it was bypassed
    (or the lock is stale: regenerate it with `make lock`)."""
    drift = []
    for name, pin in _locked().items():
        try:
            have = Version(version(name))
        except PackageNotFoundError:
            drift.append(f"{name}: locked {pin}, not installed")
            continue
        if Version(have.public) != pin:  # torch's "+cpu" local label is not a version change
            drift.append(f"{name}: locked {pin}, installed {have}")
    assert not drift, "\n".join(drift)

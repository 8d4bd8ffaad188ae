"""`kiln pipeline CONFIG`: stages chained into one command, each model the next one's parent.

A pipeline config lists stages (``{stage, config, overrides, nproc, parent, id}``). Every run
lives under ``<output_dir>/<name>/<id>/``; a stage's ``init.path`` is its parent's ``hf/``
(by default the stage before it; ``parent: null`` keeps the stage config's own), and an
override may name another stage's export as ``{hf:<id>}`` (PPO's reward model). ``prepare``
calls (``package.module:function`` with keyword arguments, e.g. the built-in fine-tuning data
of ``finetune.builtin:prepare``) run first; overrides name the path each returns as
``{<name>}``.

Before anything runs, every stage config is loaded with its own ``Stage.config_class`` and
every problem of every stage is reported at once (exit 2), except those of keys that name an
export a stage before it has yet to write (they are checked when that stage starts).

Each stage runs as its own ``python -m launcher STAGE CONFIG --nproc N`` process, its output in
``<name>/logs/<id>.log``; a stop signal sent to the pipeline goes to it (the stage saves and
stops; the pipeline then stops too). Re-running the command continues: a stage is finished
when its ``hf/kiln.json`` exists (the export writes it last) and ``pipeline.json`` records it
finished with the same config, the same parent weights (SHA-256) and the same prepared data
(its manifest, when the stage's config names the prepared path); a finished stage is
skipped, an interrupted one resumes from its checkpoints, and one whose config or parent
changed is *stale*: its run directory is set aside (renamed with a timestamp), never reused.
A stage that fails stops the pipeline: its id, exit status and log are printed (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import Field

from launcher import atomic
from launcher.config import CONFIG_ROOT, Section, load_config
from launcher.config_files import ConfigError, Problem
from launcher.report import write_report
from launcher.runner import LINEAGE, weight_digests
from launcher.signals import child_env
from launcher.stages import find_stage

STATE = "pipeline.json"
PLACEHOLDER = re.compile(r"\{hf:([A-Za-z0-9_.-]+)\}")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PipelineStage(Section):
    stage: str
    """A registered stage (`kiln --help` lists them)."""
    config: str
    """Its YAML config (relative to the working directory, else to the repository)."""
    overrides: list[str] = Field(default_factory=list)
    id: str | None = None
    """The stage's name in this pipeline and its run directory (default: ``stage``)."""
    nproc: int | None = Field(None, gt=0)
    """Processes (default: the pipeline's ``nproc``)."""
    parent: str | None = "previous"
    """The id whose ``hf/`` is this stage's ``init.path``; ``previous`` (default): the stage
    before it (none for the first); null: the stage config's own ``init.path``."""

    @property
    def name(self) -> str:
        return self.id or self.stage


class PrepareStep(Section):
    call: str
    """``package.module:function``, called with ``with`` as keyword arguments; it returns the
    path it prepared (``finetune.builtin:prepare``: the built-in fine-tuning data)."""
    with_: dict = Field(default_factory=dict, alias="with")
    name: str = "data"
    """Overrides name the returned path as ``{<name>}``."""


class PipelineConfig(Section):
    name: str = "pipeline"
    output_dir: str = "runs"
    nproc: int = Field(1, gt=0)
    prepare: list[PrepareStep] = Field(default_factory=list)
    """Calls made before the stages are checked (e.g. writing their data), in order."""
    stages: list[PipelineStage] = Field(min_length=1)


class Step:
    """One stage of a loaded pipeline: where it runs, its parent, its overrides."""

    def __init__(self, spec: PipelineStage, root: Path, parent: Step | None, nproc: int):
        self.spec, self.id, self.root = spec, spec.name, root
        self.prepared: dict[str, str] = {}  # {name} -> the path a prepare call returned
        self.parent = parent
        self.nproc = spec.nproc or nproc
        self.run_dir = root / self.id
        self.hf = self.run_dir / "hf"
        path = Path(spec.config)
        self.config = path if path.exists() or path.is_absolute() else CONFIG_ROOT.parent / path
        self.refs: dict[str, str] = {}  # key -> the id of the stage whose export it names

    def overrides(self, steps: dict[str, Step]) -> list[str]:
        out = [f"run.output_dir={self.root}", f"run.name={self.id}"]
        if self.parent is not None:
            out.append(f"init.path={self.parent.hf}")
        for item in self.spec.overrides:
            key = item.split("=", 1)[0].strip()
            for ref in PLACEHOLDER.findall(item):
                self.refs[key] = ref
            item = PLACEHOLDER.sub(lambda m: str(steps[m.group(1)].hf), item)
            for name, value in self.prepared.items():
                item = item.replace(f"{{{name}}}", value)
            out.append(item)
        return [*out, f"dist.num_processes={self.nproc}"]

    def command(self, steps: dict[str, Step]) -> list[str]:
        head = [sys.executable, "-m", "launcher", self.spec.stage, str(self.config)]
        return [*head, "--nproc", str(self.nproc), *self.overrides(steps)]


def load_pipeline(path: str | Path) -> tuple[PipelineConfig, list[Step]]:
    """The pipeline's config and steps; ``ConfigError`` for a bad pipeline file (unknown
    stage, duplicate id, a parent or ``{hf:id}`` that names no stage before it)."""
    cfg = load_config(PipelineConfig, path)
    root = Path(cfg.output_dir) / cfg.name
    steps: dict[str, Step] = {}
    problems: list[Problem] = []
    previous = None
    for i, spec in enumerate(cfg.stages):
        key = f"stages.{i}"
        if spec.name in steps:
            problems.append(Problem(f"{key}.id", f"{spec.name!r} is used twice"))
        try:
            find_stage(spec.stage)
        except KeyError as exc:
            problems.append(Problem(f"{key}.stage", exc.args[0]))
        parent = None
        if spec.parent == "previous":
            parent = previous
        elif spec.parent is not None:
            parent = steps.get(spec.parent)
            if parent is None:
                problems.append(Problem(f"{key}.parent", f"no stage {spec.parent!r} before it"))
        for ref in (r for o in spec.overrides for r in PLACEHOLDER.findall(o)):
            if ref not in steps:
                problems.append(Problem(f"{key}.overrides", f"{{hf:{ref}}}: no stage before it"))
        step = Step(spec, root, parent, cfg.nproc)
        steps[spec.name] = previous = step
    if problems:
        raise ConfigError(problems, str(path))
    return cfg, list(steps.values())


def prepare(cfg: PipelineConfig) -> dict[str, str]:
    """Make every ``prepare`` call; ``{name: returned path}``. A call that cannot be imported
    or fails is a ``ConfigError`` naming its entry."""
    import importlib

    prepared = {}
    for i, step in enumerate(cfg.prepare):
        module_name, _, attr = step.call.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attr)
            prepared[step.name] = str(function(**step.with_))
        except Exception as exc:  # the user's call: any failure is this entry's problem
            problem = Problem(f"prepare.{i}", f"{step.call}: {type(exc).__name__}: {exc}")
            raise ConfigError([problem]) from exc
    return prepared


def check_all(steps: list[Step]) -> list[str]:
    """Every problem of every stage config, as printable lines; keys that name an export not
    written yet are left to the stage's own start."""
    by_id = {s.id: s for s in steps}
    lines = []
    for step in steps:
        overrides = step.overrides(by_id)
        pending = {k for k, ref in step.refs.items() if not by_id[ref].hf.is_dir()}
        config_class = find_stage(step.spec.stage).config_class
        if step.parent is not None and not config_class.loads_init:
            lines.append(
                f"stage {step.id} ({step.spec.stage}): parent: {step.parent.id!r} would not be "
                "read (this stage starts from its own seeded model); give it parent: null"
            )
            pending.add("init.path")  # said once, above
        if step.parent is not None and not step.parent.hf.is_dir():
            pending.add("init.path")
        try:
            load_config(config_class, step.config, overrides)
        except ConfigError as exc:
            for problem in exc.problems:  # a key under a pending one is pending too
                if not any(problem.key == k or problem.key.startswith(f"{k}.") for k in pending):
                    lines.append(f"stage {step.id} ({step.spec.stage}): {problem}")
    return lines


def _state(root: Path) -> dict:
    path = root / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(root: Path, state: dict) -> None:
    atomic.write_text(root / STATE, json.dumps(state, indent=2) + "\n")


def identity(step: Step, steps: dict[str, Step]) -> dict:
    """What a finished stage's output depends on: its config and its inputs' weights."""
    stage = find_stage(step.spec.stage)
    config = load_config(stage.config_class, step.config, step.overrides(steps))
    inputs = {}
    if step.parent is not None:
        inputs["init.path"] = weight_digests(step.parent.hf)
    for key, ref in sorted(step.refs.items()):
        inputs[key] = weight_digests(steps[ref].hf)
    resolved = json.dumps(config.model_dump(mode="json"))
    for name, path in sorted(step.prepared.items()):
        if path in resolved:  # the stage reads what this prepare call wrote
            inputs[f"prepare:{name}"] = prepared_digest(Path(path))
    return {"config": config.fingerprint(), "inputs": inputs}


def prepared_digest(path: Path) -> str:
    """What a prepare call wrote, in short: its ``manifest.json``'s SHA-256 (the built-in data
    writes one, last), else of its files' names, sizes and modification times."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    listing = [(str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size,
                f.stat().st_mtime_ns) for f in files if f.exists()]  # fmt: skip
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def set_aside(run_dir: Path) -> Path:
    aside = run_dir.with_name(f"{run_dir.name}-stale-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    return aside


def run_step(step: Step, steps: dict[str, Step], log: Path) -> tuple[int, int | None]:
    """Run the stage's process, its output into ``log``; (exit status, the stop signal the
    pipeline received and passed on, or None)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        proc.send_signal(signum)

    with open(log, "ab") as out:
        # its own session: a terminal's Ctrl-C reaches the pipeline alone, which passes it on
        # once (twice would be "stop now" to the stage)
        # child_env: the stage stops (saves, frees its run directory) if the pipeline dies,
        # even by SIGKILL, instead of running on unseen and refusing the re-run
        proc = subprocess.Popen(
            step.command(steps),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env(),
        )
        previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code, (received[0] if received else None)


def run_pipeline(cfg: PipelineConfig, steps: list[Step]) -> int:
    root = Path(cfg.output_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    by_id = {s.id: s for s in steps}
    state = _state(root)
    for step in steps:
        try:
            wanted = identity(step, by_id)
        except ConfigError as exc:  # checks that needed its parent's export
            print(f"kiln: stage {step.id} ({step.spec.stage}): {exc}", file=sys.stderr)
            return 2
        saved = state.get(step.id, {})
        same = {k: saved.get(k) for k in wanted} == wanted
        finished = (step.hf / LINEAGE).is_file() and saved.get("finished") and same
        if finished:
            print(f"[kiln] pipeline {step.id}: finished earlier, skipped", flush=True)
            continue
        log = root / "logs" / f"{step.id}.log"
        if step.run_dir.exists() and not same:
            aside = set_aside(step.run_dir)
            if log.is_file():  # its log goes with it
                log.rename(log.with_name(f"{aside.name}.log"))
            print(f"[kiln] pipeline {step.id}: its config or parent changed; the old run is "
                  f"set aside as {aside}", flush=True)  # fmt: skip
        state[step.id] = {**wanted, "finished": False}
        _save_state(root, state)
        print(f"[kiln] pipeline {step.id}: kiln {step.spec.stage} {step.config} "
              f"--nproc {step.nproc} (log: {log})", flush=True)  # fmt: skip
        started = time.time()
        code, stopped_by = run_step(step, by_id, log)
        seconds = time.time() - started
        if stopped_by is not None:
            print(f"[kiln] pipeline stopped during {step.id} (signal {stopped_by}, exit "
                  f"{code}); run the same command again to continue", flush=True)  # fmt: skip
            return code or 128 + stopped_by
        if code != 0 or not (step.hf / LINEAGE).is_file():
            why = f"exit status {code}" if code else "no export (it stopped early)"
            print(f"kiln pipeline: stage {step.id} ({step.spec.stage}) failed: {why}; its log: "
                  f"{log}", file=sys.stderr)  # fmt: skip
            return 1
        state[step.id] = {**wanted, "finished": True, "seconds": round(seconds, 1)}
        _save_state(root, state)
        print(f"[kiln] pipeline {step.id}: done in {seconds:.0f} s -> {step.hf}", flush=True)
    report = write_report(root, [(s.id, s.spec.stage) for s in steps])
    print(f"[kiln] pipeline {cfg.name}: every stage finished; report: {report}", flush=True)
    print(report.read_text().split("\n## ")[0], flush=True)  # the table
    return 0


def pipeline_main(argv: list[str]) -> int:
    """`kiln pipeline CONFIG [--check]`."""
    parser = argparse.ArgumentParser(prog="kiln pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--check", action="store_true", help="validate every stage, run nothing")
    args = parser.parse_args(argv)
    try:
        cfg, steps = load_pipeline(args.config)
    except ConfigError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2
    try:  # before the checks: stage configs name what they write
        prepared = prepare(cfg)
    except ConfigError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2
    for step in steps:
        step.prepared = prepared
    problems = check_all(steps)
    if problems:
        print(f"kiln: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the "
              f"stages of {args.config}:", file=sys.stderr)  # fmt: skip
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 2
    if args.check:
        print(f"[kiln] pipeline {cfg.name}: {len(steps)} stages, every config valid")
        return 0
    return run_pipeline(cfg, steps)

"""How fast are checkpoints? Measures, and prints as a markdown report:

1. save and load of a ZeRO-3 checkpoint on 2 ranks through the framework's own code
   (``launcher.persist.save``; ``persist._check`` + ``persist.load``, exactly what
   ``checkpoint.resume=<path>`` runs) against a plain ``torch.save`` / ``torch.load`` of the
   same tensors (each parameter's full fp32 value and both Adam moments), in MB/s, with a
   per-phase breakdown (ZeRO-3 gather, safetensors write, SHA-256, fsync, commit, ...);
2. the time to the first training step after resuming a run at step 10 and at step 2000
   (tiny model, 2 ranks): the data stream must resume in O(1) of its position.

Both parts run the real entry points under ``accelerate launch`` with 2 processes, built by
``launcher.launch.accelerate_command`` (what ``python -m launcher pretrain ... --nproc 2``
runs), and assert the world size and ZeRO stage they got. Inside the workers this script only
wraps functions with timers. Medians over alternating rounds (the machine may be shared).
About 6 minutes on 2 cores (`--profile N` adds cProfile tables of a save and a load):

    python benchmarks/checkpoint.py [--model small] [--rounds 3] [--steps 2000] [--out DIR]
"""

from __future__ import annotations

import time

_STARTED = time.time()  # before the heavy imports: a worker's "process start" includes them

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import median as med  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
NAME = "bench"
QUIET = [
    "metrics.wandb=false",
    "metrics.progress_bar=false",
    "metrics.log_every=1",
    "eval.every=null",
    "eval.max_batches=2",  # the end-of-run evaluation is not what we measure
]


def corpus(args) -> list[str]:
    """One built-in corpus for every run. 20000 documents (27.5 MB of text) by default, so
    that at step 2000 (2.05M tokens) every reader is deep inside its files, not back at the
    start of an epoch."""
    return [
        f"data.builtin.dir={args.out}/corpus-{args.docs}",
        f"data.builtin.docs={args.docs}",
        "data.builtin.shards=8",
    ]


# ------------------------------------------------------------------------------- timing tools


class Profile:
    """Exclusive wall time per label of wrapped functions: a wrapped call's time minus the
    time of wrapped calls inside it, so nested phases (fsync inside commit) are not counted
    twice and the labels add up to the outermost call."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []

    def wrap(self, owner, attr: str, label: str):
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._children.append(0.0)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.seconds[label] += dt - self._children.pop()
                if self._children:
                    self._children[-1] += dt

        setattr(owner, attr, timed)
        return original

    def pop(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (and only these: others on the machine are timing
    things too), so that loads read from disk as after a restart. Pages must be clean first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ workers


def _worker_config(spec: dict):
    from launcher.config import load_config
    from launcher.launch import world_overrides
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, spec["config"], spec["overrides"] + world_overrides())


def save_load_worker(spec: dict) -> None:
    """Part 1, on every rank: build the trainer as the pretrain stage does, take a few steps,
    then alternate our save/load with torch.save/torch.load of the same tensors."""
    import logging

    import torch

    from launcher import checkpoint, persist, snapshot
    from launcher.loop import Trainer
    from launcher.runtime import build_runtime, seed_everything
    from pretrain.prepare import prepare_inputs
    from pretrain.task import PretrainTask

    logging.basicConfig(level=logging.WARNING)
    cfg = _worker_config(spec)
    rt = build_runtime(cfg)
    # A multi-process benchmark that silently ran as two worlds of one would time nothing real.
    assert (rt.world_size, rt.zero_stage) == (2, 3), (rt.world_size, rt.zero_stage)
    seed_everything(cfg.run.seed, rt.rank)
    if rt.is_main:
        prepare_inputs(cfg)
    rt.barrier()
    task = PretrainTask(cfg, rt)
    trainer = Trainer(cfg, rt, task, callbacks=[])
    trainer.setup()
    params = list(trainer.engine.module.parameters())
    assert all(hasattr(p, "ds_id") for p in params), "not partitioned by ZeRO-3"
    trainer.batches = iter(trainer.loader)
    trainer.engine.train()
    for _ in range(spec["train_steps"]):  # real, non-zero Adam moments
        trainer.train_step()

    prof = Profile()
    captured: list[dict] = []  # the tensor dicts our save hands to safetensors: the baseline's
    original_save_file = snapshot.save_file

    def save_file(tensors, *args, **kwargs):
        if len(captured) < 2:
            captured.append(tensors)
        return original_save_file(tensors, *args, **kwargs)

    snapshot.save_file = save_file
    wraps = [
        (persist, "save", "other (mkdirs, JSON parts, config copy, prune, log)"),
        (snapshot, "ensure_moments", "ensure_moments"),
        (snapshot.Master, "get", "gather: safe_get_full_* (ZeRO-3 all-gather, copy to CPU)"),
        (snapshot, "save_file", "safetensors serialize + write"),
        (snapshot, "save_rng", "RNG state"),
        (trainer.task, "save_extras", "tokenizer copy"),
        (checkpoint, "sha256_file", "SHA-256 of written/loaded files"),
        (checkpoint, "fsync_path", "fsync (files, folder, parent)"),
        (persist, "commit", "commit: manifest write, rename, latest (excl. fsync)"),
        (persist, "_gather", "all_gather_object (hash shares / verify results)"),
        (rt, "barrier", "barrier (waiting for the other rank)"),
        (persist, "_check", "verify: other (manifest read)"),
        (persist, "load", "load: other (trainer.json, rank parts, log)"),
        (snapshot, "load_weights", "read safetensors (open, index, get_tensor)"),
        (snapshot.Master, "set", "set: safe_set_full_* + GatheredParameters (ZeRO-3)"),
        (trainer.task, "load_state_dict", "data state"),
        (snapshot, "load_rng", "RNG state"),
    ]
    for owner, attr, label in wraps:
        prof.wrap(owner, attr, label)

    root = persist.checkpoint_root(trainer)
    base = cfg.run_dir / "torch-baseline"
    base.mkdir(exist_ok=True)
    mine = base / f"rank-{rt.rank}.pt"
    shares = [base / f"rank-{r}.pt" for r in range(rt.world_size)]

    def ours_save(profiler: cProfile.Profile | None = None) -> float:
        if rt.is_main:  # a re-save of the same step would delete the old folder while timed
            shutil.rmtree(checkpoint.step_dir(root, trainer.state.step), ignore_errors=True)
        rt.barrier()
        prof.pop()
        t0 = time.perf_counter()
        with profiler or contextlib.nullcontext():
            persist.save(trainer, "benchmark")  # ends with a barrier: the slowest rank's time
        return time.perf_counter() - t0

    def torch_save() -> tuple[float, float]:
        mine.unlink(missing_ok=True)
        tensors = {k: v for part in captured for k, v in part.items()}
        rt.barrier()
        t0 = time.perf_counter()
        torch.save(tensors, mine)
        rt.barrier()
        t1 = time.perf_counter()
        checkpoint.fsync_path.__wrapped__(mine)  # the unwrapped one: not in our breakdown
        rt.barrier()
        return t1 - t0, time.perf_counter() - t0

    def cold(paths: list[Path]) -> None:
        if rt.is_main:
            evict(paths)
        rt.barrier()

    def ours_load(folder: Path, profiler: cProfile.Profile | None = None) -> float:
        cold(files_under(folder))
        prof.pop()
        t0 = time.perf_counter()
        with profiler or contextlib.nullcontext():
            persist._check(folder, trainer)  # what resume() runs for checkpoint.resume=<path>
            persist.load(trainer, folder)
            rt.barrier()
        return time.perf_counter() - t0

    def torch_load() -> float:
        cold(shares)
        t0 = time.perf_counter()
        # Our load needs every tensor on every rank (safe_set_full_* takes full values), so
        # the baseline reads every rank's share too: the same bytes per rank.
        loaded = [torch.load(p, weights_only=True) for p in shares]
        rt.barrier()
        del loaded
        return time.perf_counter() - t0

    ours_save()  # warm-up, untimed: first-call costs, and the tensors to compare with
    folder = checkpoint.step_dir(root, trainer.state.step)
    ours_load(folder)
    rounds = []
    for r in range(spec["rounds"]):
        row: dict = {}
        for what in ("ours", "torch") if r % 2 == 0 else ("torch", "ours"):
            if what == "ours":
                row["save"] = ours_save()
                row["save_phases"] = prof.pop()
            else:
                row["torch_save"], row["torch_save_fsync"] = torch_save()
        for what in ("ours", "torch") if r % 2 == 0 else ("torch", "ours"):
            if what == "ours":
                row["load"] = ours_load(folder)
                row["load_phases"] = prof.pop()
            else:
                row["torch_load"] = torch_load()
        rounds.append(row)
    profiles = {}
    if spec["profile"]:  # cProfile of one more save and load, rank 0 (both ranks take part)
        for kind, fn in (("save", ours_save), ("load", lambda p: ours_load(folder, p))):
            profiler = cProfile.Profile()
            fn(profiler)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(spec["profile"])
            profiles[kind] = text.getvalue()
    everyone = [None] * rt.world_size
    torch.distributed.all_gather_object(everyone, rounds)
    if rt.is_main:
        manifest = checkpoint.read_manifest(folder)["files"]
        tensor_files = [n for n in manifest if n.endswith(".safetensors") and "rng" not in n]
        result = {
            "rounds": everyone,
            "world_size": rt.world_size,
            "zero_stage": rt.zero_stage,
            "params": sum(p.ds_numel for p in params),
            "tensors": 3 * len(params),
            "profiles": profiles,
            "checkpoint_bytes": sum(f["bytes"] for f in manifest.values()),
            "tensor_bytes": sum(manifest[n]["bytes"] for n in tensor_files),
            "files": len(manifest),
            "torch_bytes": sum(p.stat().st_size for p in shares),
        }
        Path(spec["result"]).write_text(json.dumps(result))
    rt.barrier()


def resume_worker(spec: dict) -> None:
    """Part 2, on every rank: the real CLI entry point (``launcher.cli.main``, what workers of
    ``python -m launcher pretrain ... --nproc 2`` run), with timers on its phases; rank 0
    writes the timeline as soon as its first training step after the resume is done."""
    from accelerate import Accelerator

    import launcher.runner
    import pretrain.train
    from launcher import cli, persist, snapshot
    from launcher.data.loader import StreamLoader
    from launcher.loop import Trainer
    from pretrain.task import PretrainTask

    imported = time.time()
    marks: dict[str, list[float]] = {}

    def mark(owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0, c0 = time.time(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:  # the first call only
                marks.setdefault(label, [t0, time.time(), c0, time.process_time()])

        setattr(owner, attr, timed)

    mark(launcher.runner, "build_runtime", "runtime: Accelerator + process group")
    mark(pretrain.train, "prepare_inputs", "prepare: config, corpus and tokenizer (reused)")
    mark(PretrainTask, "__init__", "task: tokenizer, corpus listing, validation set")
    mark(PretrainTask, "build_model", "model build (seeded init)")
    mark(Accelerator, "prepare", "DeepSpeed engine (accelerator.prepare)")
    mark(persist, "resume", "resume")
    mark(persist, "_check", "resume: verify (manifest, SHA-256 of a share)")
    mark(snapshot, "load_weights", "resume: weights + Adam moments")
    mark(PretrainTask, "load_state_dict", "resume: data state")

    original_iter = StreamLoader.__iter__

    def timed_iter(self):
        it = original_iter(self)
        # The trainer's first next(): the DataLoader worker starts, its reader reopens the
        # files at their saved offsets and fills a batch; an O(position) resume shows here.
        t0, c0 = time.time(), time.process_time()
        try:
            first = next(it)
            marks["first batch (worker start, readers reopen at their offsets)"] = [
                t0,
                time.time(),
                c0,
                time.process_time(),
            ]
            yield first
            yield from it
        finally:
            it.close()  # the DataLoader's workers are shut down with it

    StreamLoader.__iter__ = timed_iter
    original_step = Trainer.train_step

    def timed_step(self):
        t0, c0 = time.time(), time.process_time()
        original_step(self)
        if "first step" not in marks:
            marks["first step"] = [t0, time.time(), c0, time.process_time()]
            if self.runtime.is_main:
                timeline = {
                    "launched": spec["launched"],
                    "script": _STARTED,
                    "imported": imported,
                    "step": self.state.step,
                    "world_size": self.runtime.world_size,
                    "resumed_from": str(self.resumed_from),
                    "marks": marks,
                }
                Path(spec["result"]).write_text(json.dumps(timeline))
            # What a run does after its first step (evaluate, save, export) is not measured;
            # every collective of the step is complete on both ranks, so both may leave now,
            # but shut the DataLoader worker down first: orphaned, it never exits (its queue's
            # feeder thread blocks on a pipe nobody reads).
            self.batches.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    Trainer.train_step = timed_step
    code = cli.main(["pretrain", spec["config"], *spec["overrides"]])
    if code:
        raise SystemExit(code)


# ------------------------------------------------------------------------------- orchestrator


def _env() -> dict[str, str]:
    from launcher.launch import launch_env

    return launch_env({"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})


def launch_worker(kind: str, spec: dict, out: Path, zero_stage: int) -> dict:
    """Run this script's worker ``kind`` on 2 processes with the accelerate command that
    ``python -m launcher pretrain ... --nproc 2`` would run; returns rank 0's result."""
    from launcher.launch import accelerate_command

    command = accelerate_command(
        "pretrain", spec["config"], spec["overrides"], nproc=2, nodes=1, zero_stage=zero_stage
    )
    tail = len(command) - 1 - command[::-1].index("-m")  # "-m launcher pretrain CONFIG ..."
    result, spec_path, log = (out / f"{kind}-{x}" for x in ("result.json", "spec.json", "log"))
    result.unlink(missing_ok=True)
    command = [*command[:tail], str(Path(__file__).resolve()), "--worker", kind, str(spec_path)]
    spec_path.write_text(json.dumps({**spec, "result": str(result), "launched": time.time()}))
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=out, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not result.exists():
        sys.exit(f"{kind} worker failed (exit {done.returncode}); see {log}:\n" + _tail(log))
    return json.loads(result.read_text())


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def cli_run(out: Path, *overrides: str) -> float:
    """``python -m launcher pretrain tiny.yaml --nproc 2 ...``, as the tests run it."""
    command = [sys.executable, "-m", "launcher", "pretrain", str(TINY), "--nproc", "2"]
    command += [f"run.output_dir={out}", f"run.name={NAME}", *QUIET, *overrides]
    log = out / "train.log"
    t0 = time.time()
    with open(log, "a") as f:
        done = subprocess.run(command, cwd=out, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"training run failed (exit {done.returncode}); see {log}:\n" + _tail(log))
    return time.time() - t0


def world_sizes(run_dir: Path) -> set[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["dist/world_size"] for line in lines if line.strip()}


def part_save_load(args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "config": str(TINY),
        "overrides": [
            f"model={args.model}",
            f"run.output_dir={out}",
            f"run.name={NAME}",
            *corpus(args),
            "dist.zero_stage=3",
            "data.num_workers=0",  # a forked worker would copy the rank's memory, for nothing
            "checkpoint.resume=none",
            "checkpoint.every=null",
            *QUIET,
        ],
        "rounds": args.rounds,
        "train_steps": 2,
        "profile": args.profile,
    }
    return launch_worker("save-load", spec, out, zero_stage=3)


def part_resume(args, out: Path) -> dict:
    """Train to step ``early``, set its checkpoint aside, go on to ``args.steps``; then time
    resuming from each, alternating, each from a fresh copy of the run directory."""
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    common = [*corpus(args), "checkpoint.every=null"]
    early, late = args.early, args.steps
    horizon = f"train.max_steps={late + 1000}"  # room for a step after each resume
    kept = out / f"step-{early}"
    sources = {early: kept, late: train / NAME / "checkpoints" / f"step-{late:08d}"}
    timings = {}
    if not (args.reuse and all((s / "manifest.json").is_file() for s in sources.values())):
        shutil.rmtree(train / NAME, ignore_errors=True)
        timings["train_early"] = cli_run(train, *common, horizon, f"train.stop_after={early}")
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(train / NAME / "checkpoints" / f"step-{early:08d}", kept)
        timings["train_late"] = cli_run(train, *common, horizon, f"train.stop_after={late - early}")
        assert world_sizes(train / NAME) == {2.0}, world_sizes(train / NAME)
        assert (sources[late] / "manifest.json").is_file(), "no checkpoint at the late step"

    rounds: dict[int, list[dict]] = {early: [], late: []}
    for r in range(args.resume_rounds):
        for step in (early, late) if r % 2 == 0 else (late, early):
            where = out / f"resume-{step}"
            shutil.rmtree(where, ignore_errors=True)
            run_dir = where / NAME
            # A fresh copy of the run with only that checkpoint: `auto` finds it, as after a
            # crash; the copy is made before the clock starts.
            shutil.copytree(
                train / NAME,
                run_dir,
                ignore=shutil.ignore_patterns("checkpoints", "hf", "metrics*.jsonl", "wandb"),
            )
            shutil.copytree(sources[step], run_dir / "checkpoints" / f"step-{step:08d}")
            spec = {
                "config": str(TINY),
                "overrides": [
                    f"run.output_dir={where}",
                    f"run.name={NAME}",
                    *QUIET,
                    *common,
                    horizon,
                    "train.stop_after=1",
                    "checkpoint.resume=must",
                ],
            }
            timeline = launch_worker("resume", spec, where, zero_stage=2)
            assert timeline["world_size"] == 2 and timeline["step"] == step + 1, timeline
            rounds[step].append(timeline)
    return {
        "timings": timings,
        "rounds": rounds,
        "early": early,
        "late": late,
        "docs": args.docs,
        "data_only": data_resume_costs(train / NAME, sources, args.resume_rounds),
    }


def data_resume_costs(run_dir: Path, sources: dict[int, Path], rounds: int) -> dict:
    """The data stream alone, in this process (no DataLoader worker, no other rank): load
    the saved states of all ranks, then take each rank's first batch. With exact resume the
    reader reopens its file at the saved gzip member and skips at most one member's bytes, so
    this must not grow with the position."""
    from launcher.config import load_config
    from launcher.data.loader import StreamLoader
    from launcher.data.sources import resolve_corpus
    from launcher.data.tokenizer import TextTokenizer
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, str(run_dir / "config.yaml"), ["data.num_workers=0"])
    tok, corpus = TextTokenizer.load(run_dir / "tokenizer"), resolve_corpus(cfg.data)
    out = {}
    for step, folder in sources.items():
        parts = [
            json.loads((folder / f"rank-{r:05d}.json").read_text())["task"]["data"]
            for r in range(2)
        ]
        seconds = []
        for _ in range(rounds):
            for rank in range(2):
                loader = StreamLoader(
                    cfg.data, tok, corpus, batch_size=4, seed=cfg.run.seed, rank=rank, world_size=2
                )
                t0 = time.perf_counter()
                loader.load_state_dict(parts)
                next(iter(loader))
                seconds.append(time.perf_counter() - t0)
        starts = [
            cursor["current"]["start"]
            for part in parts
            for reader in part["readers"].values()
            for cursor in reader["cursors"]
            if cursor.get("current")
        ]
        out[step] = {"seconds": seconds, "starts": starts}
    return out


# ---------------------------------------------------------------------------------- report


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    found = (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return next(found, platform.processor() or "?")


def secs(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def report_save_load(res: dict, model: str) -> None:
    rank0 = res["rounds"][0]

    def m(key: str) -> float:
        return med(r[key] for r in rank0)

    def runs(key: str) -> str:
        return ", ".join(f"{r[key]:.2f}" for r in rank0)

    mb, tmb = res["checkpoint_bytes"] / 1e6, res["torch_bytes"] / 1e6
    print(
        f"\n### 1. ZeRO-3 save and load, `{model}` preset ({res['params'] / 1e6:.1f}M parameters), "
        f"{res['world_size']} ranks, ZeRO-{res['zero_stage']}\n"
    )
    print(
        f"Checkpoint: {res['files']} files, {mb:.1f} MB ({res['tensor_bytes'] / 1e6:.1f} MB "
        f"of fp32 weights + Adam moments in safetensors, {res['tensors']} tensors); the "
        f"`torch.save` baseline writes the same tensors, one file per rank, {tmb:.1f} MB. "
        f"Loads are cold: the files are evicted from the page cache first (fadvise). "
        f"Medians of {len(rank0)} alternating rounds, seconds on rank 0 (every timing "
        f"ends with a barrier, so it is the slower rank's).\n"
    )
    print("| measurement | median | MB/s | vs baseline | runs (s) |\n|---|---|---|---|---|")
    save, tsave, tfsync = m("save"), m("torch_save"), m("torch_save_fsync")
    load, tload = m("load"), m("torch_load")
    print(
        f"| ours: `persist.save` (gather, safetensors, SHA-256, fsync, manifest, rename) "
        f"| {secs(save)} | {mb / save:,.0f} | {save / tsave:.2f}x `torch.save`, "
        f"{save / tfsync:.2f}x with fsync | {runs('save')} |"
    )
    print(
        f"| `torch.save` of the same tensors | {secs(tsave)} | {tmb / tsave:,.0f} | 1 "
        f"| {runs('torch_save')} |"
    )
    print(
        f"| `torch.save` + fsync | {secs(tfsync)} | {tmb / tfsync:,.0f} | 1 "
        f"| {runs('torch_save_fsync')} |"
    )
    print(
        f"| ours: verify + `persist.load` (SHA-256 share, read, set ZeRO-3 partitions, "
        f"data/RNG) | {secs(load)} | {mb / load:,.0f} | {load / tload:.2f}x `torch.load` "
        f"| {runs('load')} |"
    )
    print(
        f"| `torch.load` of every rank's file on every rank | {secs(tload)} "
        f"| {tmb / tload:,.0f} | 1 | {runs('torch_load')} |"
    )
    for kind, total in (("save", save), ("load", load)):
        labels = sorted(
            {k for rounds in res["rounds"] for r in rounds for k in r[f"{kind}_phases"]},
            key=lambda k: -med(r[f"{kind}_phases"].get(k, 0.0) for r in rank0),
        )
        print(f"\n{kind.capitalize()} time by phase (exclusive seconds, median per rank):\n")
        ranks = range(len(res["rounds"]))
        print("| phase | " + " | ".join(f"rank {i}" for i in ranks) + " | share (rank 0) |")
        print("|---|" + "---|" * len(ranks) + "---|")
        for label in labels:
            per = [
                med(r[f"{kind}_phases"].get(label, 0.0) for r in rounds) for rounds in res["rounds"]
            ]
            print(
                f"| {label} | " + " | ".join(f"{x:.3f}" for x in per) + f" | {per[0] / total:.0%} |"
            )

    for kind, text in res["profiles"].items():
        print(f"\ncProfile of one more {kind}, rank 0, by own time:\n\n```")
        lines = text.strip().splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls"))
        print("\n".join([lines[0].strip(), *lines[start:]]))
        print("```")


def _at(timeline: dict, name: str, end: bool, cpu: bool = False) -> float:
    if name in ("launched", "script", "imported"):
        return 0.0 if cpu else timeline[name]  # CPU time counts from the process start
    return timeline["marks"][name][(1 if end else 0) + (2 if cpu else 0)]


TOKENS_PER_STEP = 8 * 128  # configs/pretrain/tiny.yaml: global batch 8 x seq_len 128


def report_resume(res: dict, goal: float) -> dict[str, float]:
    early, late = res["early"], res["late"]
    n = len(res["rounds"][early])
    t = res["timings"]
    trained = (
        f"Training to {early}: {t['train_early']:.0f} s, on to {late}: {t['train_late']:.0f} s "
        f"(`python -m launcher pretrain ... --nproc 2`). "
        if t
        else "The trained run of a previous invocation was reused. "
    )
    print(f"\n### 2. Time to first step after resume: step {early} vs step {late}\n")
    print(
        f"`tiny` model, 2 ranks, ZeRO-2, 1 DataLoader worker per rank, built-in corpus of "
        f"{res['docs']} documents (by step {late} the 2 readers have packed "
        f"{late * TOKENS_PER_STEP / 1e6:.2f}M tokens from their shares of it). {trained}Each "
        f"resume starts from a fresh copy of the run holding only that checkpoint "
        f"(`checkpoint.resume=must`). Wall seconds on rank 0, medians of {n} alternating "
        f"rounds; a phase is the first call of the wrapped function. CPU rows: rank 0's own "
        f"CPU seconds (its DataLoader worker is another process), which the other users of a "
        f"shared machine disturb less than wall time.\n"
    )
    spans = [
        ("**process start -> first step done**", "launched", "first step", False),
        ("**resume start -> first step done**", "resume", "first step", False),
        ("process start -> first step done, CPU", "launched", "first step", True),
        ("resume start -> first step done, CPU", "resume", "first step", True),
        (
            "process start -> script running (python, accelerate launch)",
            "launched",
            "script",
            False,
        ),
        ("imports (torch, deepspeed, transformers, ...)", "script", "imported", False),
    ]
    spans += [(name, name, name, False) for name in res["rounds"][early][0]["marks"]]
    print(f"| span | at {early} | at {late} | ratio | runs at {early} (s) | runs at {late} (s) |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for label, start, end, cpu in spans:
        runs = {
            step: [
                _at(tl, end, True, bool(cpu)) - _at(tl, start, False, bool(cpu))
                for tl in res["rounds"][step]
            ]
            for step in (early, late)
        }
        a, b = med(runs[early]), med(runs[late])
        ratios[label] = b / a if a > 1e-6 else float("nan")
        print(
            f"| {label} | {secs(a)} | {secs(b)} | {ratios[label]:.2f} | "
            + " | ".join(", ".join(f"{x:.2f}" for x in runs[step]) for step in (early, late))
            + " |"
        )
    data = res["data_only"]
    a, b = (med(data[step]["seconds"]) for step in (early, late))
    starts = "; ".join(
        f"at {step}: " + ", ".join(json.dumps(s) for s in data[step]["starts"])
        for step in (early, late)
    )
    print(
        f"| data stream alone, in-process: `load_state_dict` + first batch of each rank "
        f"| {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {b / a:.2f} | "
        + " | ".join(", ".join(f"{x * 1e3:.1f}" for x in data[s]["seconds"]) for s in (early, late))
        + f" (ms) |\n\nWhere the readers reopen (file position: line, gzip member offset, bytes "
        f"to skip after it): {starts}."
    )
    whole, resumed = ratios[spans[0][0]], ratios[spans[1][0]]
    met = "met" if max(whole, resumed) <= goal else "NOT met"
    print(
        f"\nGoal: time to the first step after resuming at {late} <= {goal}x that at {early}: "
        f"**{met}** ({whole:.2f}x from process start, {resumed:.2f}x from resume start)."
    )
    return ratios


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec = json.loads(Path(sys.argv[3]).read_text())
        {"save-load": save_load_worker, "resume": resume_worker}[sys.argv[2]](spec)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help="model preset for the save/load part")
    ap.add_argument("--rounds", type=int, default=3, help="save/load rounds (medians)")
    ap.add_argument("--steps", type=int, default=2000, help="the late resume point")
    ap.add_argument("--early", type=int, default=10, help="the early resume point")
    ap.add_argument("--resume-rounds", type=int, default=5, help="resumes from each point")
    ap.add_argument("--docs", type=int, default=20000, help="built-in corpus documents")
    ap.add_argument("--out", default="/tmp/kiln-ckpt-bench", help="runs and checkpoints here")
    ap.add_argument("--profile", type=int, default=0, help="cProfile: top N of a save, a load")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse the trained run of a previous invocation"
    )
    ap.add_argument("--skip", choices=["save-load", "resume"], help="leave out one part")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    import deepspeed
    import torch

    print("\n## kiln checkpoint benchmark\n")
    print("| machine | |\n|---|---|")
    print(f"| CPU | {cpu_model()} |\n| cores | {len(os.sched_getaffinity(0))} usable |")
    print(f"| torch | {torch.__version__} |\n| deepspeed | {deepspeed.__version__} |")
    print(f"| python | {platform.python_version()} |")
    print(f"| disk | {out} ({shutil.disk_usage(out).free / 1e9:.0f} GB free) |")
    if args.skip != "save-load":
        shutil.rmtree(out / "save-load", ignore_errors=True)
        report_save_load(part_save_load(args, out / "save-load"), args.model)
        shutil.rmtree(out / "save-load", ignore_errors=True)  # 0.2-1.5 GB of checkpoints
    if args.skip != "resume":
        if not args.reuse:
            shutil.rmtree(out / "resume", ignore_errors=True)
        report_resume(part_resume(args, out / "resume"), goal=1.2)
    print(f"\nTotal {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()

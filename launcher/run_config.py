"""The stage-independent sections of every run config: run, train, optim, schedule, dist,
eval, metrics. Stages subclass ``RunConfig`` and add their own (model, tokenizer, data...)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from launcher.config import Section
from launcher.hf_dir import ConfigFileError, config_problem, read_config
from launcher.metrics import MetricsConfig


class RunSection(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Run name; outputs go to ``<output_dir>/<name>/``."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 1234
    """Seed for model init, data order and everything else random."""


_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$")
_SECONDS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


class TrainSection(Section):
    global_batch_size: int = Field(32, gt=0)
    """Sequences per optimizer step, summed over all ranks and accumulation steps."""
    micro_batch_size: int = Field(8, gt=0)
    """Sequences per forward/backward on one rank."""
    max_steps: int = Field(100, gt=0)
    """Loop steps to run: optimizer steps, unless the task takes several per step (PPO over a
    rollout); the learning-rate schedule spans the optimizer steps of all of them."""
    epochs: int | None = Field(None, gt=0)
    """Passes over a finite training set (fine-tuning): the horizon is then epochs x the
    task's steps per epoch, instead of max_steps."""
    max_tokens: int | None = Field(None, gt=0)
    """Stop after this many training tokens instead, if that comes first (the schedule then
    ends there too)."""
    stop_after: int | None = Field(None, gt=0)
    """Stop (saving a checkpoint, marked resumable) after this many steps of this launch; the
    schedule still runs to max_steps (like Megatron's exit interval: fixed-length job slots)."""
    max_time: float | None = Field(None, gt=0)
    """Stop (saving a checkpoint) after this wall time: seconds, or "90m", "2h", "1.5d"."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPUs that support it, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more time."""
    compile: bool = False
    """torch.compile the model (first steps are slow while it compiles)."""
    max_consecutive_skips: int = Field(5, gt=0)
    """Stop the run when this many optimizer steps in a row had a non-finite loss or gradient
    norm (each is skipped: parameters and optimizer state stay as they were)."""

    @field_validator("max_time", mode="before")
    @classmethod
    def _parse_time(cls, value):
        if isinstance(value, str):
            match = _TIME.match(value)
            if not match:
                raise ValueError('expected seconds or a time like "90m", "2h", "1.5d"')
            return float(match.group(1)) * _SECONDS[match.group(2)]
        return value

    def horizon(self, tokens_per_step: int, steps_per_epoch: int | None = None) -> int:
        """Optimizer steps the run (and its schedule) will take."""
        steps = self.max_steps
        if self.epochs is not None:
            if steps_per_epoch is None:
                raise ValueError("train.epochs: the task streams its data (no epoch length)")
            steps = self.epochs * steps_per_epoch
        if self.max_tokens is None:
            return steps
        return min(steps, -(-self.max_tokens // tokens_per_step))


class OptimSection(Section):
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay (not applied to norms, biases and embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""


class ScheduleSection(Section):
    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Shape after warmup: cosine or linear decay, warmup-stable-decay, or constant."""
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd only: fraction of the steps spent decaying at the end."""


class DistSection(Section):
    num_processes: int = Field(1, gt=0)
    """Processes per node (one per GPU)."""
    num_nodes: int = Field(1, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 data parallel, 1 shards optimizer states, 2 also gradients,
    3 also parameters."""
    offload_optimizer: bool = False
    """ZeRO >= 1: keep optimizer states (and the update) on the CPU."""
    offload_params: bool = False
    """ZeRO-3: keep parameters on the CPU between uses."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Under bf16: the dtype gradients are accumulated over micro-batches and reduced across
    ranks in. fp32 (as Megatron and torchtitan do) is exact to fp32 rounding but holds fp32
    gradient buffers (`kiln plan` shows the cost); bf16 halves them and the traffic. ZeRO-0:
    DeepSpeed 0.19 accumulates in bf16 either way, only the all-reduce follows this."""

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_nodes


class EvalSection(Section):
    every: Annotated[int, Field(gt=0)] | Literal["epoch"] | None = 100
    """Evaluate every this many steps, or every epoch (a task with an epoch length), and
    always at the end; null: only at the end."""
    max_batches: int | None = Field(None, gt=0)
    """Evaluate on at most this many batches per rank (null: the whole validation set)."""
    at_start: bool = False
    """Also evaluate the untrained start (the parent) before the first step, logged at step 0:
    each metric's first value is the stage's "before" (the pipeline's report shows both)."""


class BestSection(Section):
    metric: str = Field(..., min_length=1)
    """An evaluation metric, e.g. eval/loss."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (loss) or higher (accuracy) is better."""


class CheckpointSection(Section):
    every: int | None = Field(500, gt=0)
    """Save every this many steps (and always at the end and when stopped early)."""
    keep_last: int = Field(2, gt=0)
    """Keep the newest this many checkpoints (older ones are deleted after a save succeeds)."""
    keep_every: int | None = Field(None, gt=0)
    """Also keep, for good, every checkpoint whose step is a multiple of this."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint of this run, or start fresh (saying
    so); must: fail if there is none; none: start fresh; or a checkpoint directory path."""
    verify: bool = True
    """Check every file against the manifest's SHA-256 before loading."""
    best: BestSection | None = None
    """Keep the checkpoint of the best evaluation ({metric, mode}) as `checkpoints/best`, never
    pruned; the stage exports it instead of the last step's."""
    grace: int = Field(300, ge=10)
    """Seconds between a stop signal and the kill (Slurm: `--signal=B:USR1@grace`); the
    launcher gives the workers this less a margin (up to 30 s) to save a checkpoint."""


class InitSection(Section):
    path: str | None = None
    """An HF model directory the stage starts from (e.g. a pretraining run's runs/NAME/hf/):
    checked before any process starts; its config.json gives the model width, its kiln.json
    and weights' digests go into the new model's lineage."""
    keep_zeros: bool = False
    """Weights that are exactly 0 in the starting model stay 0 (their gradients are masked):
    the recovery training of a pruned export (`kiln compress`, variant ``unstructured``)."""

    def problems(self) -> Iterable[tuple[str, str]]:
        if self.path is None:
            if self.keep_zeros:
                yield "keep_zeros", "keeps the zeros of a starting model: set init.path too"
            return
        folder = Path(self.path)
        if not folder.is_dir():
            yield "path", f"{folder}: no such directory (an HF model directory is expected)"
        elif not (folder / "config.json").is_file():
            yield "path", f"{folder}: no config.json, so not an HF model directory"
        elif (problem := config_problem(folder)) is not None:
            yield "path", problem
        elif not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            yield "path", f"{folder}: no weights (*.safetensors or *.bin) beside config.json"

    def hidden_size(self) -> int | None:
        if self.path is None:
            return None
        try:
            config = read_config(self.path)
        except ConfigFileError:
            return None
        size = config.get("hidden_size", config.get("d_model"))
        return size if isinstance(size, int) else None


class RunConfig(Section):
    """The stage-independent part of every run config; stages subclass it."""

    run: RunSection = RunSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    dist: DistSection = DistSection()
    eval: EvalSection = EvalSection()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointSection = CheckpointSection()
    init: InitSection = InitSection()

    loads_init: ClassVar[bool] = True
    """Whether the stage builds its model from ``init.path``. A stage that does not
    (pretraining starts from its seeded init) refuses one instead of leaving it unread, and
    `kiln pipeline` refuses to give it a parent."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.dist.world_size)

    def problems(self) -> Iterable[tuple[str, str]]:
        per_step = self.train.micro_batch_size * self.dist.world_size
        if self.train.global_batch_size % per_step:
            fix = max(per_step, round(self.train.global_batch_size / per_step) * per_step)
            yield (
                "train.global_batch_size",
                f"{self.train.global_batch_size} is not divisible by train.micro_batch_size "
                f"({self.train.micro_batch_size}) x world size ({self.dist.world_size}) = "
                f"{per_step}; use a multiple of {per_step} (e.g. {fix}) or change "
                "train.micro_batch_size",
            )
        if self.init.path is not None and not self.loads_init:
            yield (
                "init.path",
                f"this stage starts from the seeded init of its `model` and would not read "
                f"{self.init.path} (continued pretraining from an export is not supported): "
                "remove init.path (in a pipeline, give this stage `parent: null`)",
            )
        if self.init.keep_zeros and self.dist.zero_stage == 3:
            yield (
                "init.keep_zeros",
                "gradient masks are not tested under ZeRO-3 (it partitions the weights before "
                "they are masked); use dist.zero_stage 0, 1 or 2 for the recovery",
            )
        if self.dist.offload_params and self.dist.zero_stage != 3:
            yield "dist.offload_params", "parameter offload needs dist.zero_stage: 3"
        if self.dist.offload_optimizer and self.dist.zero_stage == 0:
            yield "dist.offload_optimizer", "optimizer offload needs dist.zero_stage >= 1"
        if self.train.epochs is None and self.schedule.warmup_steps >= self.train.max_steps:
            yield (
                "schedule.warmup_steps",
                f"{self.schedule.warmup_steps} warmup steps leave nothing of train.max_steps "
                f"({self.train.max_steps}); lower schedule.warmup_steps",
            )

    def model_width(self) -> int | None:
        """The model's hidden size, known before it is built: DeepSpeed's ZeRO buffers are
        sized from it (launcher.runtime.SIZED_BY_MODEL). A stage's config says it (from its
        model section, or its parent's config.json); None: DeepSpeed's defaults."""
        return self.init.hidden_size()

    def fingerprint(self) -> str:
        """A short hash of the resolved config, recorded beside checkpoints."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

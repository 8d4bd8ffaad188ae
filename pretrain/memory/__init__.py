"""`kiln plan`: per-GPU memory of a pretraining run before anything is launched (closed
forms checked against DeepSpeed's live allocations; ``zero.py`` says how).

``model.py`` describes the model (parameter tensors from a preset), ``zero.py`` models what
each ZeRO stage allocates, ``cli.py`` is the command line and the printed table.
"""

from pretrain.memory.cli import build_parser, format_plan, main, parse_memory
from pretrain.memory.model import PlanError, Tensor, load_model, param_tensors
from pretrain.memory.zero import (
    CONTEXT_BYTES,
    DS_DEFAULTS,
    FRAGMENTATION,
    Activations,
    GiB,
    Plan,
    Setup,
    activation_bytes,
    deepspeed_knobs,
    knobs_from,
    plan,
)

__all__ = [
    "CONTEXT_BYTES",
    "DS_DEFAULTS",
    "FRAGMENTATION",
    "Activations",
    "GiB",
    "Plan",
    "PlanError",
    "Setup",
    "Tensor",
    "activation_bytes",
    "build_parser",
    "deepspeed_knobs",
    "format_plan",
    "knobs_from",
    "load_model",
    "main",
    "param_tensors",
    "parse_memory",
    "plan",
]

"""What a run prints: kiln's own lines, the progress bar and real problems; `--verbose` for all.

Libraries announce things a kiln user cannot act on. Each one is turned off where it starts,
and only that one, so that their real warnings still show:

- DeepSpeed's "Setting accelerator to CPU" (every process that imports it, the launcher's
  too): ``DS_ACCELERATOR=cpu`` where DeepSpeed would fall back to the CPU anyway.
- torchrun's OMP_NUM_THREADS banner: ``launch.launch_env`` sets the variable itself.
- ``FutureWarning``s of torch.distributed about APIs that DeepSpeed calls: a warnings filter.
- DeepSpeed's "untested optimizer" (ours is AdamW with a non-finite skip): a logging filter.
- wandb's banner and summary: ``WANDB_SILENT`` offline (kiln prints where the run is),
  ``WANDB_QUIET`` online (keeps the run's URL and wandb's warnings).
- transformers' "Writing model shards" bars: ``HF_HUB_DISABLE_PROGRESS_BARS``.
- torchao's "Failed to load ..." for each GPU kernel library it cannot load (CPU machines)
  and torch's deprecation note about an Enum torchao registers: a logging filter.
- torch's elastic agent forwarding a stop signal ("Received SIGUSR1 death signal", "Sending
  process N closing signal"): a logging filter in launcher/agent.py.

The environment defaults go into ``os.environ``, so the launcher and every worker started
from this process inherit them (and `--verbose`, as ``KILN_VERBOSE=1``); a variable the user
set is left alone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

VERBOSE_ENV = "KILN_VERBOSE"
"""Set to 1 by `--verbose`; the workers read it."""

QUIET_LOG_MESSAGES = {
    "DeepSpeed": (
        "Setting accelerator to CPU",  # the import-time guess, when DS_ACCELERATOR is unset
        "You are using ZeRO with an untested optimizer",
    ),
    # torchao (imported by transformers and peft whenever it is installed) on a machine
    # without its GPU kernels, and torch about an Enum torchao registers: once per process
    "torchao": ("Failed to load",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),  # a logger's filter is its own
    "torch.utils._pytree": ("%s is an Enum subclass",),
}
"""Logger name -> messages (prefixes after leading '*' and spaces) dropped unless verbose."""

QUIET_AGENT_MESSAGES = {
    "torch.distributed.elastic.agent.server.api": ("Received %s death signal",),
    "torch.distributed.elastic.multiprocessing.api": (
        "Sending process %s closing signal",
        "Closing process %s via signal",
    ),
}
"""torch's elastic agent announcing that it forwards a stop signal to the workers: what a
preemption is meant to do, not a problem (launcher/agent.py). Its warnings when a worker
does not exit in time ("Unable to shutdown process ...") still show."""

# Packages through which DeepSpeed finds an accelerator other than CUDA (its real_accelerator)
_ACCELERATOR_PLUGINS = (
    "torch_npu",
    "torch_sdaa",
    "habana_frameworks",
    "torch_mlu",
    "torch_supa",
    "torch_xmlir",
)


def setup(verbose: bool = False, config: object | None = None) -> bool:
    """Configure this process's console: kiln's log lines (INFO on rank 0, WARNING on the
    others) and, unless verbose (here or in a parent via ``KILN_VERBOSE``), the filters and
    environment defaults above. ``config`` (a run config) tells whether wandb runs online.
    Returns whether the output is verbose."""
    verbose = verbose or os.environ.get(VERBOSE_ENV) == "1"
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return True
    for key, value in quiet_env(_wandb_mode(config)).items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
    for name in QUIET_LOG_MESSAGES:
        logging.getLogger(name).addFilter(_drop_known_messages)  # added once: same object
    return False


def quiet_env(wandb_mode: str | None = None) -> dict[str, str]:
    """Environment defaults that keep libraries' banners off the console."""
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "WANDB_QUIET": "true"}
    if wandb_mode != "online":
        env["WANDB_SILENT"] = "true"
    if not has_accelerator():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def has_accelerator() -> bool:
    """Whether DeepSpeed's own detection would find an accelerator (so not fall back to the
    CPU): CUDA or ROCm, XPU, MPS, or an accelerator plugin package."""
    import torch

    if torch.cuda.is_available():
        return True
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return True
    if torch.backends.mps.is_available():
        return True
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _wandb_mode(config: object | None) -> str | None:
    metrics = getattr(config, "metrics", None)
    resolve = getattr(metrics, "resolved_wandb_mode", None)
    return resolve() if callable(resolve) else None


def _drop_known_messages(record: logging.LogRecord) -> bool:
    message = str(record.msg).lstrip("* ")
    return not message.startswith(QUIET_LOG_MESSAGES.get(record.name, ()))


def drop_agent_messages(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(QUIET_AGENT_MESSAGES.get(record.name, ()))

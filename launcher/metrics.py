"""Metrics: ``record(name, value, reduce=...)`` from anywhere; ``Metrics.flush`` reduces across
ranks (one collective per reduce operation) and writes ``{name: float}`` to the sinks on the
main rank (``launcher/sinks.py``: metrics.jsonl, wandb, a progress bar). Also step timing and
peak memory."""

from __future__ import annotations

import logging
import netrc
import os
import resource
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import Field

from launcher.config import Section

log = logging.getLogger(__name__)

_REDUCERS = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax, "min": torch.amin}
REDUCES = (*_REDUCERS, "last")
# Across ranks, mean/sum/last share one sum collective (see Metrics.flush).
_COLLECTIVE = {"mean": "sum", "sum": "sum", "last": "sum", "max": "max", "min": "min"}
AllReduce = Callable[[torch.Tensor, str], None]


class MetricsConfig(Section):
    log_every: int = Field(10, gt=0)
    """Optimizer steps between flushes (cross-rank reduction and writing to the sinks)."""
    wandb: bool = True
    """Log to Weights & Biases (through Accelerate's tracker) besides metrics.jsonl."""
    wandb_project: str = "kiln"
    """wandb project the run is logged under."""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = online if WANDB_API_KEY is set or ~/.netrc has api.wandb.ai, else offline."""
    progress_bar: bool = True
    """Show a progress bar with ETA, loss, lr and tokens/s on the main rank."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s of one device for MFU; null = datasheet table for known GPUs, else measured."""

    def resolved_wandb_mode(self) -> Literal["online", "offline", "disabled"]:
        """The wandb mode to run with: ``auto`` decided by whether an API key is available."""
        if not self.wandb:
            return "disabled"
        if self.wandb_mode != "auto" or os.environ.get("WANDB_API_KEY"):
            return "online" if self.wandb_mode == "auto" else self.wandb_mode
        try:
            path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
            found = netrc.netrc(path).authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            found = False
        return "online" if found else "offline"


_current: Metrics | None = None


def record(name: str, value: float | torch.Tensor, reduce: str = "mean") -> None:
    """Record ``value`` under ``name`` in the active ``Metrics``; a no-op when none is active.

    ``reduce`` (one of mean, sum, max, min, last) says how values are combined, both over the
    steps since the last flush on one rank and across ranks. A tensor must hold one element
    and is kept as it is: no device sync happens here. Raises ``ValueError`` for an unknown
    ``reduce`` or a name recorded with two different ones.
    """
    if _current is not None:
        _current.record(name, value, reduce)


class Sink(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class Metrics:
    """Holds what ``record`` collected on this rank and reduces it across ranks on ``flush``.

    ``all_reduce(tensor, op)`` reduces a float64 tensor in place with op "sum", "max" or "min"
    over all ranks (the runtime moves it to the collective's device and back); it may be None
    only when ``world_size`` is 1. Only the main rank writes to its sinks; all close them.
    """

    def __init__(
        self,
        *,
        run_dir: Path | None,
        is_main: bool,
        world_size: int,
        all_reduce: AllReduce | None,
        sinks: list[Sink],
    ) -> None:
        if world_size > 1 and all_reduce is None:
            raise ValueError(f"world_size is {world_size} but no all_reduce was given")
        self.run_dir = run_dir
        self.is_main = is_main
        self.world_size = world_size
        self.sinks = sinks
        self._all_reduce = all_reduce if world_size > 1 else None
        self._values: dict[str, list[float | torch.Tensor]] = defaultdict(list)
        self._reduce: dict[str, str] = {}
        self._device: torch.device | None = None  # of the first tensor recorded
        self._previous: list[Metrics | None] = []
        self._restored: set[str] = set()  # names whose values came from a checkpoint

    def activate(self) -> Metrics:
        global _current
        self._previous.append(_current)
        _current = self
        return self

    def deactivate(self) -> None:
        global _current
        if _current is self:
            _current = self._previous.pop() if self._previous else None

    def __enter__(self) -> Metrics:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, name: str, value: float | torch.Tensor, reduce: str = "mean") -> None:
        """See the module-level ``record``."""
        if reduce not in REDUCES:
            raise ValueError(f"metric {name!r}: reduce must be one of {REDUCES}, got {reduce!r}")
        if name in self._restored and self._reduce[name] != reduce:
            self._drop_restored(name, self._reduce[name], reduce)
        if self._reduce.setdefault(name, reduce) != reduce:
            raise ValueError(
                f"metric {name!r} recorded with reduce={reduce!r} after {self._reduce[name]!r}"
            )
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {name!r} must be a scalar, got shape {value.shape}")
            if self._device is None:
                self._device = value.device
            value = value.detach()
        if reduce == "last":
            self._values[name] = [value]  # only the last one is ever needed
        else:
            self._values[name].append(value)

    def state_dict(self) -> dict[str, dict]:
        """This rank's values recorded since the last flush, as JSON: a checkpoint taken
        between two flushes keeps them, so that the resumed run's next line is the one an
        uninterrupted run writes (``restore``). Each value remembers whether it was a tensor:
        ``_local`` puts tensors before floats, and the order of a sum must not change."""
        out = {}
        for name, values in self._values.items():
            tensors = [v.reshape(1).double() for v in values if isinstance(v, torch.Tensor)]
            exact = iter(torch.cat(tensors).tolist() if tensors else [])  # one sync per name
            out[name] = {
                "reduce": self._reduce[name],
                "values": [
                    [next(exact), True] if isinstance(v, torch.Tensor) else [float(v), False]
                    for v in values
                ],
            }
        return out

    def restore(self, saved: dict[str, dict]) -> None:
        """Put back values ``state_dict`` saved, before any recorded since (they came first).
        A name this run records with another reduce (a changed metric) keeps only its new
        values, with a warning: a resume does not fail over a metric."""
        for name, entry in saved.items():
            reduce = entry["reduce"]
            if self._reduce.setdefault(name, reduce) != reduce:
                self._drop_restored(name, reduce, self._reduce[name])
                continue
            self._restored.add(name)
            values = [
                torch.tensor(v, dtype=torch.float64) if was_tensor else v
                for v, was_tensor in entry["values"]
            ]
            if reduce == "last":
                self._values[name] = self._values.get(name) or values[-1:]
            else:
                self._values[name] = values + self._values.get(name, [])

    def _drop_restored(self, name: str, saved: str, now: str) -> None:
        """A metric whose reduce changed between the checkpoint and this run (a new version):
        its restored values are left out, with a warning; a resume never fails over it."""
        log.warning(
            "metric %r: the checkpoint recorded it with reduce=%r, this run with %r: its values "
            "from before the resume are left out",
            name,
            saved,
            now,
        )
        self._restored.discard(name)
        if self._reduce.get(name) == saved:
            self._values.pop(name, None)
            self._reduce.pop(name, None)

    def _local(self, name: str) -> torch.Tensor:
        """This rank's aggregate of ``name`` as a 0-dim float64 tensor on ``self._device``."""
        tensors = [v for v in self._values[name] if isinstance(v, torch.Tensor)]
        floats = [float(v) for v in self._values[name] if not isinstance(v, torch.Tensor)]
        parts = [v.reshape(1).to(self._device or "cpu", torch.float64) for v in tensors]
        x = torch.cat([*parts, self._vector(floats)])  # one host-to-device copy per name
        reduce = self._reduce[name]
        return x[-1] if reduce == "last" else _REDUCERS[reduce](x)

    def _vector(self, values: list[float]) -> torch.Tensor:
        """A float64 vector on the device of the recorded tensors (CPU if there were none)."""
        return torch.tensor(values, dtype=torch.float64).to(self._device or "cpu")

    def _check_same_names(self, names: list[str]) -> None:
        # Checked first with a fixed-size collective: mismatched sizes would hang, not fail.
        signature = "\n".join(f"{n}\t{self._reduce[n]}" for n in names)
        crc = float(zlib.crc32(signature.encode()))  # exact in float64
        check = self._vector([crc, -crc])
        self._all_reduce(check, "max")  # max(crc) and -min(crc) in one collective
        high, neg_low = check.tolist()
        if high != -neg_low:
            listed = ", ".join(f"{n}({self._reduce[n]})" for n in names) or "nothing"
            raise RuntimeError(
                "metrics: ranks recorded different metric names since the last flush; every "
                "rank must record the same names with the same reduce between flushes. "
                f"This rank (main={self.is_main}) recorded: {listed}"
            )

    def _reduce_across_ranks(self, op: str, group: list[str]) -> torch.Tensor:
        stacked = torch.stack([self._local(n) for n in group])
        if self._all_reduce is None:
            return stacked
        kinds = [self._reduce[n] for n in group]
        if op == "sum":  # factors, not boolean masks: mask indexing would sync with the device
            stacked *= self._vector([float(self.is_main or k != "last") for k in kinds])
        self._all_reduce(stacked, op)
        if op == "sum":
            stacked /= self._vector([self.world_size if k == "mean" else 1.0 for k in kinds])
        return stacked

    def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Reduce what was recorded since the last flush, write it to the sinks, clear it.

        Per name, this rank's values are combined by its reduce; across ranks "mean" is the
        mean of the ranks' means, "sum", "max" and "min" are what they say, and "last" is the
        main rank's last value (summed with zeros from the others, so every rank returns the
        same dict). That is at most one sum, one max and one min collective (names stacked in
        sorted order) after a two-element check that all ranks recorded the same names, and
        one host sync. ``extra`` (already global values, e.g. timings) is added as it is.

        Returns ``{"step": step, **metrics, **extra}`` on every rank. Raises ``RuntimeError``
        on every rank if the ranks recorded different names.
        """
        names = sorted(self._values)
        try:
            if self._all_reduce is not None:
                self._check_same_names(names)
            ordered: list[str] = []
            results: list[torch.Tensor] = []
            for op in ("sum", "max", "min"):
                group = [n for n in names if _COLLECTIVE[self._reduce[n]] == op]
                if group:
                    ordered += group
                    results.append(self._reduce_across_ranks(op, group))
            values = torch.cat(results).tolist() if results else []  # the one host sync
        finally:
            self._values.clear()
            self._reduce.clear()
            self._restored.clear()
            self._device = None
        out: dict[str, float] = {"step": step}
        out.update(sorted(zip(ordered, values, strict=True)))
        out.update(extra or {})
        for sink in self.sinks if self.is_main else ():
            sink.write(step, out)
        return out

    def close(self) -> None:
        """Deactivate and close the sinks."""
        self.deactivate()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


# ------------------------------------------------------------------------ memory and timing


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on ``device``: CUDA's max allocated bytes, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


class StepTimer:
    """Wall time per named phase (``with timer.phase("data_wait"):``), summed until ``pop``.
    CUDA is asynchronous: without ``sync=True`` a phase measures the time to queue its kernels;
    with it, the device is synchronized at each phase boundary (which costs speed)."""

    def __init__(self, *, sync: bool = False, device: torch.device | None = None) -> None:
        self.sync = sync and torch.cuda.is_available() and (device is None or device.type == "cuda")
        self.device = device
        self._totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self._totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last ``pop``, and start over."""
        totals, self._totals = dict(self._totals), defaultdict(float)
        return totals

"""Where metrics go, on the main rank: ``metrics.jsonl`` (``JsonlSink``), Weights & Biases
through Accelerate (``WandbSink``, with the config logged ``redact``-ed) and a progress bar
(``ProgressBar``). Each has ``write(step, metrics)`` and ``close()`` (``launcher.metrics.Sink``)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from accelerate import Accelerator


class JsonlSink:
    """Appends one JSON object per flush to ``path`` (normally ``<run_dir>/metrics.jsonl``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if _ends_mid_line(self.path):  # a line cut by a kill or a full disk stays on its own
            self._file.write("\n")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()  # a crash or requeue keeps every flushed line

    def close(self) -> None:
        self._file.close()


def _ends_mid_line(path: Path) -> bool:
    with path.open("rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` (none if there is no file). A line that is no JSON
    object (cut by a kill or a full disk, edited) is left out with a warning naming
    ``path:line``: a report is still written from the others."""
    if not path.is_file():
        return []
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as exc:
            row = exc
        if isinstance(row, dict):
            rows.append(row)
        else:
            print(f"[kiln] warning: {path}:{number}: not a JSON object, left out ({text[:60]!r})",
                  file=sys.stderr)  # fmt: skip
    return rows


_SECRET_KEY = re.compile(r"secret|password|passwd|apikey|credential")  # searched without "_"
# A key ending in the word "token" (hf_token, authToken), but not a count (max_tokens), an id
# (bos_token_id) or a tokenizer's special token (bos_token: "<s>").
_TOKEN_KEY = re.compile(r"(?:^|_)token$")
_SPECIAL_TOKEN_KEY = re.compile(r"(?:^|_)(?:bos|eos|pad|unk|sep|cls|mask|special|start|end)_token$")
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def _is_secret_key(key: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()  # authToken -> auth_token
    words = re.sub(r"[^a-z0-9]+", "_", words)
    if _SECRET_KEY.search(words.replace("_", "")):
        return True
    return bool(_TOKEN_KEY.search(words)) and not _SPECIAL_TOKEN_KEY.search(words)


def redact(config: dict) -> dict:
    """A copy of ``config`` safe to log: at any depth, a value (not None) under a key naming a
    secret (token, secret, password, api_key, apikey, credential) becomes "***", and the user
    info of URLs in any string too (``https://user:pass@host`` -> ``https://***@host``)."""
    return _redact(config)


def _redact(value: Any, secret: bool = False) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, _is_secret_key(str(k))) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(v, secret) for v in value)
    if secret and value is not None:
        return "***"
    return _URL_USERINFO.sub(r"\1***@", value) if isinstance(value, str) else value


class WandbSink:
    """Logs through Accelerate's wandb tracker; ``accelerator`` must be built with
    ``log_with="wandb"``. Files go to ``<run_dir>/wandb``; ``config`` is logged redacted."""

    def __init__(
        self,
        accelerator: Accelerator,
        *,
        project: str,
        run_dir: Path,
        run_name: str,
        mode: Literal["online", "offline", "disabled"],
        config: dict[str, Any] | None = None,
    ) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.accelerator = accelerator
        accelerator.init_trackers(
            project,
            config=redact(config or {}),
            init_kwargs={"wandb": {"dir": str(run_dir), "mode": mode, "name": run_name}},
        )

    @classmethod
    def from_run_config(cls, accelerator: Accelerator, cfg: Any) -> WandbSink:
        """The sink for a ``RunConfig``: its project, mode, run dir and name, and the config."""
        return cls(
            accelerator,
            project=cfg.metrics.wandb_project,
            run_dir=cfg.run_dir,
            run_name=cfg.run.name,
            mode=cfg.metrics.resolved_wandb_mode(),
            config=cfg.model_dump(mode="json"),
        )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        # Not `accelerator.end_training()`: in accelerate 1.15 it also destroys the process
        # group, after which the stage's final barrier (and any collective) fails on the main
        # rank while the others wait forever. The runtime alone owns the group's lifetime.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


class ProgressBar:
    """Progress over optimizer steps with ETA, showing the last flushed values of ``fields``
    ((metric name, label) pairs). On a terminal a tqdm bar; otherwise (a Slurm log, a file,
    a pipe) a bar never advances there, so a plain line every flush (``metrics.log_every``
    steps) or every ``every_s`` seconds. Pass ``enabled=False`` on ranks other than the main."""

    fields = (("train/loss", "loss"), ("train/lr", "lr"), ("throughput/tokens_per_s", "tok/s"))

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        enabled: bool = True,
        plain: bool | None = None,
        every_s: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self._stream = stream or sys.stderr
        self.plain = not _is_terminal(self._stream) if plain is None else plain
        self.enabled, self.every_s = enabled, every_s
        self._bar = None
        self.reset(total, initial)

    def reset(self, total: int, initial: int = 0) -> None:
        """Start over with a new ``total`` (e.g. once the horizon is known, or on resume)."""
        if self._bar is not None:
            self._bar.reset(total=total)
            self._bar.update(initial)
        elif not self.plain and total:  # not before the horizon is known: no stray `0step`
            self._bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not self.enabled, file=self._stream,
            )  # fmt: skip
        self.total, self._step, self._start_step = total, initial, initial
        self._printed: int | None = None  # the step of the last plain line
        self._started = self._last_line = time.monotonic()
        self._postfix: dict[str, str] = {}

    def update(self, step: int) -> None:
        """Move to ``step`` (optimizer steps done)."""
        if self._bar is not None:
            self._bar.update(step - self._step)
        self._step = step
        if self.plain and time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._postfix = {label: _short(metrics[k]) for k, label in self.fields if k in metrics}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)
            self.update(max(self._step, step))  # a logged step moves the bar too
        elif self.plain:
            self._step = max(self._step, step)
            self._line()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        if not self.enabled or not self.total:
            return
        if self._step >= self.total and self._printed == self._step:
            return  # the last step's line is out: nothing more to say
        self._printed = self._step
        elapsed = self._last_line - self._started
        done = self._step - self._start_step
        eta = elapsed / done * (self.total - self._step) if done > 0 else None
        parts = [f"step {self._step}/{self.total} ({100 * self._step / self.total:.0f}%)"]
        parts += [f"{label} {value}" for label, value in self._postfix.items()]
        parts.append(f"elapsed {_duration(elapsed)}")
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        print("[kiln] " + ", ".join(parts), file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"

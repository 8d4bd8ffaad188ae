"""The training batches of one rank: DataLoader workers running readers, and their state.

Each DataLoader worker runs one *reader* (``ReaderStream``); rank ``r`` with ``W`` workers owns
readers ``r*W .. r*W+W-1`` of ``world_size * W``. A worker yields every batch together with
its reader's state right after that batch, so the loader always knows the exact state of
every reader as of the last batch the trainer took, with no replay and no cross-process
requests. torch's DataLoader takes batches from workers in strict rotation; on resume the
readers are handed to the workers rotated so that the reader whose turn was next goes first.

``state_dict()`` is this rank's part (JSON-safe). ``load_state_dict()`` takes the parts of
all ranks: with the same readers it continues token for token; with another number of ranks
or workers the unfinished work is redistributed (``plan.redistribute``) so every remaining
document of the epoch is read exactly once.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.data.config import DataConfig
from launcher.data.masking import Masker
from launcher.data.packing import Piece, hand_over, own_segment
from launcher.data.plan import Layout, SourcePlan, redistribute
from launcher.data.records import RECORD_ERRORS, STATS
from launcher.data.sources import ResolvedCorpus
from launcher.data.stream import ReaderStream, apply_delta, fresh_state
from launcher.data.tokenizer import TextTokenizer
from launcher.errors import UserError

log = logging.getLogger(__name__)
STATE_VERSION = 2
SKIP_KINDS = (
    *sorted(RECORD_ERRORS),
    *("changed_file", "empty_glob", "invalid_file_name", "missing_column", "missing_file"),
    *("truncated", "unknown_format", "unreadable", "other"),
)
COUNTERS = (
    *("documents", "held_out", "chunk_cut_mismatch", *STATS),
    *(f"skipped_{kind}" for kind in SKIP_KINDS),
)
"""The data counters every rank reports, in this order (``stats``)."""
_LOADS = (1, 2)  # version 1 (before long documents streamed) loads: no stream in progress


class DataStateError(UserError):
    """A saved data state that cannot continue this run."""


class _ReaderDataset(IterableDataset):
    """Worker ``w`` runs the reader whose state is ``states[w]``."""

    def __init__(self, corpus, cfg, tokenizer, seed, batch_size, states, masker=None):
        self.corpus, self.cfg, self.tokenizer = corpus, cfg, tokenizer
        self.seed, self.batch_size, self.states = seed, batch_size, states
        self.masker = masker

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:  # a stop signal is the trainer's to handle; it shuts us down
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            _die_with_parent()
        reader = ReaderStream(
            self.corpus, self.cfg, self.tokenizer, self.seed, self.states[worker], self.masker
        )
        # numpy, not tensors: a tensor crosses processes as a shared-memory file descriptor,
        # a round trip per tensor that cost more than pickling the few kB of a batch.
        for batch, delta in reader.batches(self.batch_size):
            yield {"batch": batch, "delta": delta, "worker": worker}


def _end_workers_at_exit() -> None:
    """Our workers ignore SIGTERM (a stop signal is the trainer's), but at exit Python's
    multiprocessing sends its daemonic children SIGTERM and then waits for them: a process
    leaving with a live iterator (an exception's traceback holds it) hung there forever.
    Registered after multiprocessing's own exit hook, so it runs first."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


atexit.register(_end_workers_at_exit)


def _die_with_parent() -> None:
    """A worker ignores stop signals, so when its rank dies without shutting it down
    (kill -9, the OOM killer) nothing would end it: seen here, orphaned workers of 430 MB
    each outliving their runs. Linux kills us when the parent goes (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _as_is(item):
    return item  # batches are built by the readers; keep the state out of torch's collation


class StreamLoader:
    """Infinite iterator of training batches for one rank, with exact, elastic state."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: TextTokenizer,
        corpus: ResolvedCorpus,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        masker: Masker | None = None,
    ):
        self.cfg, self.tokenizer, self.corpus = cfg, tokenizer, corpus
        self.masker = masker
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.workers = cfg.num_workers
        per_rank = max(1, self.workers)
        self.total_readers = world_size * per_rank
        self.readers = list(range(rank * per_rank, (rank + 1) * per_rank))
        n = len(corpus.sources)
        self._states = {
            g: fresh_state(Layout(g, self.total_readers), n, seed) for g in self.readers
        }
        self._next = 0  # position in self.readers of the reader whose batch comes next
        self.emitted = np.zeros(n, dtype=np.int64)
        self.batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.readers[self._next :] + self.readers[: self._next]
        dataset = _ReaderDataset(
            self.corpus,
            self.cfg,
            self.tokenizer,
            self.seed,
            self.batch_size,
            [self._states[g] for g in order],
            self.masker,
        )
        # Workers encode one document at a time; tokenizers' own thread pool would only
        # contend with the trainer (and warns after a fork).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_as_is,
            prefetch_factor=4 if self.workers else None,
            # its own generator: starting an iterator draws a seed, which from the global RNG
            # would shift dropout after a resume (our readers carry their own RNG state)
            generator=torch.Generator().manual_seed(self.seed),
        )
        for item in loader:
            g = order[item["worker"]]
            self._states[g] = apply_delta(self._states[g], item["delta"])
            self._next = (self.readers.index(g) + 1) % len(self.readers)
            batch = item["batch"]
            self.emitted += batch.pop("source_tokens")
            self.batches += 1
            yield {k: torch.from_numpy(v) for k, v in batch.items()}

    def position(self) -> tuple:
        """Where the stream is (as of the last batch taken), cheaply: reader states are
        replaced per batch, never modified, so references suffice. For ``rewind``."""
        return dict(self._states), self._next, self.emitted.copy(), self.batches

    def rewind(self, position: tuple) -> None:
        """Back to a ``position()``: batches taken since are given back (a step that will not
        run). A running iterator must not be used after this; a new one continues from here."""
        states, self._next, emitted, self.batches = position
        self._states, self.emitted = dict(states), emitted.copy()

    # ---------------------------------------------------------------------------- metrics

    def stats(self) -> dict[str, float]:
        """Counters of this rank: skipped records per kind, documents, realised mix."""
        counters: Counter = Counter()
        for state in self._states.values():
            counters.update(state["counters"])
        if self.rank == 0:  # paths that matched nothing, found once when the corpus was listed
            counters.update({f"skipped_{kind}": n for kind, n in self.corpus.problems.items()})
        # Every rank reports the same names (the metrics all-reduce requires it, and which
        # kinds a rank met depends on its share of the corpus): the fixed list, zeros included,
        # and any kind not in it counted under skipped_other, never dropped.
        out = dict.fromkeys((f"data/{k}" for k in COUNTERS), 0.0)
        for key, value in counters.items():
            name = f"data/{key}" if key in COUNTERS else "data/skipped_other"
            out[name] += float(value)
        total = max(int(self.emitted.sum()), 1)
        for source, n in zip(self.corpus.sources, self.emitted, strict=True):
            out[f"data/mix/{source.label}"] = float(n) / total
        return out

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """This rank's data state, JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.corpus.fingerprint(),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.workers,
            "total_readers": self.total_readers,
            "next": self._next,
            "batches": self.batches,
            "emitted": self.emitted.tolist(),
            "readers": {str(g): _encode(s) for g, s in self._states.items()},
        }

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Continue from the states of all ranks (one dict is enough for a single rank).

        Same readers: exact continuation. Other ranks x workers: the unfinished work of the
        epoch is redistributed. Raises ``DataStateError`` for an incomplete or foreign state.
        """
        parts = [states] if isinstance(states, dict) else list(states)
        first = parts[0]
        for part in parts:
            if part.get("version") not in _LOADS:
                raise DataStateError(
                    f"data state version {part.get('version')} is not one of {_LOADS}"
                )
            if part["fingerprint"] != self.corpus.fingerprint():
                raise DataStateError(
                    "the corpus files differ from the ones the data state was saved with "
                    "(files added, removed or renamed); the stream cannot continue exactly"
                )
        old_total = first["total_readers"]
        readers = {int(g): _decode(s) for part in parts for g, s in part["readers"].items()}
        if sorted(readers) != list(range(old_total)):
            raise DataStateError(
                f"the data state covers readers {sorted(readers)} of {old_total}: "
                "load the data states of all ranks"
            )
        if first["seed"] != self.seed:
            log.warning(
                "data state was saved with seed %s; keeping it for the data order", first["seed"]
            )
            self.seed = first["seed"]
        same = (first["world_size"], first["workers"]) == (self.world_size, self.workers)
        if old_total == self.total_readers:
            self._states = {g: readers[g] for g in self.readers}
            mine = [p for p in parts if p["rank"] == self.rank]
            self._next = mine[0]["next"] if same and mine else 0
            self.emitted = np.array(mine[0]["emitted"] if same and mine else self._share(parts))
            self.batches = mine[0]["batches"] if same and mine else 0
            return
        moved = self._redistribute([readers[g] for g in range(old_total)])
        self._states = {g: moved[g] for g in self.readers}
        self._next = 0
        self.emitted = np.array(self._share(parts))
        self.batches = 0
        log.info("data state of %d readers redistributed to %d", old_total, self.total_readers)

    def _share(self, parts: list[dict]) -> list[int]:
        total = np.sum([p["emitted"] for p in parts], axis=0)
        return total.tolist() if self.rank == 0 else [0] * len(total)

    def _redistribute(self, old: list[dict]) -> list[dict]:
        n_old, n_new = len(old), self.total_readers
        plans = [
            SourcePlan(self.seed, s, len(src.files), self.cfg.shuffle)
            for s, src in enumerate(self.corpus.sources)
        ]
        cursors = redistribute(plans, [st["cursors"] for st in old], n_old, n_new)
        # Window documents are dealt round-robin; each old packer's leftovers and long documents
        # in progress go, in order, to one new reader (old reader g to new reader g % n_new),
        # as pieces of their own documents beginning segments (``packing.hand_over``).
        window = [
            own_segment(part)
            for st in old
            for p in st["window"]
            for part in Piece(p["tokens"], p["spans"]).split()
        ]
        packers = [[] for _ in range(n_new)]
        streams = [[] for _ in range(n_new)]
        for g, st in enumerate(old):
            pieces = [Piece(p["tokens"], p["spans"]) for p in st["packer"]]
            packers[g % n_new] += hand_over(pieces)
            streams[g % n_new] += [{**ref, "restart": True} for ref in st.get("streams", [])]
        mixed = np.sum([st["mixed"] for st in old], axis=0) // n_new
        read_epoch = np.max([st.get("read_epoch", [0] * len(plans)) for st in old], axis=0)
        counters: Counter = Counter()
        for st in old:
            counters.update(st["counters"])
        generation = max(st["generation"] for st in old) + 1
        new = []
        for g in range(n_new):
            state = fresh_state(Layout(g, n_new), len(plans), self.seed)
            state["rng"] = np.random.default_rng(
                [self.seed, n_new, g, generation]
            ).bit_generator.state
            state.update(
                cursors=cursors[g],
                mixed=[int(x) for x in mixed],
                window=[{"tokens": p.tokens, "spans": p.spans} for p in window[g::n_new]],
                packer=[{"tokens": p.tokens, "spans": p.spans} for p in packers[g]],
                streams=streams[g],
                read_epoch=[int(x) for x in read_epoch],
                counters=dict(counters) if g == 0 else {},
                generation=generation,
            )
            new.append(state)
        return new


# A data state holds token arrays (shuffle window, packer); JSON carries them as base64.


def _encode(obj):
    if isinstance(obj, np.ndarray):
        return {
            "__array__": obj.dtype.str,
            "shape": list(obj.shape),
            "b64": base64.b64encode(obj.tobytes()).decode(),
        }
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        if "__array__" in obj:
            flat = np.frombuffer(base64.b64decode(obj["b64"]), dtype=np.dtype(obj["__array__"]))
            return flat.reshape(obj["shape"]).copy()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj

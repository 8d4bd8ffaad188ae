"""Named states: a checkpoint is a set of parts, each saved and loaded under its name.

The loop asks its own parts and the task (``Task.states``) for ``{name: State}``
(``Trainer.checkpoint_states``); ``launcher.persist`` hands each a ``Saving`` or ``Loading``
and knows nothing of what they hold. The kinds, and where they live in a checkpoint folder:

- ``RankJson(obj)``: this rank's JSON value, in ``rank-<rank>.json`` under its name; on load
  ``obj.load_state_dict`` gets the list of every saving rank's value (the world size may have
  changed: the object decides how to spread them).
- ``RunJson(obj)``: one JSON value for the run, written by the main rank in ``trainer.json``
  under its name; on load every rank gets that value.
- ``RankTensors(obj)``: this rank's ``{key: tensor}``, in ``rank-<rank>.safetensors`` as
  ``name/key``; on load, the list of every saving rank's dict.
- ``Weights``: fp32 masters, Adam moments and frozen values (``snapshot.save_weights``), in
  ``model-*`` / ``optimizer-*`` safetensors, loadable on any world size and ZeRO stage.
- ``Rng``: this rank's random generators (``snapshot.save_rng``), set again only on the same
  world size, and only once the data iterator exists (the loop calls ``apply``).

A state the checkpoint lacks is an error naming it and the folder (``MissingState``), unless
it is ``optional``: then its object keeps the value it was built with (its default).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from launcher import snapshot
from launcher.checkpoint import CheckpointError

LOOP_STATES = ("weights", "adam_step", "train_state", "task", "rng", "metrics")
"""The loop's own named states (``Trainer.checkpoint_states``), in load order (weights before
Adam's step count); any other name is the task's (``Task.states``)."""
RANK_JSON = "rank-{rank:05d}.json"
RUN_JSON = "trainer.json"
RANK_TENSORS = "rank-{rank:05d}.safetensors"


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (``TrainState``, a data stream, a
    KL controller)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class MissingState(CheckpointError):
    """The checkpoint holds no state of a name the run asks for."""


@dataclass
class Saving:
    """One rank's view of a checkpoint being written into ``folder`` (the tmp folder)."""

    folder: Path
    rank: int
    world: int
    is_main: bool
    rank_json: dict[str, Any] = field(default_factory=dict)
    run_json: dict[str, Any] = field(default_factory=dict)
    rank_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tensor_states: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    """Files written by states that write their own (relative to ``folder``)."""

    def close(self) -> list[str]:
        """Write the collected JSON and tensor states; returns every file this rank wrote."""
        files = list(self.files)
        if self.rank_json:
            name = RANK_JSON.format(rank=self.rank)
            (self.folder / name).write_text(_json(self.rank_json))
            files.append(name)
        if self.run_json and self.is_main:
            (self.folder / RUN_JSON).write_text(_json(self.run_json, indent=1))
            files.append(RUN_JSON)
        if self.tensor_states:
            name = RANK_TENSORS.format(rank=self.rank)
            meta = {"states": json.dumps(self.tensor_states)}
            save_file(self.rank_tensors, str(self.folder / name), metadata=meta)
            files.append(name)
        return files


def _json(states: dict[str, Any], indent: int | None = None) -> str:
    """``states`` as JSON. Raises ``TypeError`` naming the first state that is not JSON-safe."""
    try:
        return json.dumps(states, indent=indent)
    except (TypeError, ValueError):
        for name, value in states.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"checkpoint state {name!r} is not JSON-safe: {exc}") from exc
        raise


class Loading:
    """Every rank's view of a checkpoint being read: ``saved_world`` ranks wrote it."""

    def __init__(
        self, folder: Path, saved_world: int, rank: int, world: int, saved: list | None = None
    ) -> None:
        self.folder, self.saved_world, self.rank, self.world = folder, saved_world, rank, world
        self.saved = saved  # the names its manifest lists (None: written before they were)
        self._rank_json: list[dict] | None = None
        self._run_json: dict | None = None
        self._tensor_states: list[set[str]] | None = None

    def rank_docs(self) -> list[dict]:
        """Every saving rank's ``rank-<r>.json`` ({} where there is none)."""
        if self._rank_json is None:
            paths = [self.folder / RANK_JSON.format(rank=r) for r in range(self.saved_world)]
            self._rank_json = [json.loads(p.read_text()) if p.is_file() else {} for p in paths]
        return self._rank_json

    def run_doc(self) -> dict:
        if self._run_json is None:
            path = self.folder / RUN_JSON
            self._run_json = json.loads(path.read_text()) if path.is_file() else {}
        return self._run_json

    def tensor_states(self) -> list[set[str]]:
        """The tensor state names in each saving rank's ``rank-<r>.safetensors``."""
        if self._tensor_states is None:
            self._tensor_states = []
            for r in range(self.saved_world):
                path = self.folder / RANK_TENSORS.format(rank=r)
                names: set[str] = set()
                if path.is_file():
                    with safe_open(str(path), framework="pt") as f:
                        names = set(json.loads((f.metadata() or {}).get("states", "[]")))
                self._tensor_states.append(names)
        return self._tensor_states

    def rank_tensors(self, name: str) -> list[dict[str, torch.Tensor]]:
        out = []
        for r in range(self.saved_world):
            prefix, tensors = f"{name}/", {}
            with safe_open(str(self.folder / RANK_TENSORS.format(rank=r)), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (not a dict)
                    if key.startswith(prefix):
                        tensors[key[len(prefix) :]] = f.get_tensor(key)
            out.append(tensors)
        return out

    def names(self) -> set[str]:
        """The states the checkpoint holds: its manifest's list, else its JSON and tensor
        states (for messages)."""
        if self.saved is not None:
            return set(self.saved)
        found = set(self.run_doc())
        for doc in self.rank_docs():
            found |= set(doc)
        for names in self.tensor_states():
            found |= names
        return found


class State:
    """One named part of a checkpoint. ``optional``: a checkpoint without it leaves the object
    as it was built instead of being an error."""

    optional: bool = False

    def save(self, name: str, out: Saving) -> None:
        raise NotImplementedError

    def saved_in(self, name: str, src: Loading) -> bool:
        raise NotImplementedError

    def load(self, name: str, src: Loading) -> None:
        raise NotImplementedError


@dataclass
class RankJson(State):
    """This rank's JSON-safe ``obj.state_dict()``; ``obj.load_state_dict`` gets every saving
    rank's, as a list in rank order."""

    obj: Stateful
    optional: bool = False

    def save(self, name: str, out: Saving) -> None:
        out.rank_json[name] = self.obj.state_dict()

    def saved_in(self, name: str, src: Loading) -> bool:
        return all(name in doc for doc in src.rank_docs())

    def load(self, name: str, src: Loading) -> None:
        self.obj.load_state_dict([doc[name] for doc in src.rank_docs()])


@dataclass
class RunJson(State):
    """One JSON-safe value for the run (the same on every rank), written by the main rank."""

    obj: Stateful
    optional: bool = False

    def save(self, name: str, out: Saving) -> None:
        value = self.obj.state_dict()
        if out.is_main:
            out.run_json[name] = value

    def saved_in(self, name: str, src: Loading) -> bool:
        return name in src.run_doc()

    def load(self, name: str, src: Loading) -> None:
        self.obj.load_state_dict(src.run_doc()[name])


@dataclass
class RankTensors(State):
    """This rank's ``{key: tensor}`` (``obj.state_dict()``); ``obj.load_state_dict`` gets every
    saving rank's dict (on CPU), as a list in rank order."""

    obj: Stateful
    optional: bool = False

    def save(self, name: str, out: Saving) -> None:
        tensors = self.obj.state_dict()
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"state {name!r}: {key!r} is a {type(value).__name__}, not a tensor"
                )
            out.rank_tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
        out.tensor_states.append(name)

    def saved_in(self, name: str, src: Loading) -> bool:
        return all(name in names for names in src.tensor_states())

    def load(self, name: str, src: Loading) -> None:
        self.obj.load_state_dict(src.rank_tensors(name))


@dataclass
class Held:
    """A ``Stateful`` for a value kept elsewhere: ``get()`` saves it, ``set(value)`` loads it."""

    get: Callable[[], Any]
    set: Callable[[Any], None]

    def state_dict(self) -> Any:
        return self.get()

    def load_state_dict(self, state: Any) -> None:
        self.set(state)


@dataclass
class Weights(State):
    """The trained model's fp32 masters and Adam moments and its frozen values (every rank
    takes part: ZeRO-3 gathers)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    engine: Any

    def save(self, name: str, out: Saving) -> None:
        m, opt, eng = self.model, self.optimizer, self.engine
        out.files += snapshot.save_weights(m, opt, eng, out.folder, out.rank, out.world)

    def saved_in(self, name: str, src: Loading) -> bool:
        return any(src.folder.glob("model-*.safetensors"))

    def load(self, name: str, src: Loading) -> None:
        snapshot.load_weights(self.model, self.optimizer, self.engine, src.folder)


class Rng(State):
    """This rank's torch, numpy and Python random states. Loaded only on the world size that
    saved them (elsewhere a rank's stream is another one), and only by ``apply``: creating the
    data iterator draws a seed, so the loop applies them after it."""

    optional = True  # elsewhere (another world size) the seeded generators go on

    def __init__(self) -> None:
        self.pending: Path | None = None

    def save(self, name: str, out: Saving) -> None:
        out.files += snapshot.save_rng(out.folder, out.rank)

    def saved_in(self, name: str, src: Loading) -> bool:
        return (src.folder / f"rng-{src.rank:05d}.json").is_file()

    def load(self, name: str, src: Loading) -> None:
        self.pending = src.folder if src.saved_world == src.world else None

    def apply(self, rank: int) -> None:
        """Set the random generators from the loaded checkpoint, if any (once)."""
        if self.pending is not None:
            snapshot.load_rng(self.pending, rank)
            self.pending = None


def as_state(value: State | Stateful, name: str, owner: str) -> State:
    """A ``State`` as it is; any other ``Stateful`` as this rank's JSON (``RankJson``).

    Raises ``TypeError`` naming ``owner`` and ``name`` for anything else."""
    if isinstance(value, State):
        return value
    if isinstance(value, Stateful):
        return RankJson(value)
    raise TypeError(
        f"{owner}.states()[{name!r}] is a {type(value).__name__}: give a State (RankJson, "
        "RunJson, RankTensors) or an object with state_dict() and load_state_dict()"
    )


def check_saved(states: dict[str, State], src: Loading, asked_by: dict[str, str]) -> None:
    """Raise ``MissingState`` naming the first state ``src`` lacks (and who asks for it), the
    folder and what it holds, unless that state is optional."""
    for name, state in states.items():
        if state.optional or state.saved_in(name, src):
            continue
        holds = ", ".join(sorted(src.names())) or "no named states"
        raise MissingState(
            f"{src.folder}: the checkpoint has no state {name!r}, which "
            f"{asked_by.get(name, 'the loop')} asks for (it holds: {holds}). Resume from a "
            "checkpoint written with it, start fresh (checkpoint.resume=none), or make the "
            "state optional (it then keeps the value it was built with)"
        )

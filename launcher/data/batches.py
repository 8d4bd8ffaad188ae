"""Micro-batches of examples: padded or packed, in an order any world size resumes exactly.

Row format (both ways): ``input_ids`` are an example's tokens, ``targets`` its next tokens,
already shifted (``targets[i]`` is the token ``i + 1`` where the loss mask trains it, else
``IGNORE``; the last position has no next token). So a sequence task (reward, classification)
sees the whole example, and an LM loss is a cross-entropy over ``targets`` with no shift.
- Padded (``pad_examples``): right padding to the longest example of the micro-batch, with an
  ``attention_mask``; number extras become tensors, ``Example`` extras a padded batch of their
  own under ``<key>_`` names (``rejected_input_ids``...).
- Packed (``pack_examples``): whole examples placed best-fit into rows of ``pack_len`` tokens,
  never cut; ``position_ids`` restart at each example and ``segment_ids`` number them, for a
  block-diagonal causal mask (``launcher.forward.forward_logits``).

The order: epoch ``e`` is a permutation of the set seeded by ``(seed, e)``, and the global
sequence of micro-batches is cut from it greedily (``batch_size`` examples, or as many as fit
the rows), never across an epoch's end. Micro-batch ``k`` goes to rank ``k % world``; so a step
of ``world x accum`` micro-batches is the same set of examples whatever the world size, and
the state is two numbers, (epoch, position in its permutation), the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from launcher.data.examples import Example
from launcher.data.packing import IGNORE


def shifted_targets(example: Example) -> np.ndarray:
    """``targets`` of one example: the next token where it is trained, else ``IGNORE``."""
    targets = np.full(len(example), IGNORE, dtype=np.int64)
    targets[:-1] = np.where(example.loss_mask[1:], example.tokens[1:], IGNORE)
    return targets


def pad_examples(
    examples: list[Example], pad_id: int, prefix: str = "", real: list[bool] | None = None
) -> dict[str, torch.Tensor]:
    """A right-padded micro-batch (see the module's doc); pad positions are never targets.
    ``real`` (default: all) marks the rows that are examples, not fillers (``example_mask``)."""
    width = max(1, *(len(e) for e in examples))
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE, dtype=np.int64)
    attention = np.zeros((len(examples), width), dtype=np.int64)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = example.tokens
        targets[row, :n] = shifted_targets(example)
        attention[row, :n] = 1
    batch = {
        f"{prefix}input_ids": torch.from_numpy(input_ids),
        f"{prefix}targets": torch.from_numpy(targets),
        f"{prefix}attention_mask": torch.from_numpy(attention),
    }
    if not prefix:
        batch["example_mask"] = torch.tensor([True] * len(examples) if real is None else real)
    for key in examples[0].extras if examples else ():
        values = [e.extras[key] for e in examples]
        if isinstance(values[0], Example):
            batch |= pad_examples(values, pad_id, prefix=f"{prefix}{key}_")
        else:
            batch[f"{prefix}{key}"] = torch.tensor(values)
    return batch


def pack_examples(
    examples: list[list[Example]], pack_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows of ``pack_len`` tokens, row ``r`` holding ``examples[r]`` one after the other."""
    shape = (len(examples), pack_len)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE, dtype=np.int64)
    position_ids = np.tile(np.arange(pack_len, dtype=np.int64), (len(examples), 1))
    segment_ids = np.zeros(shape, dtype=np.int64)  # 0: the padding after the examples
    for row, placed in enumerate(examples):
        at = 0
        for segment, example in enumerate(placed, start=1):
            n = len(example)
            if example.extras:
                raise ValueError(f"{example.where}: examples with extras cannot be packed")
            input_ids[row, at : at + n] = example.tokens
            targets[row, at : at + n] = shifted_targets(example)
            position_ids[row, at : at + n] = np.arange(n)
            segment_ids[row, at : at + n] = segment
            at += n
        position_ids[row, at:] = np.arange(pack_len - at)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
    }


class ExampleStream:
    """This rank's endless micro-batches over a set of examples, epoch after epoch.

    ``pack_len`` None: ``batch_size`` examples per micro-batch, padded. Otherwise
    ``batch_size`` rows of ``pack_len`` tokens, filled best-fit with whole examples in order
    until the next one fits no row. Has ``state_dict``/``load_state_dict`` and, for the loop's
    give-back of a step that will not run, ``position``/``rewind``.
    """

    def __init__(
        self,
        examples: list[Example],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_id: int,
        shuffle: bool = True,
        pack_len: int | None = None,
    ):
        if not examples:
            raise ValueError("no examples to draw batches from")
        if pack_len is not None:
            longest = max(examples, key=len)
            if len(longest) > pack_len:
                raise ValueError(
                    f"{longest.where}: an example of {len(longest)} tokens does not fit a packed "
                    f"row of {pack_len}; truncate examples when encoding them"
                )
        self.examples, self.batch_size, self.pack_len = examples, batch_size, pack_len
        self.rank, self.world_size, self.seed, self.pad_id = rank, world_size, seed, pad_id
        self.shuffle = shuffle
        self.epoch, self.next = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------------------ order

    def order(self, epoch: int) -> np.ndarray:
        """The examples of ``epoch`` in the order they are drawn."""
        if epoch not in self._orders:
            n = len(self.examples)
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a round
            self._orders[epoch] = order  # may span two epochs: keep the one before
        return self._orders[epoch]

    def _cut(self, epoch: int, start: int) -> tuple[list[list[int]], int]:
        """The micro-batch from ``start`` of ``epoch``'s order (rows of indices) and where
        the next one starts."""
        order = self.order(epoch)
        if self.pack_len is None:
            end = min(start + self.batch_size, len(order))
            return [[int(i)] for i in order[start:end]], end
        rows: list[list[int]] = [[] for _ in range(self.batch_size)]
        free = [self.pack_len] * self.batch_size
        at = start
        while at < len(order):
            n = len(self.examples[order[at]])
            fits = [r for r in range(self.batch_size) if free[r] >= n]
            if not fits:
                break
            best = min(fits, key=lambda r: free[r])  # best fit: the fullest row it fits
            rows[best].append(int(order[at]))
            free[best] -= n
            at += 1
        return [row for row in rows if row], at

    def micro_batches_per_epoch(self, epoch: int = 0) -> int:
        count, at = 0, 0
        while at < len(self.examples):
            _, at = self._cut(epoch, at)
            count += 1
        return count

    def steps_per_epoch(self, accum: int) -> int:
        """Optimizer steps of ``accum`` micro-batches per rank in one epoch (the last one may
        also hold the next epoch's first micro-batches)."""
        return math.ceil(self.micro_batches_per_epoch() / (self.world_size * accum))

    # ------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # a round: one micro-batch per rank, then the state is the round's end
            epoch, at, mine = self.epoch, self.next, None
            for k in range(self.world_size):
                rows, end = self._cut(epoch, at)
                if k == self.rank:
                    mine = rows
                epoch, at = (epoch + 1, 0) if end == len(self.examples) else (epoch, end)
            self.epoch, self.next = epoch, at
            yield self._batch(mine)

    def _batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.pack_len is None:
            return pad_examples([self.examples[i] for row in rows for i in row], self.pad_id)
        picked = [[self.examples[i] for i in row] for row in rows]
        picked += [[] for _ in range(self.batch_size - len(picked))]  # a short last batch
        return pack_examples(picked, self.pack_len, self.pad_id)

    def position(self) -> tuple[int, int]:
        return self.epoch, self.next

    def rewind(self, position: tuple[int, int]) -> None:
        self.epoch, self.next = position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next": self.next, "examples": len(self.examples)}

    def load_state_dict(self, states: list[dict]) -> None:
        """The states of every rank of the run that saved (any world size): all the same."""
        first = states[0]
        if any(s != first for s in states):
            raise ValueError(f"the ranks saved different example positions: {states}")
        if first["examples"] != len(self.examples):
            raise ValueError(
                f"the checkpoint was trained on {first['examples']} examples, this set has "
                f"{len(self.examples)}: the data changed, so its position means nothing here"
            )
        self.epoch, self.next = first["epoch"], first["next"]


def evaluation_batches(
    examples: list[Example], *, rank: int, world_size: int, batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's share of one pass over ``examples`` in order, padded batches; every rank
    gets the same number of batches (ZeRO-3 needs every rank in every forward): the last
    round is completed with filler batches (a copy of the first example, no target,
    ``example_mask`` False)."""
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    rounds = math.ceil(len(chunks) / world_size)
    first = examples[0]
    filler = Example(first.tokens, np.zeros_like(first.loss_mask), first.extras, first.where)
    chunks += [[filler]] * (rounds * world_size - len(chunks))
    return [
        pad_examples(chunk, pad_id, real=[e is not filler for e in chunk])
        for chunk in chunks[rank::world_size]
    ]

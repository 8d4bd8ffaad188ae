"""Who reads what: the per-epoch work of every reader, and handing it over to a new layout.

The corpus of each source is cut into *units*: a file, or when there are fewer files than
readers, a *stripe* of a file (every S-th record, S = ceil(readers / files)), so that every
reader has work and no record is read by two readers. Each epoch permutes the units with a
seed (no state needed: the permutation is recomputed from (seed, source, epoch)) and reader
``g`` of ``N`` takes units ``g, g + N, g + 2N, ...``.

A reader's position in a source is a ``Cursor``: the segment it is reading (with the file
position after the last record it consumed), an explicit list of ``carry`` segments it must
read first, then its regular share of ``epoch`` from index ``next``. Everything is plain data,
so the state is JSON-friendly and independent of the process that produced it.

``redistribute`` turns the cursors of N old readers into cursors for N' new ones: every unit
(or rest of a unit) that no old reader finished, in every epoch up to the furthest one any
reader reached, is dealt round-robin into the new readers' carry lists; after them the new
readers continue with the next epoch under the new layout. So an epoch interrupted under
2 ranks x 2 workers finishes under 1 x 1 (or the reverse) with every document exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

Segment = dict
"""{"epoch": e, "file": index into the source's files, "stripe": j, "stripes": S,
"start": position to resume from (None = the beginning)}"""


@dataclass(frozen=True)
class Layout:
    """Reader ``index`` of ``count`` readers (ranks x DataLoader workers)."""

    index: int
    count: int


def stripes_for(n_files: int, n_readers: int) -> int:
    """Stripes per file so that every reader gets at least one unit."""
    return max(1, math.ceil(n_readers / n_files))


def epoch_units(
    seed: int, source: int, epoch: int, n_files: int, n_readers: int, shuffle: bool
) -> list[Segment]:
    """Every unit of one source for one epoch, in the epoch's (seeded) order."""
    stripes = stripes_for(n_files, n_readers)
    order = np.arange(n_files * stripes)
    if shuffle:
        order = np.random.default_rng([seed, source, epoch]).permutation(order)
    return [
        {
            "epoch": epoch,
            "file": int(u) // stripes,
            "stripe": int(u) % stripes,
            "stripes": stripes,
            "start": None,
        }
        for u in order
    ]


def new_cursor(epoch: int = 0, carry: list[Segment] | None = None) -> dict:
    """``carry`` never changes once made (``carry_next`` walks it), so it need not travel
    with every batch's state."""
    return {"current": None, "carry": carry or [], "carry_next": 0, "epoch": epoch, "next": 0}


class SourcePlan:
    """The regular per-epoch work of one source for one reader layout."""

    def __init__(self, seed: int, source: int, n_files: int, shuffle: bool):
        self.seed, self.source, self.n_files, self.shuffle = seed, source, n_files, shuffle
        self._cache: dict[tuple[int, int], list[Segment]] = {}

    def units(self, epoch: int, layout: Layout) -> list[Segment]:
        key = (epoch, layout.count)
        if key not in self._cache:
            self._cache = {
                key: epoch_units(
                    self.seed, self.source, epoch, self.n_files, layout.count, self.shuffle
                )
            }
        return self._cache[key][layout.index :: layout.count]

    def advance(self, cursor: dict, layout: Layout) -> Segment:
        """Move ``cursor`` to its next segment (carry first, then the regular plan); return it."""
        if cursor["carry_next"] < len(cursor["carry"]):
            cursor["current"] = dict(cursor["carry"][cursor["carry_next"]])
            cursor["carry_next"] += 1
            return cursor["current"]
        while True:
            mine = self.units(cursor["epoch"], layout)
            if cursor["next"] < len(mine):
                cursor["current"] = dict(mine[cursor["next"]])
                cursor["next"] += 1
                return cursor["current"]
            cursor["epoch"] += 1
            cursor["next"] = 0

    def remaining(self, cursor: dict, layout: Layout, through_epoch: int) -> Iterator[Segment]:
        """Everything this reader has not finished, in epochs up to ``through_epoch``."""
        if cursor["current"] is not None:
            yield cursor["current"]
        yield from cursor["carry"][cursor["carry_next"] :]
        for epoch in range(cursor["epoch"], through_epoch + 1):
            mine = self.units(epoch, layout)
            yield from mine[cursor["next"] :] if epoch == cursor["epoch"] else mine


def redistribute(
    plans: list[SourcePlan], cursors: list[list[dict]], old: int, new: int
) -> list[list[dict]]:
    """Cursors for ``new`` readers that finish exactly what ``old`` readers left.

    ``cursors[g][s]`` is old reader ``g``'s cursor for source ``s``; returns
    ``result[g'][s]`` for the new readers.
    """
    result = [[None] * len(plans) for _ in range(new)]
    for s, plan in enumerate(plans):
        through = max(c[s]["epoch"] for c in cursors)
        left = [
            seg
            for g in range(old)
            for seg in plan.remaining(cursors[g][s], Layout(g, old), through)
        ]
        left.sort(key=lambda seg: seg["epoch"])  # stable: finish older epochs first
        for g in range(new):
            result[g][s] = new_cursor(through + 1, [dict(seg) for seg in left[g::new]])
    return result

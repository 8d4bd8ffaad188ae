"""Reader plans: disjoint units per epoch, and redistribution that loses or repeats nothing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from launcher.data.plan import Layout, SourcePlan, new_cursor, redistribute, stripes_for


def unit(seg: dict) -> tuple:
    return (seg["epoch"], seg["file"], seg["stripe"], seg["stripes"])


def test_fewer_files_than_readers_are_striped_so_every_reader_has_work():
    assert stripes_for(n_files=2, n_readers=4) == 2
    assert stripes_for(n_files=5, n_readers=4) == 1
    plan = SourcePlan(seed=0, source=0, n_files=2, shuffle=True)
    shares = [plan.units(0, Layout(g, 4)) for g in range(4)]
    assert all(shares)
    everything = Counter(unit(s) for share in shares for s in share)
    assert sorted(everything) == [(0, f, j, 2) for f in range(2) for j in range(2)]
    assert set(everything.values()) == {1}


def test_each_epoch_has_its_own_seeded_order():
    plan = SourcePlan(seed=0, source=0, n_files=50, shuffle=True)
    epoch0 = [s["file"] for s in plan.units(0, Layout(0, 1))]
    assert epoch0 != [s["file"] for s in plan.units(1, Layout(0, 1))]
    assert epoch0 == [s["file"] for s in SourcePlan(0, 0, 50, True).units(0, Layout(0, 1))]
    assert [s["file"] for s in SourcePlan(0, 0, 50, False).units(0, Layout(0, 1))] == list(
        range(50)
    )


@pytest.mark.parametrize(("old", "new"), [(4, 1), (1, 4), (3, 5), (6, 2)])
def test_redistribution_hands_over_every_unfinished_unit_exactly_once(old, new):
    rng = random.Random(old * 10 + new)
    plan = SourcePlan(seed=1, source=0, n_files=7, shuffle=True)
    cursors, done = [], Counter()
    for g in range(old):  # each old reader got a different distance, some into epoch 1
        cursor = new_cursor()
        for _ in range(rng.randint(0, 9)):
            if cursor["current"] is not None:
                done[unit(cursor["current"])] += 1
            plan.advance(cursor, Layout(g, old))
        cursors.append([cursor])
    through = max(c[0]["epoch"] for c in cursors)
    handed = Counter(
        unit(seg)
        for reader in redistribute([plan], cursors, old, new)
        for seg in reader[0]["carry"]
    )
    assert not set(done) & set(handed)
    every = Counter(
        unit(seg)
        for e in range(through + 1)
        for g in range(old)
        for seg in plan.units(e, Layout(g, old))
    )
    assert done + handed == every  # each unit of each epoch: finished before, or handed over once
    resumed = redistribute([plan], cursors, old, new)
    assert all(r[0]["epoch"] == through + 1 for r in resumed)  # then a fresh epoch

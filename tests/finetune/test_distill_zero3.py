"""`kiln distill` under ZeRO-3 on 2 ranks (the teacher sharded as a frozen companion) gives the
losses of ZeRO-0 on 1 process. The teacher is the session's parent: equal losses need any
teacher, not a good one, and this module then needs no teacher of its own (the learning
checks are `test_distill_runs.py`'s, which runs in the parallel pass)."""

from __future__ import annotations

import pytest

from ..launcher.runs import losses, world_sizes
from .distill_fixtures import distill

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_zero3_on_two_ranks_gives_the_zero0_losses(tmp_path, pretrained, pretrained_corpus):
    first5 = ["train.stop_after=5", f"data.builtin.dir={pretrained_corpus}"]
    distill(tmp_path, "zero0", pretrained, *first5)
    distill(tmp_path, "zero3", pretrained, *first5, "dist.zero_stage=3",
            "data.num_workers=1", nproc=2)  # fmt: skip
    assert world_sizes(tmp_path, "zero3") == {2.0}
    assert world_sizes(tmp_path, "zero0") == {1.0}
    got, want = losses(tmp_path, "zero3"), losses(tmp_path, "zero0")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step

"""Metrics recorded since the last line are part of a checkpoint: a run stopped between two
lines (a signal, ``train.stop_after``, a crash after a periodic save) and resumed writes the
lines an uninterrupted run writes, besides the line its stop adds. Before, the resumed run's
next line averaged only the steps after the resume (PPO's rollout statistics of the
interrupted iteration were missing from it)."""

from __future__ import annotations

import json

import torch

from launcher.metrics import Metrics, record

from .test_task_step import AdaptivePasses, cfg_for, train

ENVIRONMENT = ("time/", "throughput/", "memory/")  # of the machine and the moment, not the run


def _metrics() -> Metrics:
    return Metrics(run_dir=None, is_main=True, world_size=1, all_reduce=None, sinks=[])


def _recording(m: Metrics, steps: range) -> None:
    m.activate()
    for i in steps:
        record("loss", torch.tensor(0.1 * i + 1e-9 * i * i, dtype=torch.float32))
        record("score", 1.0 / (i + 3))
        record("tokens", torch.tensor(float(i)), reduce="sum")
        record("peak", torch.tensor(float(i % 3)), reduce="max")
        record("lr", 0.5**i, reduce="last")
    m.deactivate()


def test_a_window_saved_as_json_and_restored_flushes_exactly_like_one_never_cut():
    whole = _metrics()
    _recording(whole, range(7))
    expected = whole.flush(7)

    first = _metrics()
    _recording(first, range(4))
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
    assert saved["score"]["values"][0] == [1 / 3, False] and saved["loss"]["values"][0][1]
    again = _metrics()
    _recording(again, range(4, 7))  # recorded before the restore: it still comes after
    again.restore(saved)
    assert again.flush(7) == expected


def test_a_name_restored_with_another_reduce_keeps_its_new_values_and_says_so(caplog):
    m = _metrics()
    _recording(m, range(2))
    saved = m.state_dict()
    other = _metrics()
    other.restore(saved)  # as the loop does: right after the Metrics is made
    other.activate()
    record("peak", 5.0, reduce="mean")  # a new version changed it: no error, a warning
    other.deactivate()
    assert "'peak': the checkpoint recorded it with reduce='max'" in caplog.text
    got = other.flush(2)
    assert got["peak"] == 5.0 and got["tokens"] == 1.0 and got["score"] == (1 / 3 + 1 / 4) / 2
    before = _metrics()
    before.activate()
    record("peak", 7.0, reduce="min")  # recorded before the restore: the same rule
    before.deactivate()
    before.restore(saved)
    assert before.flush(2)["peak"] == 7.0


def _lines(cfg) -> dict[int, dict]:
    rows = map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(ENVIRONMENT)} for r in rows}


class Recording(AdaptivePasses):
    """Also records a float per step (the loop records the loss and lr as tensors)."""

    def train_step(self, step, batches) -> None:
        super().train_step(step, batches)
        record("toy/shift", self.shift.value)


def test_a_run_stopped_between_two_lines_and_resumed_writes_the_uninterrupted_lines(tmp_path):
    whole = cfg_for(tmp_path, "whole", 8)
    whole.metrics.log_every = 4
    train(whole, Recording)
    expected = _lines(whole)
    assert sorted(expected) == [4, 8]

    cut = cfg_for(tmp_path, "cut", 8, resume="auto")
    cut.metrics.log_every = 4
    cut.train.stop_after = 3  # mid-window: steps 1-3 recorded, not yet written
    first, _ = train(cut, Recording)
    assert first.stopped
    train(cut, Recording)  # stop_after counts the steps of a launch: a second stop at 6
    cut.train.stop_after = None
    again, _ = train(cut, Recording)
    assert again.state.step == 8
    got = _lines(cut)
    assert sorted(got) == [3, 4, 6, 8]  # each stop writes its line too
    assert {s: got[s] for s in (4, 8)} == expected
    assert "toy/shift" in got[8] and got[8]["train/loss"] == expected[8]["train/loss"]

    # a stop at a log step: its line is the regular one, and nothing is carried over
    at_line = cfg_for(tmp_path, "at-line", 8, resume="auto")
    at_line.metrics.log_every = 4
    at_line.train.stop_after = 4
    train(at_line, Recording)
    at_line.train.stop_after = None
    train(at_line, Recording)
    assert _lines(at_line) == expected

    # another world size: the saved shares are other ranks'; nothing is restored
    again._load_window([{"x": {"reduce": "mean", "values": [[1.0, False]]}}] * 2)
    assert again._saved_window is None

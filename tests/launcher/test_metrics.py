"""Metrics: one `record` anywhere, one reduction per flush across ranks, sinks on the main rank."""

from __future__ import annotations

import io
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher import metrics as metrics_module
from launcher.config import Section
from launcher.flops import mfu, peak_flops
from launcher.metrics import Metrics, MetricsConfig, StepTimer, peak_memory_bytes, record
from launcher.sinks import JsonlSink, ProgressBar, WandbSink, redact

from .runs import free_port


def single(sinks=()) -> Metrics:
    return Metrics(run_dir=None, is_main=True, world_size=1, all_reduce=None, sinks=list(sinks))


def test_flush_aggregates_each_name_by_its_reduce_and_clears():
    with single() as m:
        for v in (1.0, 2.0, 6.0):
            record("loss", v)
            record("tokens", v, reduce="sum")
            record("grad_norm_max", v, reduce="max")
            record("grad_norm_min", v, reduce="min")
            record("lr", v, reduce="last")
        out = m.flush(step=3)
        assert out == {
            "step": 3,
            "grad_norm_max": 6.0,
            "grad_norm_min": 1.0,
            "loss": 3.0,
            "lr": 6.0,
            "tokens": 9.0,
        }
        assert m.flush(step=4) == {"step": 4}


def test_tensors_and_floats_mix_under_one_name_and_extra_fields_are_added():
    with single() as m:
        record("loss", torch.tensor(1.0, dtype=torch.bfloat16, requires_grad=True))
        record("loss", 2.0)
        record("loss", torch.tensor([6.0]))
        out = m.flush(step=1, extra={"time/step_s": 0.5})
    assert out == {"step": 1, "loss": 3.0, "time/step_s": 0.5}


def test_record_without_an_active_metrics_is_a_noop():
    m = single()
    record("loss", 1.0)
    with m:
        pass
    record("loss", 1.0)
    assert metrics_module._current is None
    assert m.flush(step=1) == {"step": 1}


def test_bad_reduce_and_a_changed_reduce_are_rejected():
    with single():
        with pytest.raises(ValueError, match="reduce must be one of"):
            record("loss", 1.0, reduce="median")
        record("loss", 1.0)
        with pytest.raises(ValueError, match="recorded with reduce='sum' after 'mean'"):
            record("loss", 1.0, reduce="sum")
        with pytest.raises(ValueError, match="must be a scalar"):
            record("logits", torch.ones(2))


def test_jsonl_sink_writes_one_line_per_flush_with_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with single([JsonlSink(path)]) as m:
        record("loss", 2.0)
        m.flush(step=10, extra={"tokens_per_second": 100.0})
        record("loss", 1.0)
        m.flush(step=20)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"step": 10, "loss": 2.0, "tokens_per_second": 100.0},
        {"step": 20, "loss": 1.0},
    ]


def test_progress_bar_shows_loss_lr_and_tokens_per_second_from_flushed_metrics():
    bar = ProgressBar(total=0, plain=False)
    bar.reset(total=100, initial=10)
    bar.update(15)
    flushed = {"step": 15, "train/loss": 2.34567, "train/lr": 3e-4}
    bar.write(15, {**flushed, "throughput/tokens_per_s": 123456.0})
    assert (bar._bar.n, bar._bar.total) == (15, 100)
    assert bar._bar.postfix == "loss=2.346, lr=0.0003, tok/s=123,456"
    bar.close()
    ProgressBar(total=5, enabled=False).update(3)  # other ranks: no output, no error


def test_progress_off_a_terminal_is_a_plain_line_per_flush_and_every_interval(monkeypatch):
    """A Slurm log is not a terminal: a tqdm bar there never advances (it read `0/300` after
    300 steps), so plain lines with step, loss, tok/s and ETA instead."""
    out = io.StringIO()  # not a terminal
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    bar = ProgressBar(total=0, stream=out, every_s=30)
    assert bar.plain and out.getvalue() == ""  # no stray `0step` before the horizon is known
    bar.reset(total=300, initial=100)
    clock[0] += 10
    bar.update(110)
    assert out.getvalue() == ""  # neither a flush nor 30 s yet
    bar.write(120, {"train/loss": 4.2109, "throughput/tokens_per_s": 12345.0})
    clock[0] += 30
    bar.update(150)  # 30 s since the last line: one more line
    lines = out.getvalue().splitlines()
    assert lines[0] == "[kiln] step 120/300 (40%), loss 4.211, tok/s 12,345, elapsed 10s, ETA 1m30s"
    assert lines[1] == "[kiln] step 150/300 (50%), loss 4.211, tok/s 12,345, elapsed 40s, ETA 2m00s"
    assert len(lines) == 2
    quiet = io.StringIO()
    ProgressBar(total=5, enabled=False, stream=quiet, plain=True).write(3, {"train/loss": 1.0})
    assert quiet.getvalue() == ""


def test_redact_hides_secret_values_and_url_passwords_but_keeps_token_counts():
    config = {
        "hf_token": "hf_abc",
        "wandb": {"API_KEY": "k", "apiKey": "k2", "password": 123, "secret": None},
        "authToken": "t",
        "data": {
            "sources": [{"path": "https://alice:pw@example.com/a.jsonl", "token": "x"}],
            "mirror": "s3://AKIA:SECRET@bucket/x",
        },
        "train": {"max_tokens": 1000, "tokenizer": "tok.json", "bos_token": "<s>"},
        "model": {"bos_token_id": 1, "path": "https://example.com/m"},
    }
    out = redact(config)
    assert out["hf_token"] == out["authToken"] == "***"
    assert out["wandb"] == {"API_KEY": "***", "apiKey": "***", "password": "***", "secret": None}
    assert out["data"]["sources"][0] == {"path": "https://***@example.com/a.jsonl", "token": "***"}
    assert out["data"]["mirror"] == "s3://***@bucket/x"
    assert out["train"] == config["train"] and out["model"] == config["model"]
    assert config["hf_token"] == "hf_abc"  # a copy


def test_wandb_mode_auto_is_online_only_with_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert MetricsConfig().resolved_wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert MetricsConfig().resolved_wandb_mode() == "online"
    assert MetricsConfig(wandb=False).resolved_wandb_mode() == "disabled"
    assert MetricsConfig(wandb_mode="offline").resolved_wandb_mode() == "offline"


def test_wandb_sink_in_offline_mode_writes_under_run_dir(tmp_path, monkeypatch, request):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    accelerator = Accelerator(log_with="wandb", project_dir=str(tmp_path))
    # Accelerate's state is process-wide: leave none behind for other tests.
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))

    class Run(Section):
        name: str = "t"

    class Config(Section):
        run: Run = Run()
        metrics: MetricsConfig = MetricsConfig(wandb_mode="offline", wandb_project="kiln-test")
        hf_token: str = "hf_abc"
        run_dir: Path = tmp_path / "run"

    run_dir = tmp_path / "run"
    sink = WandbSink.from_run_config(accelerator, Config())
    with single([sink]) as m:
        record("loss", 1.5)
        m.flush(step=1)
    (log,) = (run_dir / "wandb").glob("offline-run-*/*.wandb")  # the run's binary record
    # wandb's service process may still be writing it after finish() returned (seen in CI
    # under load: the file held only its header): wait for the record, not for a fixed time.
    deadline = time.time() + 60
    while b"loss" not in log.read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    assert b"loss" in log.read_bytes() and b"***" in log.read_bytes()
    assert not [f for f in run_dir.rglob("*") if f.is_file() and b"hf_abc" in f.read_bytes()]


def test_peak_flops_override_wins_and_cpu_probe_is_measured_once():
    assert peak_flops(torch.device("cpu"), torch.float32, override=1e12) == (
        1e12,
        "config override (metrics.peak_flops)",
    )
    with pytest.raises(ValueError):
        peak_flops(torch.device("cpu"), torch.float32, override=0)
    start = time.perf_counter()
    flops, how = peak_flops(torch.device("cpu"), torch.float32)
    first = time.perf_counter() - start
    assert flops > 1e9 and how.startswith("measured") and first < 3
    start = time.perf_counter()
    assert peak_flops(torch.device("cpu"), torch.float32) == (flops, how)
    assert time.perf_counter() - start < 0.01


def test_mfu_is_achieved_model_flops_over_peak():
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_step_timer_sums_each_phase_until_pop():
    timer = StepTimer()
    for _ in range(2):
        with timer.phase("data_wait"):
            time.sleep(0.01)
        with timer.phase("compute"):
            time.sleep(0.02)
    split = timer.pop()
    assert set(split) == {"data_wait", "compute"}
    assert 0.02 <= split["data_wait"] < split["compute"] < 0.5
    assert timer.pop() == {}


def test_peak_memory_is_the_process_peak_rss_on_cpu():
    assert peak_memory_bytes(torch.device("cpu")) > 50 * 2**20  # torch alone is bigger


# ----------------------------------------------------------------------------- two ranks


def _all_reduce(tensor: torch.Tensor, op: str) -> None:
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(tensor, op=ops[op])


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=30),
    )
    out = Path(out_dir)
    result: dict = {"world_size": dist.get_world_size()}
    sink = JsonlSink(out / f"rank{rank}" / "metrics.jsonl")
    m = Metrics(run_dir=out, is_main=rank == 0, world_size=2, all_reduce=_all_reduce, sinks=[sink])
    with m:
        value = 1.0 if rank == 0 else 3.0
        for reduce in ("mean", "sum", "max", "min", "last"):
            record(reduce, torch.tensor(value), reduce=reduce)
        record("mean", value)  # mixed float and tensor: local mean stays `value`
        result["flushed"] = m.flush(step=5, extra={"extra": 7.0})
        record("loss", value)
        if rank == 1:
            record("only_on_rank1", 1.0)
        try:
            m.flush(step=6)
        except RuntimeError as exc:
            result["error"] = str(exc)
        record("loss", value)  # the buffers were cleared: the next flush works again
        result["after_error"] = m.flush(step=7)
    (out / f"result{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_reduce_once_per_flush_and_a_name_mismatch_fails_on_both(tmp_path):
    ctx = mp.start_processes(
        _two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 90  # a hang fails the test instead of blocking the suite
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail("the two ranks did not finish within 90 s")
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result["world_size"] == 2
        assert result["flushed"] == {
            "step": 5,
            "last": 1.0,  # the main rank's
            "max": 3.0,
            "mean": 2.0,
            "min": 1.0,
            "sum": 4.0,
            "extra": 7.0,
        }
        assert "ranks recorded different metric names" in result["error"]
        names = "loss(mean), only_on_rank1(mean)" if rank else "loss(mean)"
        assert result["error"].endswith(f"recorded: {names}")
        assert result["after_error"] == {"step": 7, "loss": 2.0}
    lines = (tmp_path / "rank0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 7]
    assert (tmp_path / "rank1" / "metrics.jsonl").read_text() == ""


def test_a_line_cut_by_a_kill_stays_alone_and_readers_leave_it_out_naming_it(tmp_path, capsys):
    """A kill (or a full disk) in the middle of a write leaves half a line; the resumed run's
    sink starts on a new line, and the pipeline's report and the classification curves read
    every whole line, saying which one they left out."""
    from launcher.report import read_metrics
    from launcher.sinks import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/lo')
    sink = JsonlSink(path)  # the resumed run
    sink.write(3, {"train/loss": 2.25})
    sink.close()
    assert path.read_text().splitlines()[1:] == [
        '{"step": 2, "train/lo',
        '{"step": 3, "train/loss": 2.25}',
    ]
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
    assert f"{path}:2: not a JSON object, left out" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]
    assert read_jsonl(tmp_path / "none.jsonl") == []
    JsonlSink(path).close()  # a file ending with a newline gets none more
    assert path.read_text().endswith("2.25}\n") and "\n\n" not in path.read_text()

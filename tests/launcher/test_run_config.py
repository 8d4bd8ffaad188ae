"""The common run sections: durations, horizons, impossible combinations."""

from __future__ import annotations

import pytest

from launcher.config import ConfigError, load_config
from launcher.run_config import RunConfig


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("2h", 7200), ("1.5d", 129600), ("45", 45)]
)
def test_max_time_reads_seconds_minutes_hours_and_days(text, seconds):
    assert load_config(RunConfig, None, [f"train.max_time={text}"]).train.max_time == seconds


def test_a_bad_duration_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_time: .*90 minutes"):
        load_config(RunConfig, None, ["train.max_time=90 minutes"])


def test_max_tokens_shortens_the_horizon_when_it_comes_first():
    cfg = load_config(RunConfig, None, ["train.max_steps=1000", "train.max_tokens=10000"])
    assert cfg.train.horizon(tokens_per_step=4096) == 3  # ceil(10000 / 4096)
    two = load_config(RunConfig, None, ["train.max_steps=2", "schedule.warmup_steps=0"])
    assert two.train.horizon(4096) == 2


def test_offload_needs_a_zero_stage_that_has_it():
    with pytest.raises(ConfigError) as info:
        load_config(
            RunConfig,
            None,
            ["dist.zero_stage=0", "dist.offload_optimizer=true", "dist.offload_params=true"],
        )
    text = str(info.value)
    assert "dist.offload_params: parameter offload needs dist.zero_stage: 3" in text
    assert "dist.offload_optimizer: optimizer offload needs dist.zero_stage >= 1" in text

"""The config system: recipes, presets, overrides, and errors that say which key and where."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from launcher import config_files
from launcher.config import CONFIG_ROOT, ConfigError, load_config, save_config
from launcher.run_config import RunConfig
from pretrain.config import PretrainConfig


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def problems_of(schema, path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(schema, path, overrides)
    return [str(p) for p in info.value.problems]


@pytest.fixture
def presets(tmp_path, monkeypatch) -> Path:
    """An isolated configs/ root with two model presets."""
    root = tmp_path / "configs"
    model = "vocab_size: 8192\nn_layers: {n}\nd_model: 64\nn_heads: 4\nffn_size: 128\n"
    model += "max_seq_len: 256\n"
    write(root / "model" / "mini.yaml", model.format(n=2))
    write(root / "model" / "midi.yaml", model.format(n=3))
    monkeypatch.setattr(config_files, "CONFIG_ROOT", root)
    return root


def test_extends_merges_base_then_child_then_overrides_in_order(tmp_path):
    write(tmp_path / "base.yaml", "run: {name: base, seed: 1}\noptim: {lr: 1e-4, eps: 1e-6}\n")
    child = write(tmp_path / "sub" / "child.yaml", "extends: ../base.yaml\noptim: {lr: 2e-4}\n")
    cfg = load_config(RunConfig, child, ["optim.lr=5e-4", "run.seed=7", "optim.lr=6e-4"])
    assert cfg.run.name == "base"  # from the base
    assert cfg.optim.eps == 1e-6  # base value kept beside the child's edit
    assert cfg.optim.lr == 6e-4  # the last override wins
    assert cfg.run.seed == 7


def test_scientific_notation_in_yaml_is_a_float_not_a_string(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 3e-4}\n")
    assert load_config(RunConfig, path).optim.lr == pytest.approx(3e-4)
    assert load_config(RunConfig, None, ["optim.lr=1E-3"]).optim.lr == pytest.approx(1e-3)


def test_unknown_key_names_file_line_and_suggests_the_close_match(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  micro_batch_size: 4\n  max_stepz: 10\n")
    [problem] = problems_of(RunConfig, path)
    assert "c.yaml:3" in problem
    assert "train.max_stepz" in problem
    assert "did you mean 'train.max_steps'" in problem


def test_unknown_key_without_close_match_lists_allowed_keys():
    [problem] = problems_of(RunConfig, None, ["schedule.zzz=1"])
    assert "override 'schedule.zzz=1'" in problem
    assert "allowed keys here: kind, warmup_steps" in problem


def test_wrong_type_names_key_file_and_value(tmp_path):
    path = write(tmp_path / "c.yaml", "run:\n  seed: 1\noptim:\n  lr: fast\n")
    [problem] = problems_of(RunConfig, path)
    assert problem.startswith(f"{path.name}:4: optim.lr: ") or "c.yaml:4: optim.lr:" in problem
    assert "'fast'" in problem


def test_global_batch_not_divisible_by_micro_batch_times_world_size_is_rejected(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  global_batch_size: 24\n  micro_batch_size: 8\n")
    assert load_config(RunConfig, path).grad_accum_steps == 3  # 24 = 8 x 1 rank x 3
    [problem] = problems_of(RunConfig, path, ["dist.num_processes=2"])
    assert "train.global_batch_size" in problem
    assert "c.yaml:2" in problem
    assert "= 16" in problem and "use a multiple of 16" in problem


def test_seq_len_longer_than_model_positions_is_rejected(presets, tmp_path):
    path = write(tmp_path / "c.yaml", "model: mini\ndata:\n  builtin: {}\n  seq_len: 512\n")
    [problem] = problems_of(PretrainConfig, path)
    assert "data.seq_len" in problem and "model.max_seq_len (256)" in problem
    assert "c.yaml:4" in problem


def test_heads_not_dividing_width_is_rejected_naming_the_key(presets, tmp_path):
    path = write(tmp_path / "c.yaml", "model: mini\ndata: {builtin: {}}\n")
    [problem] = problems_of(PretrainConfig, path, ["model.n_heads=5"])
    assert "model.n_heads" in problem and "override 'model.n_heads=5'" in problem


def test_every_problem_is_reported_at_once(presets, tmp_path):
    path = write(
        tmp_path / "c.yaml",
        """
        model: mini
        data: {builtin: {}}
        optim: {lr: -1, betas: oops}
        train: {max_stepz: 3}
        """,
    )
    problems = problems_of(PretrainConfig, path, ["nonsense"])
    keys = " ".join(problems)
    for key in ("optim.lr", "optim.betas", "train.max_stepz", "nonsense"):
        assert key in keys
    assert len(problems) == 4


def test_cross_field_problems_are_collected_together(presets, tmp_path):
    path = write(tmp_path / "c.yaml", "model: mini\ndata: {builtin: {}, seq_len: 300}\n")
    overrides = ["model.n_heads=3", "dist.num_processes=3", "tokenizer.vocab_size=9000"]
    problems = " | ".join(problems_of(PretrainConfig, path, overrides))
    for key in ("data.seq_len", "model.n_heads", "train.global_batch_size", "tokenizer.vocab_size"):
        assert key in problems


def test_section_preset_by_name_or_extended_with_edits(presets, tmp_path):
    by_name = write(tmp_path / "a.yaml", "model: midi\ndata: {builtin: {}}\n")
    assert load_config(PretrainConfig, by_name).model.n_layers == 3
    edited = write(
        tmp_path / "b.yaml", "model: {extends: mini, d_model: 128}\ndata: {builtin: {}}\n"
    )
    cfg = load_config(PretrainConfig, edited)
    assert (cfg.model.n_layers, cfg.model.d_model) == (2, 128)


def test_child_edits_a_preset_chosen_by_its_base(presets, tmp_path):
    write(tmp_path / "base.yaml", "model: midi\ndata: {builtin: {}}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nmodel: {n_layers: 8}\n")
    cfg = load_config(PretrainConfig, child)
    assert (cfg.model.n_layers, cfg.model.d_model) == (8, 64)


def test_override_swaps_a_preset_and_indexes_lists(presets, tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "model: mini\ndata:\n  sources:\n    - {paths: [a.jsonl]}\n    - {paths: [b.jsonl]}\n",
    )
    cfg = load_config(PretrainConfig, path, ["model=midi", "data.sources.1.weight=3"])
    assert cfg.model.n_layers == 3
    assert [s.weight for s in cfg.data.sources] == [1.0, 3.0]
    [problem] = problems_of(PretrainConfig, path, ["data.sources.5.weight=3"])
    assert "data.sources.5" in problem and "2-item list" in problem


def test_unknown_preset_lists_the_available_ones_and_suggests(presets, tmp_path):
    path = write(tmp_path / "c.yaml", "model: mimi\ndata: {builtin: {}}\n")
    [problem] = problems_of(PretrainConfig, path)
    assert "c.yaml:1" in problem
    assert "no preset 'mimi'" in problem and "available: midi, mini" in problem
    assert "did you mean 'mini'" in problem


def test_missing_required_section_is_named(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {builtin: {}}\n")
    [problem] = problems_of(PretrainConfig, path)
    assert "model: required key is missing" in problem


def test_malformed_override_is_reported():
    [problem] = problems_of(RunConfig, None, ["optim.lr"])
    assert "override 'optim.lr'" in problem and "key=value" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("run:\n  name: [unclosed\n", "invalid YAML"),
        ("run: {seed: 1}\nrun: {seed: 2}\n", "duplicate key 'run'"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_malformed_yaml_names_the_file_and_line(tmp_path, text, expected):
    path = write(tmp_path / "bad.yaml", text)
    [problem] = problems_of(RunConfig, path)
    assert expected in problem and "bad.yaml" in problem


def test_circular_extends_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    [problem] = problems_of(RunConfig, tmp_path / "a.yaml")
    assert "circular extends" in problem


def test_missing_base_and_missing_file_are_reported(tmp_path):
    path = write(tmp_path / "a.yaml", "extends: nowhere.yaml\n")
    assert "cannot find base config 'nowhere.yaml'" in problems_of(RunConfig, path)[0]
    assert "cannot read config file" in problems_of(RunConfig, tmp_path / "absent.yaml")[0]


def test_resolved_config_round_trips_through_the_written_file(presets, tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "model: {extends: mini, tie_embeddings: false}\ndata: {builtin: {docs: 10, shards: 2}}\n",
    )
    cfg = load_config(PretrainConfig, path, ["optim.betas=[0.8, 0.9]", "dist.zero_stage=3"])
    written = save_config(cfg, tmp_path / "run")
    again = load_config(PretrainConfig, written)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert yaml.safe_load(written.read_text())["model"]["tie_embeddings"] is False


def test_every_shipped_recipe_is_valid():
    recipes = sorted((CONFIG_ROOT / "pretrain").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        cfg = load_config(PretrainConfig, recipe)
        assert cfg.run.name == recipe.stem

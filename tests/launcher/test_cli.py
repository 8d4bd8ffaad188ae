"""`python -m launcher STAGE CONFIG [overrides]`: validation first, clear errors, real outputs."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.cli import ended_cleanly, main
from launcher.config import CONFIG_ROOT, load_config
from pretrain.config import PretrainConfig

TINY = str(CONFIG_ROOT / "pretrain" / "tiny.yaml")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_bad_config_exits_2_naming_every_key_before_anything_is_written(in_tmp, capsys):
    code = main(["prepare", TINY, "model.n_heads=5", "train.max_stepz=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 problems" in err
    assert "model.n_heads" in err and "train.max_stepz" in err
    assert "configs/model/tiny.yaml:6: model.n_kv_heads: n_kv_heads (2) must divide" in err
    assert not (in_tmp / "runs").exists() and not (in_tmp / "data").exists()


def test_nproc_and_nodes_set_the_world_size_that_is_validated(in_tmp, capsys):
    assert main(["prepare", TINY, "--nproc", "3", "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size: 8 is not divisible" in err and "world size (6)" in err
    assert main(["prepare", TINY, "--nproc", "2", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["dist"]["num_processes"] == 2


def test_unknown_stage_lists_the_known_ones(capsys):
    assert main(["pretrian", TINY]) == 2
    err = capsys.readouterr().err
    listed = err.split("unknown stage 'pretrian'; stages: ")[1].strip().split(", ")
    assert listed == sorted(listed)  # every registered stage, in order (new ones too)
    assert {"classify", "dpo", "prepare", "pretrain", "reward", "sft"} <= set(listed)


def test_print_config_shows_the_resolved_config_and_writes_nothing(in_tmp, capsys):
    assert main(["prepare", TINY, "optim.lr=5e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["optim"]["lr"] == 5e-4
    assert yaml.safe_load(out)["model"]["d_model"] == 128  # the tiny preset, expanded
    (in_tmp / "resolved.yaml").write_text(out)
    assert load_config(PretrainConfig, in_tmp / "resolved.yaml") == load_config(
        PretrainConfig, TINY, ["optim.lr=5e-4"]
    )
    assert not (in_tmp / "runs").exists()


def test_missing_corpus_files_exit_1_naming_the_config_key(in_tmp, capsys):
    code = main(["prepare", TINY, "data.builtin=null", "data.sources=[{paths: [nowhere/*.jsonl]}]"])
    assert code == 1
    err = capsys.readouterr().err
    assert "has no files: data.sources.0.paths.0: 'nowhere/*.jsonl' matches no file" in err


def test_corrupt_corpus_line_exits_1_naming_file_and_line(in_tmp, capsys):
    good = json.dumps({"text": "a fine document " * 50})
    with gzip.open(in_tmp / "bad.jsonl.gz", "wt") as f:
        f.write(f"{good}\n{good}\n{{not json\n")
    source = ["data.builtin=null", "data.sources=[{paths: [bad.jsonl.gz]}]"]
    assert main(["prepare", TINY, *source, "data.on_error=raise"]) == 1
    assert "bad.jsonl.gz:3: invalid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_makes_corpus_tokenizer_and_a_loadable_hf_model(in_tmp, capsys):
    assert main(["prepare", TINY, "run.name=e2e"]) == 0
    out = capsys.readouterr().out
    run = in_tmp / "runs" / "e2e"
    for line in ("runs/e2e/config.yaml", "data/builtin-tiny/", "runs/e2e/model-init/"):
        assert line in out
    assert load_config(PretrainConfig, run / "config.yaml").run.name == "e2e"
    manifest = json.loads((in_tmp / "data" / "builtin-tiny" / "manifest.json").read_text())
    assert manifest["docs"] == 600

    model = AutoModelForCausalLM.from_pretrained(run / "model-init")
    tok = AutoTokenizer.from_pretrained(run / "model-init")
    assert sum(p.numel() for p in model.parameters()) == 1_000_576
    assert model.config._attn_implementation == "sdpa"
    assert (len(tok), tok.eos_token_id, model.config.eos_token_id) == (2048, 2, 2)
    text = "The river that runs through the town is 42 miles long."
    assert tok.decode(tok.encode(text)) == text

    # Re-running the same command reuses the corpus and the tokenizer.
    assert main(["prepare", TINY, "run.name=e2e"]) == 0
    out = capsys.readouterr().out
    assert "shards, 600 documents" in out and out.count("reused") == 2


@pytest.mark.slow
def test_module_entry_point_and_console_script_validate_before_running(in_tmp):
    kiln = Path(sys.executable).with_name("kiln")
    for cmd in ([sys.executable, "-m", "launcher"], [str(kiln)]):
        done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "prepare, pretrain" in done.stdout
        done = subprocess.run(
            [*cmd, "prepare", TINY, "model.n_heads=5"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and "model.n_heads" in done.stderr


def test_an_agent_ended_by_a_stop_signal_is_clean_only_if_every_worker_returned(tmp_path):
    """torch's agent exits 128 + signal after forwarding a stop; the launch is clean (exit 0,
    so srun cancels nothing) only when each of the node's workers reported its stage returned."""
    usr1 = 128 + int(signal.SIGUSR1)
    assert not ended_cleanly(usr1, tmp_path, nproc=2)
    (tmp_path / "0").write_text("SIGUSR1\n")
    assert not ended_cleanly(usr1, tmp_path, nproc=2)  # rank 1 did not return: it failed
    (tmp_path / "1").write_text("SIGUSR1\n")
    assert ended_cleanly(usr1, tmp_path, nproc=2)
    assert ended_cleanly(128 + int(signal.SIGTERM), tmp_path, nproc=2)
    assert not ended_cleanly(1, tmp_path, nproc=2)  # the agent itself failed
    assert not ended_cleanly(128 + int(signal.SIGKILL), tmp_path, nproc=2)


def test_one_node_takes_a_free_port_unless_given_and_nodes_agree_on_29500(monkeypatch, capsys):
    """Two single-node runs started together must not both try port 29500 (accelerate checks
    it, then binds later: a race), so one node asks accelerate for a free one (port 0);
    several nodes must agree on a port without talking, so 29500 unless given."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    demo = str(CONFIG_ROOT / "pretrain" / "demo.yaml")

    def port(*flags: str) -> str:
        assert main(["pretrain", demo, "--dry-run", *flags]) == 0
        words = capsys.readouterr().out.split()
        return words[words.index("--main_process_port") + 1]

    assert port("--nproc", "2") == "0"
    assert port("--nproc", "2", "--main-port", "29611") == "29611"
    assert port("--nproc", "2", "--nodes", "2", "--main-addr", "127.0.0.1") == "29500"
    monkeypatch.setenv("MASTER_PORT", "29612")
    assert port("--nproc", "2") == "29612"

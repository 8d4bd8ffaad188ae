"""`kiln classify` end to end through the CLI: early stopping on 2 ranks ends a finished run
(exit 0, no PREEMPTED) whose export is the best epoch's; the genre task on the pretrained tiny
parent reaches the acceptance macro-F1, and `kiln predict` agrees with a transformers
pipeline in a fresh process."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune.classify import ClassifyTask
from finetune.classify_config import ClassifyConfig
from finetune.classify_report import score_set
from launcher.config import CONFIG_ROOT, load_config
from launcher.rundir import PREEMPTED

from .classify_fixtures import labelled, metrics, settings, tiny_parent

__all__ = ["labelled", "tiny_parent"]  # fixtures

REPO = CONFIG_ROOT.parent


def kiln(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_early_stopping_on_two_zero3_ranks_finishes_and_exports_the_best_epoch(
    tmp_path, tiny_parent, labelled
):
    tree = settings(tmp_path, tiny_parent, labelled, "early", patience=1, min_delta=1.0)
    tree["train"]["epochs"] = 3
    tree["dist"]["zero_stage"] = 3  # the head's seeded init, evaluation and export, sharded
    path = tmp_path / "early.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    done = kiln("classify", str(path), "--nproc", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = load_config(ClassifyConfig, path)
    run_dir = cfg.run_dir
    lines = metrics(run_dir)
    assert {m["dist/world_size"] for m in lines} == {2.0}
    assert {m["dist/zero_stage"] for m in lines} == {3.0}
    evaluations = [m for m in lines if "eval/macro_f1" in m]
    assert [m["step"] for m in evaluations] == [15, 30]  # stopped after epoch 2 of 3
    assert not (run_dir / PREEMPTED).exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["early_stopped_after_epoch"] == 2 and report["best"]["epoch"] == 1
    lineage = json.loads((run_dir / "hf" / "kiln.json").read_text())
    assert lineage["weights_from"].endswith("step-00000015")
    # the export, scored here on the validation set, is epoch 1's model
    from transformers import AutoModelForSequenceClassification

    task = ClassifyTask(cfg, SimpleNamespace(rank=0, world_size=1))
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "hf")
    scored = score_set(task, model, task.sets.splits["validation"])
    assert abs(scored["macro_f1"] - evaluations[0]["eval/macro_f1"]) < 1e-6
    assert abs(scored["loss"] - evaluations[0]["eval/loss"]) < 1e-5


@pytest.mark.slow
@pytest.mark.serial  # a wall-clock limit
def test_genre_classification_on_the_pretrained_parent(tmp_path, genre_classifier):
    corpus, run_dir = genre_classifier.corpus, genre_classifier.run_dir
    seconds = genre_classifier.seconds
    report = json.loads((run_dir / "report.json").read_text())
    print(f"genre run: {seconds:.0f} s; test {report['test']['macro_f1']:.4f}, untrained "
          f"{report['untrained_test']['macro_f1']:.4f}")  # fmt: skip
    assert len(report["epochs"]) <= 3 and report["examples"]["test"] >= 50
    assert report["test"]["macro_f1"] >= 0.90
    assert report["untrained_test"]["macro_f1"] <= 0.35
    assert seconds < 120
    assert (run_dir / "report.md").exists() and (run_dir / "curves.png").stat().st_size > 0
    config = json.loads((run_dir / "hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(report["labels"])}
    assert list(config["label2id"]) == report["labels"]

    # kiln predict and a plain transformers pipeline in a fresh process agree on 50 texts
    with gzip.open(sorted(corpus.glob("shard-*.jsonl.gz"))[0], "rt") as f:
        records = [json.loads(next(f)) for _ in range(50)]
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))
    done = kiln("predict", str(run_dir / "hf"), str(texts), "--out", "preds.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = [json.loads(x)["label"] for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        "texts = [json.loads(x)['text'] for x in open(sys.argv[2])]\n"
        "out = pipeline('text-classification', model=sys.argv[1])(texts, truncation=True)\n"
        "print(json.dumps([o['label'] for o in out]))\n"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", script, str(run_dir / "hf"), str(texts)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    theirs = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert len(ours) == 50 and ours == theirs
    assert sum(a == r["genre"] for a, r in zip(ours, records, strict=True)) >= 45

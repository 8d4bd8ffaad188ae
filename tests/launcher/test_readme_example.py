"""The README's 30-line example stage runs as printed, trains, and resumes."""

from __future__ import annotations

import json
import re

from launcher.config import CONFIG_ROOT

README = CONFIG_ROOT.parent / "README.md"


def example() -> str:
    text = README.read_text()
    start = text.index("A whole stage in 30 lines")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_readme_example_stage_trains_and_resumes(tmp_path, monkeypatch, capsys):
    code = example()
    assert len(code.strip().splitlines()) <= 50  # the class itself is ~30 lines
    monkeypatch.chdir(tmp_path)  # runs/ goes here
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    loss = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert loss < 1e-3  # y = 3x + 1 learned down to the noise (0.01^2)
    run = tmp_path / "runs" / "regression"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in lines) == 200
    assert (run / "checkpoints" / "step-00000200" / "manifest.json").exists()
    # run again: it resumes the finished run from its checkpoint, trains nothing more
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["step"] == 200 and "train/loss" in x) == 1

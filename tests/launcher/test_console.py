"""What a 2-process run prints: kiln's lines and no library banners, unless --verbose."""

from __future__ import annotations

import subprocess

import pytest

from launcher import console

from . import runs

# One line each library prints on a plain CPU run, and where it comes from.
BANNERS = {
    "deepspeed accelerator": "Setting accelerator to CPU",
    "deepspeed optimizer": "untested optimizer",
    "torch.distributed deprecation": "FutureWarning",
    "wandb banner": "wandb: ",
    "torchao without triton": "Detected no triton",
}
OMP_BANNER = "Setting OMP_NUM_THREADS environment variable"  # torchrun, when it is unset


def run_tiny(root, name: str, *flags: str) -> str:
    command = runs.command(root, name, "train.max_steps=2", "schedule.warmup_steps=1")
    command += ["metrics.wandb=true", "metrics.progress_bar=true", *flags]  # as a user has them
    env = {k: v for k, v in runs.env().items() if not k.startswith(("WANDB_", "KILN_"))}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("DS_ACCELERATOR", None)
    env.update(WANDB_MODE="offline", WANDB_DIR=str(root), TORCH_EXTENSIONS_DIR=str(root / "ext"))
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert runs.world_sizes(root, name) == {2.0}
    assert "[kiln] trained 2 steps" in out, out[-6000:]
    # DeepSpeed's CPU shared-memory op (inference only) is not compiled: nothing was built
    built = list((root / "ext").rglob("*.so")) if (root / "ext").exists() else []
    assert not built and "built successfully" not in out, built
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(console.has_accelerator(), reason="the banners checked are the CPU ones")
def test_a_two_process_run_prints_kiln_lines_and_no_banners_unless_verbose(tmp_path):
    quiet = run_tiny(tmp_path, "quiet")
    shown = {what: line for what, line in BANNERS.items() if line in quiet}
    assert not shown, quiet
    assert OMP_BANNER not in quiet
    assert "[kiln] tokenizer" in quiet and "[kiln] step 2/2" in quiet  # and the progress

    verbose = run_tiny(tmp_path, "verbose", "--verbose")
    hidden = [what for what, line in BANNERS.items() if line not in verbose]
    assert not hidden, verbose
    assert OMP_BANNER not in verbose  # not hidden: OMP_NUM_THREADS is set (cores / processes)

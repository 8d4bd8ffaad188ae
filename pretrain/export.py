"""Checkpoint -> plain HF model directory (safetensors, config.json, tokenizer files, and
generation_config.json for a decoder), without DeepSpeed or a process group: the checkpoint
holds every weight in full, by name (launcher/snapshot.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from launcher.checkpoint import read_manifest, verify
from launcher.config import load_config
from launcher.data.tokenizer import TextTokenizer
from pretrain.config import PretrainConfig
from pretrain.model import build_model

log = logging.getLogger(__name__)


def export_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``out`` from checkpoint ``folder`` (verified first; ``CheckpointError`` if not)."""
    verify(folder, read_manifest(folder))
    cfg = load_config(PretrainConfig, folder / "config.yaml")
    tokenizer = TextTokenizer.load(folder / "tokenizer")
    model = build_model(
        cfg.model,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # a tied weight (Llama's lm_head, BERT's decoder and its bias) is another name of a
    # parameter, stored once under the name named_parameters() gives it
    stored = {name for name, _ in model.named_parameters()}
    missing = [m for m in missing if m in stored]
    if missing or unexpected:
        raise KeyError(f"{folder}: missing {missing}, unexpected {unexpected}")
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save(out, model_max_length=cfg.model.max_seq_len)
    if model.can_generate():  # an encoder has no generation config
        model.generation_config.save_pretrained(out)
    log.info("exported %s to %s (%s)", folder, out, dtype)
    return out

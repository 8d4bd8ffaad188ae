"""`kiln export` for a classify checkpoint: a plain HF classifier directory, without DeepSpeed
or a process group (the checkpoint holds every weight in full, by name, frozen ones too).

The checkpoint carries what rebuilding the model needs (``ClassifyTask.save_extras``): the
resolved ``config.yaml`` (the parent, PEFT settings), ``labels.json`` (the label map) and the
tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

from finetune.classify_config import ClassifyConfig
from launcher.checkpoint import read_manifest, verify
from launcher.data.tokenizer import TextTokenizer

LABELS = "labels.json"


def export_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out`` from checkpoint ``folder`` (verified first; ``CheckpointError`` if not,
    ``KeyError`` naming weights the model does not have or lacks)."""
    verify(folder, read_manifest(folder))
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    # the sections of a stage that extends ClassifyConfig (distill-classify's teacher) are
    # not needed to rebuild the model
    cfg = ClassifyConfig.model_validate(
        {k: v for k, v in saved.items() if k in ClassifyConfig.model_fields}
    )
    info = json.loads((folder / LABELS).read_text())
    labels, head = info["labels"], info["head"]
    tokenizer = TextTokenizer.load(folder / "tokenizer")
    config = AutoConfig.from_pretrained(
        cfg.init.path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=tokenizer.pad_id,
    )
    model = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)](config).float()
    if cfg.classify.peft is not None:
        from finetune.classify_peft import merged, wrap_peft

        model = wrap_peft(model, cfg.classify.peft, head, seed=0)
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise KeyError(f"{folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.classify.peft is not None:
        model = merged(model, None)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save(out, model_max_length=cfg.data.max_length)
    return out

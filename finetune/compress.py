"""The `compress` stage (one process): write compressed variants of a causal LM as plain HF
directories and measure them beside the original in one table.

    python -m launcher compress configs/compress/tiny.yaml

writes ``runs/<name>/variants/<kind>/`` (each through a temporary directory and a rename:
an existing variant is replaced only by a complete one) and ``runs/<name>/compress.md``,
``compress.json`` (the same numbers) and ``compress.png`` (quality against bytes on disk).
Every model is measured in a fresh process (``finetune.compress_measure``). Training to
recover what pruning lost is the shared loop's job (the ``distill`` stage with a pruned
export as ``init.path``), not this stage's.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from finetune.compress_config import CompressConfig, model_kind
from finetune.compress_report import quantized_share, tensor_bytes, write_report
from finetune.compress_variants import (
    CompressError,
    channel_activations,
    channel_norms,
    gated_mlps,
    prune_ffn,
    prune_unstructured,
    quantization_config,
    zero_share,
)
from launcher.config import save_config
from launcher.data.batches import evaluation_batches
from launcher.data.documents import CorpusError, scan
from launcher.data.sources import is_held_out, resolve_corpus
from launcher.data.tokenizer import TextTokenizer
from launcher.data.validation import build_validation, pack_documents
from launcher.hf_dir import read_config
from launcher.runner import LINEAGE, export_atomically, parent_lineage
from launcher.stages import Stage
from pretrain.data.builtin import write_builtin_corpus

# files of an HF directory that a variant shares with its original (not weights or config)
SHARED_FILES = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*")


def check_model(folder: Path) -> str:
    """``causal`` or ``classifier`` (what the table can score: bits per byte, macro-F1); say
    what was found otherwise."""
    kind = model_kind(folder)
    if kind is None:
        config = read_config(folder)
        names = config.get("architectures") or []
        found = ", ".join(names) or f"model_type {config.get('model_type')!r}"
        raise CompressError(
            f"{folder}/config.json: the compress stage measures causal LMs (bits per byte) and "
            f"sequence classifiers (macro-F1), and this is {found}; encoder variants are not "
            "built yet"
        )
    return kind


def auto_class(kind: str):
    """The plain transformers loader of a ``model_kind``: what a user's tools call."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification


def load(folder: Path, kind: str = "causal", **kwargs):
    return auto_class(kind).from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def training_texts(corpus, fraction: float, limit: int) -> list[str]:
    """Up to ``limit`` documents of the training split (not held out), in file order: what
    the activation ranking of MLP channels reads (never the validation documents)."""
    texts: list[str] = []
    for source in corpus.sources:
        for path in source.files:
            try:
                for doc, _ in scan(path, format=source.format, text_field=source.text_field):
                    if not isinstance(doc, CorpusError) and not is_held_out(doc, fraction):
                        texts.append(doc.text)
                        if len(texts) >= limit:
                            return texts
            except CorpusError:
                continue
    return texts


def write_variant(out: Path, model, original: Path, info: dict) -> None:
    """``model`` saved as a plain HF directory with the original's tokenizer files and a
    ``kiln.json`` naming its parent, through a temporary directory and a rename."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        for pattern in SHARED_FILES:
            for f in original.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        lineage = original / LINEAGE
        parent = {**parent_lineage(original)}
        parent["lineage"] = json.loads(lineage.read_text()) if lineage.exists() else None
        (tmp / LINEAGE).write_text(
            json.dumps({"stage": "compress", **info, "parent": parent}, indent=2) + "\n"
        )

    export_atomically(out, write)


class Compressor:
    """The original, the held-out data every model is scored on, and how each variant is
    made. A causal LM is scored by validation bits per byte on ``data``; a classifier by
    macro-F1 on the test split of ``classification``."""

    def __init__(self, cfg: CompressConfig):
        self.cfg = cfg
        self.original = Path(cfg.init.path)
        self.kind = check_model(self.original)
        self.tokenizer = TextTokenizer.load(self.original)
        if self.kind == "classifier":
            self.split, self.examples = labelled_examples(cfg, self.original, self.tokenizer)
            return
        if cfg.data.builtin is not None:
            write_builtin_corpus(cfg.data.builtin)
        self.corpus = resolve_corpus(cfg.data)
        self.validation = build_validation(cfg.data, self.corpus, self.tokenizer)

    def inputs(self) -> dict:
        """What each measuring process reads: the scored batches and the latency row."""
        micro = self.cfg.train.micro_batch_size
        if self.kind == "classifier":
            batches = evaluation_batches(
                self.examples, rank=0, world_size=1, batch_size=micro, pad_id=self.tokenizer.pad_id
            )
            tokens = np.concatenate([e.tokens for e in self.examples])
            return {"kind": self.kind, "batches": batches, "latency_ids": self.latency_ids(tokens)}
        return {
            "kind": self.kind,
            "batches": self.validation.batches(0, 1, micro),
            "text_bytes": self.validation.text_bytes,
            "latency_ids": self.latency_ids(self.validation.input_ids.reshape(-1)),
        }

    def scored(self) -> str:
        if self.kind == "classifier":
            return f"{len(self.examples)} {self.split} examples (macro-F1)"
        val = self.validation
        return f"{val.documents} documents, {val.text_bytes / 1e3:.0f} kB (bits per byte)"

    def calibration(self) -> list[dict[str, torch.Tensor]]:
        data = self.cfg.data
        texts = training_texts(self.corpus, data.validation.fraction, self.cfg.ffn.calibration_docs)
        if not texts:
            raise CorpusError(
                "no training-split documents to rank MLP channels with (ffn.rank: activation)"
            )
        prefix = [self.tokenizer.bos_id] if data.add_bos else []
        docs = [
            [*prefix, *ids, self.tokenizer.eos_id] for ids in self.tokenizer.encode_batch(texts)
        ]
        rows = pack_documents(docs, data.seq_len, data.document_boundaries, self.tokenizer.pad_id)
        keys = [
            k
            for k in ("input_ids", "targets", "position_ids", "segment_ids")
            if rows.get(k) is not None
        ]
        return [
            {k: torch.from_numpy(rows[k][i : i + 8]) for k in keys}
            for i in range(0, len(rows["input_ids"]), 8)
        ]

    def make(self, kind: str, out: Path) -> dict:
        """Write one variant; returns what the table says about how it was made."""
        cfg = self.cfg
        if kind in ("int8-weight", "int8-dynamic"):
            model = load(self.original, self.kind, quantization_config=quantization_config(kind))
            write_variant(out, model, self.original, {"variant": kind})
            share = quantized_share(self.original, out)
            return {
                "note": f"quantized layers {share:.2f}x their fp32 bytes",
                "quantized_share": share,
            }
        model = load(self.original)
        if kind == "unstructured":
            prune_unstructured(model, cfg.prune.sparsity, cfg.prune.scope)
            share = zero_share(model)
            write_variant(out, model, self.original, {"variant": kind, **cfg.prune.model_dump()})
            return {
                "note": f"{share:.1%} of prunable weights are 0 ({cfg.prune.scope})",
                "zero_share": share,
            }
        # ffn
        if cfg.ffn.rank == "norm":
            scores = [channel_norms(m) for m in gated_mlps(model)]
        else:
            scores = channel_activations(model, self.calibration())
        smaller = prune_ffn(model, cfg.ffn.fraction, scores)
        write_variant(out, smaller, self.original, {"variant": kind, **cfg.ffn.model_dump()})
        size = smaller.config.intermediate_size
        note = f"intermediate_size {model.config.intermediate_size} -> {size} ({cfg.ffn.rank})"
        return {"note": note, "intermediate_size": size}

    def measure(self, folder: Path, inputs: Path) -> dict:
        b = self.cfg.bench
        command = [sys.executable, "-m", "finetune.compress_measure", str(folder), str(inputs),
                   str(b.threads), str(b.warmup), str(b.runs)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(b.threads), "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {folder} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
        result["bytes_on_disk"] = sum(f.stat().st_size for f in weights)
        return result

    def latency_ids(self, tokens: np.ndarray) -> torch.Tensor:
        """The one row of ``bench.seq_len`` held-out tokens every latency run forwards (a
        classifier's short test texts are repeated to fill it)."""
        n = self.cfg.bench.seq_len
        if self.kind == "classifier" and 0 < len(tokens) < n:
            tokens = np.tile(tokens, -(-n // len(tokens)))
        ids = torch.from_numpy(np.asarray(tokens[:n], dtype=np.int64).copy())
        if len(ids) < n:
            raise CorpusError(
                f"bench.seq_len {n}: the validation split holds only {len(ids)} tokens"
            )
        return ids[None]


def labelled_examples(cfg: CompressConfig, folder: Path, tokenizer: TextTokenizer):
    """(split, examples) a classifier is scored on: ``classification``'s test split, or its
    validation split when no test example is held out. The labels read must be the model's
    own (``id2label``, in order), else its predictions would be scored against other labels."""
    from finetune.classify_data import read_sets
    from finetune.classify_model import saved_labels

    reader = SimpleNamespace(
        data=cfg.classification, classify=SimpleNamespace(class_weights="none")
    )
    sets = read_sets(reader, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    own = saved_labels(config)
    if own != sets.labels:
        raise CompressError(
            f"{folder}/config.json: the model's labels ({', '.join(map(str, own))}) are not the "
            f"labels of classification's data ({', '.join(sets.labels)}); give the data the "
            "classifier was trained on"
        )
    for split in ("test", "validation"):
        if sets.splits[split]:
            return split, sets.splits[split]
    raise CorpusError(
        "classification: no test or validation example to score (set test_fraction or "
        "validation_fraction above 0, or give test files)"
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def original_note(folder: Path) -> str:
    """What the original row says: whether its files hold a tied output head twice (an
    export that passed a state dict keeps both names), which its variants do not."""
    config = json.loads((folder / "config.json").read_text())
    stored = tensor_bytes(folder)
    head = "lm_head.weight"
    if config.get("tie_word_embeddings") and head in stored:
        return f"as given; stores the tied {head} too ({stored[head] / 1e6:.2f} MB)"
    return "as given"


def header() -> dict:
    def ver(name: str) -> str:
        try:
            return version(name)
        except Exception:  # not installed
            return "not installed"

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "processor": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": ver("torchao"),
        "transformers": ver("transformers"),
    }


def compress(cfg: CompressConfig) -> dict:
    """Write the variants, measure every model, write the table; returns the table's data."""
    run_dir = cfg.run_dir
    check_model(Path(cfg.init.path))
    print(f"[kiln] resolved config {save_config(cfg, run_dir)}")
    job = Compressor(cfg)
    print(f"[kiln] scored on       {job.scored()}")
    rows: dict[str, dict] = {}
    metric = "macro_f1" if job.kind == "classifier" else "bits_per_byte"
    inputs = run_dir / "measure-inputs.pt"
    torch.save(job.inputs(), inputs)
    try:
        models = {"original": (job.original, {"note": original_note(job.original)})}
        models |= {label: (Path(p), {"note": "compared"}) for label, p in cfg.compare.items()}
        for kind in cfg.variants:
            started = time.monotonic()
            out = run_dir / "variants" / kind
            made = job.make(kind, out)
            print(
                f"[kiln] variant         {out}/ ({made['note']}; {time.monotonic() - started:.1f}s)"
            )
            models[kind] = (out, made)
        for label, (folder, made) in models.items():
            rows[label] = {"path": str(folder), **made, **job.measure(folder, inputs)}
            row = rows[label]
            quality = f"{row[metric]:.4f} {metric.replace('_', ' ')}"
            print(f"[kiln] measured        {label}: {quality}, {row['latency_ms']:.2f} ms")
    finally:
        inputs.unlink(missing_ok=True)
    bench = {"threads": cfg.bench.threads, "seq_len": cfg.bench.seq_len}
    scored = {"metric": metric, "scored_on": job.scored()}
    table = {"header": {**header(), **bench, **scored}, "models": rows}
    for path in write_report(table, run_dir):
        print(f"[kiln] table           {path}")
    return table


STAGE = Stage(
    name="compress",
    config_class=CompressConfig,
    run=compress,
    help="int8 (torchao) and pruned variants of a model, and their size/speed/quality table",
)

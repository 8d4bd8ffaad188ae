"""The ``dpo`` stage: Direct Preference Optimisation of a causal LM on preference pairs, on
the shared loop.

Pairs are the reward stage's (``reward_data``). A pair's log-probs are summed over its trained
(response) tokens, EOS included; z = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)].
A micro-batch's loss is the SUM of the per-pair losses with the pairs as its items, so a step's
loss is the mean over all its pairs (TRL's form). The reference is a frozen copy of the parent
(``runtime.prepare_frozen``: sharded under ZeRO-3) or, with LoRA, the actor with its adapters
disabled. The export is the SFT one (a causal LM with tokenizer and chat template).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.chat import chosen_template
from finetune.classify_data import require_distinct_pad
from finetune.common import FrozenModels, PairBatches, announce_data, record_counters, size
from finetune.dpo_config import DPOConfig, DPOSection
from finetune.grpo import PromptEncoder
from finetune.judge import Judge
from finetune.peft_setup import load_parent, reference_model, trainable_parameters
from finetune.reward_data import PairEncoder, read_pair_sets
from finetune.sft import SFTTask, export_checkpoint
from launcher.data.batches import ExampleStream, evaluation_batches
from launcher.data.packing import IGNORE
from launcher.data.tokenizer import TextTokenizer
from launcher.forward import forward_logits
from launcher.metrics import record
from launcher.runner import run_stage
from launcher.runtime import Runtime
from launcher.stages import Stage
from launcher.states import RunJson
from launcher.task import Task

SIDES = ("", "rejected_")
"""Batch key prefixes of the chosen and the rejected sequences (``pad_examples``)."""


def sequence_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's trained tokens [B], their count [B]) for the
    ``<prefix>`` sequences of ``batch`` (targets already shifted, ``IGNORE`` elsewhere)."""
    logits = forward_logits(model, batch, prefix).float()
    targets = batch[f"{prefix}targets"]
    mask = targets != IGNORE
    logps = torch.log_softmax(logits, dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_losses(
    pi: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor],
    lengths: tuple[torch.Tensor, torch.Tensor],
    cfg: DPOSection,
) -> torch.Tensor:
    """Per-pair DPO losses [B] from (chosen, rejected) summed log-probs of the policy and the
    reference and (chosen, rejected) response lengths; forms as TRL 1.16's ``DPOTrainer``."""
    dc, dr = pi[0] - ref[0], pi[1] - ref[1]
    if cfg.loss == "ipo":  # length-averaged log-ratios (trl 1.16)
        h = dc / lengths[0] - dr / lengths[1]
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    elif cfg.loss == "robust":
        z, eps = cfg.beta * (dc - dr), cfg.epsilon
        losses = (-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)
    else:
        losses = -F.logsigmoid(cfg.beta * (dc - dr))
    if cfg.nll_coef:
        losses = losses - cfg.nll_coef * pi[0] / lengths[0]
    return losses


class DPOTask(PairBatches, Task):
    name = "dpo"
    cfg: DPOConfig

    def __init__(self, cfg: DPOConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.parent = Path(cfg.init.path)
        self.tokenizer = TextTokenizer.load(self.parent)
        require_distinct_pad(self.tokenizer)
        self.template = chosen_template(cfg.chat.template, self.tokenizer, self.parent)
        encoder = PairEncoder(self.tokenizer, cfg.data.max_seq_len, "margin", self.template)
        self.train_set, self.validation = read_pair_sets(cfg.data, encoder, cfg.run.seed)
        self.stream = ExampleStream(
            self.train_set.examples,
            batch_size=cfg.train.micro_batch_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=cfg.run.seed,
            pad_id=self.tokenizer.pad_id,
            shuffle=cfg.data.shuffle,
        )
        self.reference: nn.Module | None = None
        self.judge = None
        if cfg.judge is not None:
            limit = cfg.data.max_seq_len - cfg.judge.max_new_tokens
            encoder = PromptEncoder(self.tokenizer, limit, self.template, "judge")
            self.judge = Judge(cfg.judge, encoder, runtime, cfg.train.micro_batch_size)
        used = (cfg.dpo.reference != "none" or self.judge is not None) and cfg.peft is None
        frozen = {"init.path (the DPO reference)": self.parent} if used else {}
        if self.judge is not None:
            frozen["judge.reward_model"] = cfg.judge.reward_model
        self.frozen = FrozenModels(frozen)
        self.trainable = (0, 0)
        if runtime.is_main:
            what = f"{len(self.train_set)} training pairs, {size(self.validation)} validation"
            announce_data(self.train_set, what)

    # ------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        model = load_parent(self.parent, self.cfg.peft, self.cfg.run.seed)
        self.trainable = trainable_parameters(model)
        return model

    def on_engine(self, engine: nn.Module) -> None:
        """The frozen reference: the parent again (full fine-tuning), none with LoRA; with
        ``dpo.reference: precompute`` it scores every pair now and is freed."""
        mode = self.cfg.dpo.reference
        if self.judge is not None:  # it measures the KL to the parent whatever the loss uses
            self.judge.load(self.cfg.run.seed)
        elif mode == "none":
            return
        if self.cfg.peft is None:
            parent = load_parent(self.parent, None, self.cfg.run.seed)
            self.reference = self.runtime.prepare_frozen(parent)
        if mode == "precompute":
            self._precompute(engine, self.train_set.examples)
            if self.validation is not None:
                self._precompute(engine, self.validation.examples)
            if self.judge is None:
                self.reference = None

    def _precompute(self, engine: nn.Module, examples: list) -> None:
        """The reference's summed log-probs of every pair, into each chosen and rejected
        example's ``ref_logps`` extra (so batches carry them as ``ref_logps`` and
        ``rejected_ref_logps``). Each rank scores its share in the order of
        ``evaluation_batches`` (the same number of forwards on every rank: ZeRO-3 gathers);
        one all-reduce gives every rank every value, since any rank may draw any pair."""
        rt, size = self.runtime, self.cfg.train.micro_batch_size
        batches = evaluation_batches(
            examples, rank=rt.rank, world_size=rt.world_size, batch_size=size,
            pad_id=self.tokenizer.pad_id,
        )  # fmt: skip
        values = torch.zeros(2, len(examples), dtype=torch.float64, device=rt.device)
        with torch.no_grad(), reference_model(self.reference, engine) as ref_model:
            for j, batch in enumerate(batches):
                batch = {k: v.to(rt.device) for k, v in batch.items()}
                start = (rt.rank + j * rt.world_size) * size  # the chunk evaluation_batches cut
                n = int(batch["example_mask"].sum())  # real rows come first; fillers: none
                ref = torch.stack([sequence_logps(ref_model, batch, p)[0] for p in SIDES])
                values[:, start : start + n] = ref[:, :n].double()
        rt.all_reduce(values)  # every pair was scored by exactly one rank
        for example, chosen, rejected in zip(examples, *values.tolist(), strict=True):
            example.extras["ref_logps"] = chosen
            example.extras["rejected"].extras["ref_logps"] = rejected

    # ---------------------------------------------------------------------------- batches

    # train_batches, steps_per_epoch, tokens_per_sequence, tokens_in, items_in: PairBatches

    # ------------------------------------------------------------------------------- loss

    def pair_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """(per-pair losses [B], policy log-probs, reference log-probs, lengths)."""
        pi = [sequence_logps(model, batch, p) for p in SIDES]
        mode = self.cfg.dpo.reference
        if mode == "precompute":
            ref = [batch[f"{p}ref_logps"].to(pi[0][0]) for p in SIDES]
        elif mode == "none":
            ref = [torch.zeros_like(pi[0][0]) for _ in SIDES]
        else:
            with torch.no_grad(), reference_model(self.reference, model) as ref_model:
                ref = [sequence_logps(ref_model, batch, p)[0] for p in SIDES]
        logps = (pi[0][0], pi[1][0])
        lengths = (pi[0][1], pi[1][1])
        return dpo_losses(logps, tuple(ref), lengths, self.cfg.dpo), logps, ref, lengths

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, pi, ref, _ = self.pair_terms(model, batch)
        real = batch["example_mask"].to(losses.device)
        with torch.no_grad():
            rc, rr = self.cfg.dpo.beta * (pi[0] - ref[0]), self.cfg.dpo.beta * (pi[1] - ref[1])
            record("train/accuracy", (rc > rr)[real].float().mean())
            record("train/margin", (rc - rr)[real].mean())
            record("logps/chosen", pi[0][real].mean())
            record("logps/rejected", pi[1][real].mean())
        return (losses * real).sum()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The validation pairs' scores and the judge's (``finetune/judge.py``)."""
        out = self._pair_scores(model)
        if self.judge is not None:
            reference = lambda: reference_model(self.reference, model)  # noqa: E731
            out |= self.judge(model, lambda m: m, reference, self.tokenizer)
        return out

    def _pair_scores(self, model: nn.Module) -> dict[str, float]:
        """Loss, implicit-reward accuracy (a tie is wrong), margin and log-probs over the whole
        validation set; every rank runs the same number of batches."""
        if self.validation is None:
            return {}
        rt = self.runtime
        batches = self.validation_batches(self.validation.examples, self.tokenizer.pad_id)
        sums = torch.zeros(6, dtype=torch.float64, device=rt.device)
        beta = self.cfg.dpo.beta
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(rt.device) for k, v in batch.items()}
                losses, pi, ref, _ = self.pair_terms(model, batch)
                real = batch["example_mask"].double()
                margin = (beta * ((pi[0] - ref[0]) - (pi[1] - ref[1]))).double()
                sums += torch.stack([
                    real.sum(), (losses.double() * real).sum(), ((margin > 0) * real).sum(),
                    (margin * real).sum(), (pi[0].double() * real).sum(),
                    (pi[1].double() * real).sum(),
                ])  # fmt: skip
        rt.all_reduce(sums)
        n, loss, right, margin, chosen, rejected = sums.tolist()
        n = max(n, 1.0)
        return {
            "eval/loss": loss / n, "eval/accuracy": right / n, "eval/margin": margin / n,
            "eval/logps_chosen": chosen / n, "eval/logps_rejected": rejected / n,
            "eval/pairs": sums[0].item(),
        }  # fmt: skip

    def on_log(self) -> None:
        record_counters(self.train_set, self.trainable[0])

    def summary(self, results: dict[str, float], state) -> list[str]:
        accuracy = results.get("eval/accuracy")
        tail = (
            f"; validation implicit-reward accuracy {accuracy:.4f}" if accuracy is not None else ""
        )
        return [f"trained {state.step} steps{tail}"]

    # ------------------------------------------------------------------ export and state

    export = SFTTask.export
    save_extras = SFTTask.save_extras

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict([s["data"] for s in states])

    def states(self) -> dict:
        """The reference's weights' digests (a frozen copy of the parent; optional: older
        checkpoints lack them)."""
        return {"frozen": RunJson(self.frozen, optional=True)}


def dpo(cfg: DPOConfig) -> dict[str, float]:
    """DPO of ``init.path`` on the preference pairs of ``data``, export ``runs/<name>/hf/``."""
    return run_stage(cfg, DPOTask)


STAGE = Stage(
    name="dpo",
    config_class=DPOConfig,
    run=dpo,
    help="direct preference optimisation from preference pairs (sigmoid/robust/ipo; full or LoRA)",
    distributed=True,
    export=export_checkpoint,
)

"""The stages of the training recipe (SFT, KTO, DPO): one small object each, with the same methods.

    stages, skipped = read_stages(config, base_model, ("sft", "kto"), StageFiles(train=..., preferences=..., pairs=...))
    stage.encode(tokenizer)                 # token ids; examples without a scored token left are dropped
    stage.prepare(model, from_base=True)    # preference stages: the reference log-probs, once, no gradients
    loss_sum, tokens, cells = stage.micro_loss(model, examples)
    stage.units(examples)                   # what a step's loss is averaged over
    stage.validation_loss(model)

In a data-parallel run (learn/train_dist.py) each method also takes the run's `ranks`: `micro_loss`
gets this process's share of a micro-batch (None back for an empty share), and `prepare` and
`validation_loss` split their batches between the processes and add up the results.

learn/train.py runs them in order on one LoRA: each stage starts where the previous one ended
(its best epoch). What differs between stages is only here:
- `sft`: chat examples (train.jsonl); loss per scored token; LoRA dropout on.
- `kto`: unpaired rated answers (preferences.jsonl, plus both sides of each pair); loss per row;
  class weights from the up:down ratio; dropout off, as TRL's trainers do by default.
- `dpo`: pairs (preference_pairs.jsonl); loss per pair; dropout off.
A preference example's two answers share one packed row and one forward pass. The reference model of a preference stage is the model as the stage starts: the base model
through peft's `disable_adapter()` when the LoRA is still fresh, else the adapter the stage starts
from (the champion, or the previous stage's result). Its log-probs are computed once before the
first step, so no second copy of the model is ever in memory. Reading checks every stage's file
before a model loads; a stage with fewer than `min_examples` rows is skipped with the reason
(the run fails only when no stage is left).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from learn.train_config import TrainConfig, TrainError
from learn.train_data import IGNORE, collate, encode, read_checked, scored_loss, split_validation
from learn.train_dist import SOLO, Ranks
from learn.train_pref import (class_weights, collate_packed, dpo_losses, encode_dpo, encode_kto, kl_estimate, kto_losses,
                              kto_rows, packed_logps, read_preferences)

STAGES = ("sft", "kto", "dpo")


@dataclass(frozen=True)
class StageFiles:
    """The data files of a run; a stage whose file is missing is skipped with that reason."""

    train: Path | None = None
    """Chat JSONL (SFT)."""
    val: Path | None = None
    """Chat JSONL for the SFT validation loss; default: val_fraction of `train`."""
    preferences: Path | None = None
    """KTO rows, TRL's unpaired format."""
    pairs: Path | None = None
    """DPO pairs, TRL's preference format."""


@dataclass
class Stage:
    """What every stage shares: its rows, their sources and the device it runs on."""

    config: TrainConfig
    rows: list
    val_rows: list
    sources: Counter
    pad_id: int = 0
    device: str = "cpu"
    train_set: list = field(default_factory=list)
    val_set: list = field(default_factory=list)
    dropout = False
    name = ""

    def batches(self, examples: list, size: int):
        for j in range(0, len(examples), size):
            yield examples[j: j + size]

    def describe(self) -> dict:
        return {"train": len(self.train_set), "val": len(self.val_set),
                "dropped": len(self.rows) + len(self.val_rows) - len(self.train_set) - len(self.val_set),
                "sources": dict(self.sources)}

    def prepare(self, model, *, from_base: bool, ranks: Ranks = SOLO) -> None:
        """Nothing to do before the first step (SFT); the preference stages override it."""

    def idle(self, model, ranks: Ranks):
        """No share of this micro-batch in this process: None, or under FSDP (every pass is a collective) a pass
        on a stand-in example whose loss is zero and counts nothing."""
        if not ranks.sharded:
            return None
        return self.micro_loss(model, self.train_set[:1])[0] * 0, 0, 0

    def validation_loss(self, model, ranks: Ranks = SOLO) -> float:
        """Mean loss over the validation set, in this stage's units (no gradients); each process scores its share
        of the batches and every process gets the same mean."""
        import torch

        total, units = 0.0, 0
        with torch.no_grad():
            chunks = list(self.batches(sorted(self.val_set, key=self.length), self.config.batch_size))
            for chunk in ranks.shard(chunks):
                total += float(self.micro_loss(model, chunk)[0])
                units += self.units(chunk)
            for _ in range(ranks.idle_passes(len(chunks))):  # FSDP: in step with the processes that have one more
                self.micro_loss(model, chunks[0])
        total, units = ranks.sum([total, units])
        return total / max(units, 1)


class SFTStage(Stage):
    name, dropout = "sft", True

    def encode(self, tokenizer) -> None:
        on_inputs = self.config.train_on_inputs == "true"  # auto: chat data, so assistant turns only

        def encoded(rows):
            examples = [encode(tokenizer, m, train_on_inputs=on_inputs, max_length=self.config.max_length) for m in rows]
            return [e for e in examples if any(t != IGNORE for t in e["labels"][1:])]

        self.train_set, self.val_set = encoded(self.rows), encoded(self.val_rows)

    @staticmethod
    def length(e: dict) -> int:
        return len(e["input_ids"])

    @staticmethod
    def units(examples: list) -> int:
        return sum(1 for e in examples for t in e["labels"][1:] if t != IGNORE)

    def micro_loss(self, model, examples: list, ranks: Ranks = SOLO):
        if not examples:
            return self.idle(model, ranks)
        batch = collate(examples, self.pad_id, self.device)
        return scored_loss(model, batch), int(batch["attention_mask"].sum()), batch["attention_mask"].numel()


class PreferenceStage(Stage):
    """KTO and DPO: two answers to one prompt per example, packed in one row (learn/train_pref.py `pack`);
    reference log-probs once at the start; loss averaged per example."""

    keys: tuple[str, str] = ("", "")

    @staticmethod
    def units(examples: list) -> int:
        return len(examples)

    @staticmethod
    def length(e: dict) -> int:
        return len(e["packed"]["input_ids"])

    def logps(self, model, examples: list):
        """(log p of each example's first answer, of its second, the batch) in one forward pass."""
        batch = collate_packed([e["packed"] for e in examples], self.pad_id, self.device)
        return (*packed_logps(model, batch), batch)

    def prepare(self, model, *, from_base: bool, ranks: Ranks = SOLO) -> None:
        import torch

        was_training = model.training
        model.eval()
        size = self.config.batch_size
        with torch.no_grad(), (model.disable_adapter() if from_base else nullcontext()):
            for examples in (self.train_set, self.val_set):
                ordered = sorted(examples, key=self.length)
                refs = [0.0] * (2 * len(ordered))  # (first, second) of each example; each process fills its batches
                starts = range(0, len(ordered), size)
                for start in ranks.shard(starts):
                    first, second, _ = self.logps(model, ordered[start: start + size])
                    refs[2 * start: 2 * start + 2 * len(first)] = [x for pair in zip(first.tolist(), second.tolist()) for x in pair]
                for _ in range(ranks.idle_passes(len(starts))):  # FSDP: in step with the others
                    self.logps(model, ordered[:size])
                refs = ranks.sum(refs)
                for k, e in enumerate(ordered):
                    e[f"ref_{self.keys[0]}"], e[f"ref_{self.keys[1]}"] = refs[2 * k], refs[2 * k + 1]
        model.train(was_training)

    def _ref(self, examples: list, key: str):
        import torch

        return torch.tensor([e[f"ref_{key}"] for e in examples], device=self.device)


class KTOStage(PreferenceStage):
    name, keys = "kto", ("seq", "kl")

    def encode(self, tokenizer) -> None:
        config = self.config
        self.train_set = encode_kto(tokenizer, self.rows, max_length=config.max_length, seed=config.seed)
        self.val_set = encode_kto(tokenizer, self.val_rows, max_length=config.max_length, seed=config.seed)
        up = sum(e["label"] for e in self.train_set)
        self.weights = class_weights(up, len(self.train_set) - up)

    def micro_loss(self, model, examples: list, ranks: Ranks = SOLO):
        import torch

        if not examples:  # no share of this micro-batch here; the KL point is still summed with the other processes
            stand_in = self.logps(model, self.train_set[:1])[0] if ranks.sharded else None  # FSDP: a pass in step
            ranks.sum([0.0, 0])
            return None if stand_in is None else (stand_in.sum() * 0, 0, 0)
        logps, kl_logps, batch = self.logps(model, examples)  # the KL answer rides along; its log-probs are detached
        z = kl_estimate(kl_logps, self._ref(examples, "kl"), ranks.sum if ranks.world > 1 else None)
        desirable = torch.tensor([e["label"] for e in examples], device=self.device)
        losses = kto_losses(logps, self._ref(examples, "seq"), z, desirable, beta=self.config.beta, weights=self.weights)
        return losses.sum(), batch["tokens"], batch["cells"]

    def describe(self) -> dict:
        up = sum(e["label"] for e in self.train_set)
        return {**super().describe(), "desirable": up, "undesirable": len(self.train_set) - up,
                "weights": {"desirable": self.weights[0], "undesirable": self.weights[1]}}


class DPOStage(PreferenceStage):
    name, keys = "dpo", ("chosen", "rejected")

    def encode(self, tokenizer) -> None:
        self.train_set = encode_dpo(tokenizer, self.rows, max_length=self.config.max_length)
        self.val_set = encode_dpo(tokenizer, self.val_rows, max_length=self.config.max_length)

    def micro_loss(self, model, examples: list, ranks: Ranks = SOLO):
        if not examples:
            return self.idle(model, ranks)
        chosen, rejected, batch = self.logps(model, examples)
        losses = dpo_losses(chosen, rejected, self._ref(examples, "chosen"), self._ref(examples, "rejected"), beta=self.config.beta)
        return losses.sum(), batch["tokens"], batch["cells"]


CLASSES = {"sft": SFTStage, "kto": KTOStage, "dpo": DPOStage}


def _sources(path: Path | None, default: str) -> Counter:
    if path is None:
        return Counter()
    with open(path, encoding="utf-8") as f:
        return Counter((json.loads(line).get("meta") or {}).get("source") or default for line in f if line.strip())


def _rows(name: str, config: TrainConfig, files: StageFiles, count_tokens) -> tuple[list, list | None, Counter] | str:
    """(rows, validation rows or None, sources) of one stage, or why it cannot run."""
    limits = dict(max_tokens=config.max_length, count_tokens=count_tokens)
    if name == "sft":
        if files.train is None:
            return "no chat examples (train file) given"
        val = read_checked(files.val, **limits) if files.val else None
        return read_checked(files.train, **limits), val, _sources(files.train, "seed")
    if name == "dpo":
        if files.pairs is None:
            return "no preference pairs file given"
        rows = read_preferences(files.pairs, kind="dpo", **limits)
        return rows, None, Counter((r.get("meta") or {}).get("source") or "pair" for r in rows)
    if files.preferences is None and files.pairs is None:
        return "no rated answers (preferences file) given"
    prefs = read_preferences(files.preferences, kind="kto", **limits) if files.preferences else []
    pairs = read_preferences(files.pairs, kind="dpo", **limits) if files.pairs else []
    rows = kto_rows(prefs, pairs)
    return rows, None, Counter((r.get("meta") or {}).get("source") or "rated" for r in rows)


def too_few(name: str, n: int, config: TrainConfig, path) -> str:
    what = {"sft": "conversations", "kto": "rated answers", "dpo": "preference pairs"}[name]
    fix = ("collect more rated turns, add a seed dataset (learn.seed_files), or lower learn.train.min_examples" if name == "sft"
           else "collect more ratings and corrections, or lower learn.train.min_examples")
    return f"{path} has {n} {what}; training needs at least {config.min_examples}: {fix}"


def read_stages(config: TrainConfig, count_tokens, names: tuple[str, ...] | list[str], files: StageFiles) -> tuple[list[Stage], dict[str, str]]:
    """(stages to run, {skipped stage: why}), every file checked; a TrainError when no stage can run."""
    stages, skipped = [], {}
    for name in names:
        found = _rows(name, config, files, count_tokens)
        if isinstance(found, str):
            skipped[name] = found
            continue
        rows, val_rows, sources = found
        if len(rows) < config.min_examples:
            skipped[name] = too_few(name, len(rows), config, files.train if name == "sft" else files.pairs if name == "dpo" else files.preferences)
            continue
        if val_rows is None:
            rows, val_rows = split_validation(rows, config.val_fraction, config.seed)
        stages.append(CLASSES[name](config=config, rows=rows, val_rows=val_rows, sources=sources))
    if not stages:
        raise TrainError("nothing to train: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    return stages, skipped


def check_finite(loss: float, where: str) -> None:
    """A TrainError for a NaN or infinite loss: one more step would spread it into every LoRA weight, and a stage whose
    validation loss is NaN would end as if it had not run."""
    if not math.isfinite(loss):
        raise TrainError(f"{where}: the loss is {loss}, so training stopped and nothing was saved (a numeric overflow; "
                         "bf16 on CUDA is the usual cause: report it with the run's data, or train with qlora or on CPU)")


def check_cut(config: TrainConfig, stage: str, train_set: list, val_set: list) -> None:
    """TrainError unless enough examples keep an answer token after the max_length cut.

    min_examples counts examples before the validation split, as the data check before the model
    load does (so 8 examples with min_examples 8 train: 7 plus 1 for validation)."""
    if len(train_set) + len(val_set) < config.min_examples or not train_set or not val_set:
        raise TrainError(f"{stage}: after cutting to max_length={config.max_length} only {len(train_set)} training and "
                         f"{len(val_set)} validation examples still have an answer token to learn from (min_examples = "
                         f"{config.min_examples}): raise max_length")

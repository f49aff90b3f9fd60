"""`TrainConfig`: how one LoRA adapter is trained. It *is* the `[learn.train]` config section. Also the run's
`TrainError` and `TrainResult`, and the checks of its paths.

    [learn.train]                      # in tunewheel.toml; TUNEWHEEL_LEARN__TRAIN__RANK=8 works too
    rank = 16
    max_steps = 20

    config = TrainConfig(rank=8, max_steps=20)            # from code; a bad value is a ValidationError
    python -m learn.train --base B --train F --out D --rank 8   # every field is a flag (learn/train.py)

Each field is documented once, by the docstring under it (pydantic's `use_attribute_docstrings`
turns it into the field's description, which `python -m learn.train --help` prints). Values are
checked when the config is built, so a bad config file fails at load time with the field's
name, long before a model loads. Paths (base model, data files, output folder) are not part
of the config: they are arguments of `train(...)` and `train_in_child(...)`, checked by
`check_paths` before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainError(RuntimeError):
    """Training cannot run or did not finish; the message says what to fix."""


@dataclass
class TrainResult:
    """A finished training run (from `train` or `train_in_child`)."""

    out_dir: Path
    """The finished adapter folder."""
    metrics: dict
    """train_loss, val_loss (of the last stage), tokens, tokens_per_s, duration_s, steps, epochs, padding_fraction,
    examples (summed), examples_seen, processes, stages ({stage: its own figures}), skipped_stages ({stage: why})."""


class TrainConfig(BaseModel):
    """The `[learn.train]` section: LoRA, optimizer, data and device settings of one training run."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get LoRA matrices."""
    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input. On CPU its masks come from 64-bit draws (learn/dropout.py), not torch's slower
    Bernoulli sampling, and p is kept to 1/131072."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    lr_scheduler: Literal[SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    """transformers scheduler name: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup or inverse_sqrt."""
    warmup_ratio: float = 0.05
    """Share of the optimizer steps spent warming the learning rate up."""
    epochs: int = 1
    """Passes over the training data."""
    batch_size: int = 4
    """Conversations per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 384
    """Tokens per conversation (chat template included); a data file with a longer one is refused, as `tunewheel data check` refuses it."""
    seed: int = 0
    """Seeds the validation split, batch order, LoRA init and dropout."""
    val_fraction: float = 0.05
    """Share of the training file held out for the validation loss when no validation file is given (at least one example)."""
    train_on_inputs: Literal["true", "false", "auto"] = "auto"
    """'true': loss on every token; 'false': on assistant turns only; 'auto': false for chat data."""
    qlora: bool = False
    """Load the base in 4-bit nf4 through bitsandbytes (CUDA only)."""
    beta: float = 0.1
    """KTO and DPO stages: how strongly the adapter is held near the reference model (TRL's default 0.1)."""
    early_stopping_patience: int = 1
    """Stop after this many epochs without a better validation loss."""
    min_examples: int = 8
    """Fewer training conversations than this is an error (and a learner cycle with fewer is skipped)."""
    max_steps: int | None = None
    """An upper bound on optimizer steps (smoke runs, tests, benchmarks): a run stops earlier when its epochs over the data, or early stopping, end first."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """CPU training: 'fp32', or 'bf16' to run every forward pass under bf16 autocast (the weights, the LM head, the
    losses and AdamW stay fp32); 'auto': bf16 where the CPU has bf16 instructions (AVX512-BF16 or AMX), fp32 elsewhere
    (without them bf16 is slower). bf16 is faster but learns less per step: the seeded demo's 48 steps took 9.9 instead
    of 11.7 min on an AVX512-BF16 CPU, and its held-out F1 gain was +0.378 instead of +0.388. On CUDA the base model is
    bf16 whatever this says."""
    threads: int | None = None
    """torch CPU threads; default adaptive (learn/cores.py): every core nobody else is using, and half the cores
    (at least 1) while others are busy. A CPU inference engine usually runs on the same cores, and OpenMP threads
    waiting on busy cores made each step 10-20x slower (2 threads, 2 cores); an idle engine uses almost none.
    With processes > 1: per process (adaptive: the processes decide together what one process would take; on CPU,
    while the engine is busy, some of them sit steps out instead of sharing fewer cores: learn/cores.py)."""
    processes: int = 1
    """Data-parallel training processes on this machine. 1: the recipe in one process. N > 1: train_in_child (the
    learner's way) starts it under `accelerate launch`: on CPU, N processes over gloo sharing the cores; on CUDA,
    one GPU each over NCCL. Each step's conversations are split between them, so batch_size and grad_accum size
    the whole step and the steps and examples seen are those of one process (learn/train_dist.py). On CPU they give
    cores back to a busy engine as one process does (learn/cores.py). Each process holds the whole model unless
    fsdp is on."""
    fsdp: bool = False
    """With processes > 1: shard the base model's decoder layers over the processes (PyTorch FSDP2 `fully_shard`),
    so each holds 1/N of their weights and gathers a layer only while it runs: for a base model too large for one
    GPU. Same steps, losses and adapter as without it (learn/train_dist.py); not with qlora."""
    allocator: Literal["mimalloc", "system"] = "mimalloc"
    """The training child's memory allocator (learn/train_child.py): 'mimalloc' (the cmeel-mimalloc wheel, preloaded
    and keeping freed memory for reuse) where it is installed, else the C library's; 'system': always the C library's.
    Measured on 2 cores, the seeded demo's data at batch 4: peak memory 4.1 GB instead of 5.8-6.3 GB, and steps as fast
    within the noise (0.97x to 1.13x across runs)."""

    @field_validator("train_on_inputs", mode="before")
    @classmethod
    def _bool_spelling(cls, value: object) -> object:
        # TOML users write `train_on_inputs = false` as often as "false".
        return str(value).lower() if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        def need(ok: bool, problem: str) -> None:
            if not ok:
                raise ValueError(problem)

        need(0 < self.val_fraction < 0.5, f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        need(bool(self.target_modules), "target_modules is empty: name the linear layers to adapt, e.g. q_proj v_proj")
        need(self.rank >= 1 and self.alpha >= 1, f"rank and alpha must be >= 1, got {self.rank}, {self.alpha}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(0 < self.learning_rate < 1, f"learning_rate must be in (0, 1), got {self.learning_rate}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("epochs", "batch_size", "grad_accum", "min_examples", "early_stopping_patience"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or unset, got {self.max_steps}")
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1 or unset, got {self.threads}")
        need(self.processes >= 1, f"processes must be >= 1, got {self.processes}")
        need(self.batch_size >= self.processes, f"batch_size ({self.batch_size}) must be >= processes ({self.processes}): "
             "each process takes a share of every micro-batch")
        need(not self.fsdp or self.processes > 1, "fsdp shards the model over the processes: set processes > 1")
        need(not (self.fsdp and self.qlora), "fsdp and qlora together are not supported: 4-bit weights are already "
             "small; use one or the other")
        need(not (self.qlora and self.device == "cpu"), "qlora needs CUDA (bitsandbytes 4-bit): set qlora=false to train in fp32 on CPU")
        return self


def looks_like_path(name: str) -> bool:
    """A folder, not a Hugging Face id ('org/name' or 'name')."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


DATA_PATHS = ("train_file", "val_file", "preference_file", "pair_file")


def check_paths(*, base_model: str, out_dir: str | Path, start_adapter: str | Path | None = None, **files: str | Path | None) -> None:
    """The run's paths, checked before anything heavy loads; a problem is a TrainError saying what to fix.

    `files`: train_file, val_file (chat JSONL), preference_file (KTO rows), pair_file (DPO pairs); None: not given."""
    for name, path in files.items():
        if name not in DATA_PATHS:
            raise TypeError(f"unknown data file argument {name}")
        if path is not None and not Path(path).is_file():
            raise TrainError(f"{name} {path} does not exist: pass a JSONL file")
    if looks_like_path(base_model) and not (Path(base_model) / "config.json").is_file():
        raise TrainError(f"base_model {base_model} is not a model folder (no config.json): "
                         "run `tunewheel model prepare` or pass a Hugging Face id")
    if start_adapter is not None and not (Path(start_adapter) / "adapter_config.json").is_file():
        raise TrainError(f"start_adapter {start_adapter} is not an adapter folder (no adapter_config.json)")
    if Path(out_dir).exists():
        raise TrainError(f"out_dir {out_dir} already exists: adapters are never overwritten, choose a new folder")


def run_record(config: TrainConfig, *, base_model: str, out_dir: str | Path, stages: tuple[str, ...] | list[str] = ("sft",),
               start_adapter: str | Path | None = None, **files: str | Path | None) -> dict:
    """The config plus the run's paths and stages: what a report.json and a registry version record as the training config."""
    paths = {"base_model": str(base_model), "out_dir": str(out_dir), "start_adapter": None if start_adapter is None else str(start_adapter),
             **{name: None if files.get(name) is None else str(files[name]) for name in DATA_PATHS}}
    return {**paths, "stages": list(stages), **config.model_dump()}

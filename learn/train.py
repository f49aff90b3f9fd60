"""The training recipe: a LoRA adapter on chat JSONL, read top to bottom (setup -> train -> save -> cleanup).

    python -m learn.train --train data.jsonl --base .tunewheel/models/SmolLM2-135M-Instruct --out adapters/chat-v0001
    python -m learn.train --help           # every TrainConfig field is a flag (--rank 8, --max-steps 20, ...)

From code: `train(config)` runs in this process; `train_in_child(config)` runs the same recipe in a
child process, so a crash or out-of-memory kill cannot touch the caller (the serving gateway).

What it does:
- reads chat JSONL (`{"messages": [...]}` per line, OpenAI fine-tuning format; an assistant message
  with `"weight": 0` is context, not a target) and renders each conversation with the model's chat
  template. With `train_on_inputs` false (auto, for chat data) the labels are exactly the assistant
  turns as the template renders them: content plus end-of-turn token, never the role header.
- length-grouped batches with dynamic padding (the padding fraction is measured and reported), and
  the LM head computed only at the scored positions: the decoder runs on the batch, the 49k-vocab
  head only on hidden states whose next token is a label.
- LoRA through peft (QLoRA 4-bit nf4 on CUDA when asked), AdamW, a transformers scheduler with
  warmup, gradient accumulation and clipping, validation loss each epoch, early stopping, the best
  adapter kept. fp32 on CPU, bf16 on CUDA.
- writes the adapter (`adapter_config.json`, `adapter_model.safetensors`) plus `report.json` and
  `loss.png` to `<out_dir>.tmp-<pid>` and renames it to `out_dir` only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
ROLES = ("system", "user", "assistant")
MAX_GRAD_NORM = 1.0
IGNORE = -100  # label of a position that is not scored


class TrainError(RuntimeError):
    """Training cannot run or did not finish; the message says what to fix."""


@dataclass
class TrainConfig:
    base_model: str
    """Base model: a local Hugging Face folder or a Hugging Face id."""
    train_file: str
    """Chat JSONL to train on."""
    out_dir: str
    """Where the adapter goes; must not exist yet (adapter versions are never overwritten)."""
    val_file: str | None = None
    """Chat JSONL for the validation loss; default: `val_fraction` of train_file, split off by seed."""
    val_fraction: float = 0.05
    """Share of train_file held out for validation when val_file is unset (at least one example)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers that get LoRA matrices."""
    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name (see SCHEDULERS)."""
    warmup_ratio: float = 0.05
    """Share of the optimizer steps spent warming the learning rate up."""
    epochs: int = 1
    """Passes over the training data."""
    batch_size: int = 4
    """Conversations per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 384
    """Tokens per conversation; longer ones are cut at the end."""
    seed: int = 0
    """Seeds the validation split, batch order, LoRA init and dropout."""
    train_on_inputs: str = "auto"
    """'true': loss on every token; 'false': on assistant turns only; 'auto': false for chat data."""
    qlora: bool = False
    """Load the base in 4-bit nf4 through bitsandbytes (CUDA only)."""
    early_stopping_patience: int = 1
    """Stop after this many epochs without a better validation loss."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs, tests, benchmarks)."""
    min_examples: int = 8
    """Fewer training conversations than this is an error."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    threads: int | None = None
    """torch CPU threads; default half the cores (at least 1): a CPU inference engine usually runs on the
    same cores, and OpenMP threads waiting on busy cores made each step 10-20x slower (2 threads, 2 cores)."""

    def __post_init__(self) -> None:
        for name in ("base_model", "train_file", "out_dir", "val_file"):
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))
        if isinstance(self.train_on_inputs, bool):
            self.train_on_inputs = str(self.train_on_inputs).lower()
        self.target_modules = list(self.target_modules)

        def need(ok: bool, problem: str) -> None:
            if not ok:
                raise TrainError(problem)

        for name in ("train_file", "val_file"):
            path = getattr(self, name)
            need(path is None or Path(path).is_file(), f"{name} {path} does not exist: pass a chat JSONL file")
        if _looks_like_path(self.base_model):
            need((Path(self.base_model) / "config.json").is_file(),
                 f"base_model {self.base_model} is not a model folder (no config.json): run `tunewheel model prepare` or pass a Hugging Face id")
        need(not Path(self.out_dir).exists(), f"out_dir {self.out_dir} already exists: adapters are never overwritten, choose a new folder")
        need(0 < self.val_fraction < 0.5, f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        need(bool(self.target_modules), "target_modules is empty: name the linear layers to adapt, e.g. q_proj v_proj")
        need(self.rank >= 1 and self.alpha >= 1, f"rank and alpha must be >= 1, got {self.rank}, {self.alpha}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(0 < self.learning_rate < 1, f"learning_rate must be in (0, 1), got {self.learning_rate}")
        need(self.lr_scheduler in SCHEDULERS, f"lr_scheduler {self.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("epochs", "batch_size", "grad_accum", "min_examples", "early_stopping_patience"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or unset, got {self.max_steps}")
        need(self.train_on_inputs in ("true", "false", "auto"), f"train_on_inputs must be true, false or auto, got {self.train_on_inputs!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1 or unset, got {self.threads}")
        need(not (self.qlora and self.device == "cpu"), "qlora needs CUDA (bitsandbytes 4-bit): set qlora=false to train in fp32 on CPU")

    @classmethod
    def from_settings(cls, train, *, base_model, train_file, out_dir, val_file=None, device: str = "auto") -> TrainConfig:
        """Build from `settings.learn.train` (serve.settings.TrainSettings) plus the run's paths."""
        return cls(base_model=base_model, train_file=train_file, out_dir=out_dir, val_file=val_file, device=device, **train.model_dump())


def _looks_like_path(name: str) -> bool:
    """A folder, not a Hugging Face id ('org/name' or 'name')."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


@dataclass
class TrainResult:
    out_dir: Path
    """The finished adapter folder."""
    metrics: dict
    """train_loss, val_loss, tokens, tokens_per_s, duration_s, steps, epochs, padding_fraction, examples."""


# ---------------------------------------------------------------- data


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from chat JSONL; a bad line is a TrainError naming the file and line number."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                conversations.append(_check_conversation(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as e:
                raise TrainError(f"{path} line {number}: {e}; each line must be "
                                 '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}') from None
    return conversations


def _check_conversation(row) -> list[dict]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise ValueError("no 'messages' list")
    messages = row["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs a role ({'|'.join(ROLES)}) and a string content")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1)):
            raise ValueError(f"message {i}: weight must be 0 or 1, on assistant messages only")
    first = 1 if messages[0]["role"] == "system" else 0
    if first < len(messages) and messages[first]["role"] == "assistant":
        raise ValueError("the first message after the system prompt must be from the user")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise ValueError("no assistant message to learn from")
    return messages


def encode(tokenizer, messages: list[dict], *, train_on_inputs: bool, max_length: int) -> dict:
    """Token ids and labels of one conversation rendered by the chat template, cut to max_length.

    Labels are IGNORE except on targets. With train_on_inputs false the targets are the assistant
    messages (weight != 0) as the template renders them: each one's span is found by rendering the
    conversation up to the message with the generation prompt (where its content starts) and up to
    and including it (where it ends), minus the trailing whitespace after the end-of-turn token.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if train_on_inputs or m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(head) and text.startswith(upto) and upto.startswith(head)):
            raise TrainError("the chat template renders a conversation differently from its prefixes, so assistant "
                             "turns cannot be located: set train_on_inputs=true for this model")
        spans.append((len(head), len(upto.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    if train_on_inputs:
        labels = list(ids)
    else:
        starts = [start for start, _ in enc["offset_mapping"][:max_length]]
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, s in zip(ids, starts)]
    return {"input_ids": ids, "labels": labels}


def split_validation(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded shuffle, then `fraction` (at least one) off the end."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order)))
    return [conversations[i] for i in order[:-n_val]], [conversations[i] for i in order[-n_val:]]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length, so dynamic padding stays small, in random order.

    As transformers' LengthGroupedSampler: shuffle, cut into mega-batches of 50 batches, sort each
    mega-batch by length, cut it into batches, then shuffle the batches.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start: start + mega], key=lambda i: -lengths[i])
        batches += [group[j: j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int, device) -> dict:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def scored_count(batch: dict) -> int:
    """Positions whose next-token label is scored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------- model


def scored_loss(model, batch: dict):
    """Summed cross-entropy over the scored positions, with the LM head applied only there.

    Same value as the model's own loss times the number of scored tokens, without building the
    (batch, length, vocab) logits. Works on a plain causal LM and on a peft-wrapped one.
    """
    import torch.nn.functional as F
    from peft import PeftModel

    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][scored])
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum")


def load_model(config: TrainConfig, device: str):
    """(peft model, tokenizer): the base in fp32 on CPU, bf16 on CUDA, 4-bit nf4 under QLoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    except OSError as e:
        raise TrainError(f"cannot load the tokenizer of {config.base_model}: {e}") from e
    if not tokenizer.is_fast or not tokenizer.chat_template:
        raise TrainError(f"{config.base_model} needs a fast tokenizer with a chat template to train on chat data")
    kwargs: dict = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    if config.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
    if config.qlora:
        model = prepare_model_for_kbit_training(model)
    else:
        model.to(device)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device: str) -> float:
    """Mean loss per scored token over `examples` (no dropout, no gradients)."""
    import torch

    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[j: j + batch_size]], pad_id, device)
            total += float(scored_loss(model, batch))
            count += scored_count(batch)
    model.train()
    return total / max(count, 1)


# ---------------------------------------------------------------- the recipe


def train(config: TrainConfig) -> TrainResult:
    """Train one adapter in this process and return where it is and how the run went."""
    import torch
    from tqdm import tqdm
    from transformers import get_scheduler, set_seed

    from learn.report import write_report

    started = time.time()
    # -- setup
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("device=cuda but no CUDA device is visible: use device=auto or cpu")
    if config.qlora and device != "cuda":
        raise TrainError("qlora needs CUDA (bitsandbytes 4-bit): set qlora=false to train in fp32 on CPU")
    torch.set_num_threads(config.threads or max(1, len(os.sched_getaffinity(0)) // 2))
    conversations = read_chat_jsonl(config.train_file)
    if len(conversations) < config.min_examples:
        raise TrainError(f"{config.train_file} has {len(conversations)} conversations; training needs at least "
                         f"{config.min_examples}: collect more rated turns, add a seed dataset (learn.seed_files), "
                         "or lower learn.train.min_examples")
    if config.val_file:
        train_rows, val_rows = conversations, read_chat_jsonl(config.val_file)
    else:
        train_rows, val_rows = split_validation(conversations, config.val_fraction, config.seed)
    set_seed(config.seed)
    model, tokenizer = load_model(config, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    on_inputs = config.train_on_inputs == "true"  # auto: chat data, so assistant turns only

    def tokenized(rows):
        encoded = [encode(tokenizer, m, train_on_inputs=on_inputs, max_length=config.max_length) for m in rows]
        return [e for e in encoded if any(t != IGNORE for t in e["labels"][1:])]

    train_set, val_set = tokenized(train_rows), tokenized(val_rows)
    if len(train_set) < config.min_examples or not val_set:
        raise TrainError(f"after cutting to max_length={config.max_length} only {len(train_set)} training and {len(val_set)} "
                         "validation conversations still have an assistant token to learn from: raise max_length")
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / config.batch_size) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    tmp = Path(f"{config.out_dir}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        # -- train
        rng = random.Random(config.seed)
        step_losses, epochs_log = [], []
        tokens = scored_tokens = padded_cells = 0
        train_seconds, best_val, best_epoch, bad_epochs = 0.0, math.inf, 0, 0
        bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        model.train()
        for epoch in range(1, config.epochs + 1):
            batches = length_grouped_batches([len(e["input_ids"]) for e in train_set], config.batch_size, rng)
            epoch_losses = []
            for g in range(0, len(batches), config.grad_accum):
                if len(step_losses) >= total_steps:
                    break
                tick = time.perf_counter()
                micro = [collate([train_set[i] for i in b], pad_id, device) for b in batches[g: g + config.grad_accum]]
                n_scored = sum(scored_count(b) for b in micro)
                step_loss = 0.0
                for batch in micro:  # the step's mean is over all its scored tokens, as one large batch
                    loss = scored_loss(model, batch) / n_scored
                    loss.backward()
                    step_loss += loss.item()
                    tokens += int(batch["attention_mask"].sum())
                    padded_cells += batch["attention_mask"].numel()
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                train_seconds += time.perf_counter() - tick
                scored_tokens += n_scored
                step_losses.append(step_loss)
                epoch_losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / train_seconds:.0f}")
            val_loss = evaluate(model, val_set, config.batch_size, pad_id, device)
            epochs_log.append({"epoch": epoch, "step": len(step_losses), "val_loss": val_loss,
                               "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1)})
            bar.write(f"epoch {epoch}: train loss {epochs_log[-1]['train_loss']:.4f}, validation loss {val_loss:.4f}")
            if val_loss < best_val:
                best_val, best_epoch, bad_epochs = val_loss, epoch, 0
                model.save_pretrained(tmp)  # the best adapter so far; a later, worse epoch never replaces it
            else:
                bad_epochs += 1
            if bad_epochs >= config.early_stopping_patience or len(step_losses) >= total_steps:
                break
        bar.close()

        # -- save
        metrics = {
            "train_loss": epochs_log[-1]["train_loss"], "val_loss": best_val, "best_epoch": best_epoch,
            "steps": len(step_losses), "epochs": len(epochs_log), "tokens": tokens, "scored_tokens": scored_tokens,
            "tokens_per_s": tokens / train_seconds if train_seconds else 0.0,
            "padding_fraction": 1 - tokens / padded_cells if padded_cells else 0.0,
            "examples": {"train": len(train_set), "val": len(val_set),
                         "dropped": len(train_rows) + len(val_rows) - len(train_set) - len(val_set)},
            "device": device, "threads": torch.get_num_threads(), "train_seconds": train_seconds, "duration_s": time.time() - started,
        }
        write_report(tmp, {"config": asdict(config), **metrics, "early_stopped": bad_epochs >= config.early_stopping_patience,
                           "train_loss_per_step": step_losses, "epochs_log": epochs_log})
        try:
            os.replace(tmp, config.out_dir)
        except OSError as e:
            raise TrainError(f"cannot move the finished adapter to {config.out_dir}: {e}") from e
        return TrainResult(out_dir=Path(config.out_dir), metrics=metrics)
    finally:
        # -- cleanup: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- child process


def train_in_child(config: TrainConfig, timeout: float | None = None) -> TrainResult:
    """`train(config)` in a child Python process; a crash, kill or timeout is a TrainError with its last output."""
    with tempfile.TemporaryDirectory(prefix="tunewheel-train-") as work:
        result_path, log_path = Path(work) / "result.json", Path(work) / "train.log"
        command = [sys.executable, "-m", "learn.train", "--config-json", json.dumps(asdict(config)), "--result-json", str(result_path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "wb") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            why = None
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                why = f"timed out after {timeout:.0f} s"
            finally:
                if child.poll() is None:  # timeout, or the caller was interrupted: never leave the child running
                    child.kill()
                    child.wait()
        shutil.rmtree(f"{config.out_dir}.tmp-{child.pid}", ignore_errors=True)
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if why is None and child.returncode == 0 and "metrics" in result:
            return TrainResult(out_dir=Path(result["out_dir"]), metrics=result["metrics"])
        if "error" in result:
            raise TrainError(result["error"])
        if why is None:
            code = child.returncode
            why = f"exited with status {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}"
            if code == -signal.SIGKILL:
                why += " (out of memory, or killed)"
        lines = [s for s in log_path.read_text(errors="replace").replace("\r", "\n").splitlines() if s.strip()]
        raise TrainError(f"training child {why}; nothing was written to {config.out_dir}. Last output:\n" + "\n".join(lines[-15:]))


# ---------------------------------------------------------------- command line


FLAG_ALIASES = {"base_model": ["--base"], "train_file": ["--train"], "val_file": ["--val"], "out_dir": ["--out"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learn.train", description="Train a LoRA adapter on chat JSONL.")
    parser.add_argument("--config-json", help="the whole TrainConfig as JSON (how train_in_child passes it)")
    parser.add_argument("--result-json", help="also write the result (or the error) to this file")
    for f in dataclasses.fields(TrainConfig):
        flags = [*FLAG_ALIASES.get(f.name, []), "--" + f.name.replace("_", "-")]
        kind = str(f.type)
        if kind.startswith("list"):
            parser.add_argument(*flags, dest=f.name, nargs="+")
        elif kind == "bool":
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(*flags, dest=f.name, type=int if "int" in kind else float if "float" in kind else str)
    args = parser.parse_args(argv)
    try:
        if args.config_json:
            config = TrainConfig(**json.loads(args.config_json))
        else:
            given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
            missing = [n for n in ("train_file", "base_model", "out_dir") if n not in given]
            if missing:
                parser.error("missing " + ", ".join(FLAG_ALIASES[n][0] for n in missing))
            config = TrainConfig(**given)
        result = train(config)
    except TrainError as e:
        if args.result_json:
            Path(args.result_json).write_text(json.dumps({"error": str(e)}))
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"out_dir": str(result.out_dir), "metrics": result.metrics}))
    m = result.metrics
    print(f"adapter: {result.out_dir}\nsteps {m['steps']}, epochs {m['epochs']}, train loss {m['train_loss']:.4f}, "
          f"validation loss {m['val_loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s, padding {m['padding_fraction']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

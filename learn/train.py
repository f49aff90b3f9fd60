"""The training recipe: a LoRA adapter on chat JSONL, read top to bottom (setup -> train -> save -> cleanup).

    python -m learn.train --base .tunewheel/models/SmolLM2-135M-Instruct --train data.jsonl --out adapters/chat-v0001
    python -m learn.train --help           # every TrainConfig field is a flag (--rank 8, --max-steps 20, ...)

From code: `train(config, base_model=..., train_file=..., out_dir=...)` runs in this process;
`train_in_child(...)` runs the same recipe in a child process, so a crash or out-of-memory kill
cannot touch the caller (the serving gateway). `config` is a `TrainConfig`, the `[learn.train]`
section (learn/train_config.py); the paths are arguments, checked before anything loads.

What it does:
- checks the data with the one chat-JSONL validator (`tunewheel data check`: format, roles,
  alternation, and each example within `max_length` tokens by the base model's tokenizer); a file
  it refuses is refused here with the same `{path}:{line}: {message}` lines. An assistant message
  with `"weight": 0` is context, not a target.
- renders each conversation with the model's chat template. With `train_on_inputs` false (auto,
  for chat data) the labels are exactly the assistant turns as the template renders them:
  content plus end-of-turn token, never the role header (learn/train_data.py).
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
import functools
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
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from learn.children import child_env, die_with_parent
from learn.train_config import TrainConfig, TrainError, check_paths, run_record
from learn.train_data import (
    IGNORE,
    collate,
    encode,
    length_grouped_batches,
    read_checked,
    scored_count,
    scored_loss,
    split_validation,
    validation_loss,
)

MAX_GRAD_NORM = 1.0


@dataclass
class TrainResult:
    out_dir: Path
    """The finished adapter folder."""
    metrics: dict
    """train_loss, val_loss, tokens, tokens_per_s, duration_s, steps, epochs, padding_fraction, examples."""


# ---------------------------------------------------------------- setup helpers


def pick_device(config: TrainConfig) -> str:
    """cuda or cpu, as the config asks and the machine allows."""
    import torch

    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("device=cuda but no CUDA device is visible: use device=auto or cpu")
    if config.qlora and device != "cuda":
        raise TrainError("qlora needs CUDA (bitsandbytes 4-bit): set qlora=false to train in fp32 on CPU")
    return device


def read_data(config: TrainConfig, base_model: str, train_file, val_file) -> tuple[list, list]:
    """(train, val) conversations of files that pass `data check` with `max_length` as the token limit."""
    from feedback.check import load_token_counter

    try:
        count_tokens = load_token_counter(base_model)
    except FileNotFoundError as exc:
        raise TrainError(str(exc)) from exc
    conversations = read_checked(train_file, max_tokens=config.max_length, count_tokens=count_tokens)
    if len(conversations) < config.min_examples:
        raise TrainError(f"{train_file} has {len(conversations)} conversations; training needs at least "
                         f"{config.min_examples}: collect more rated turns, add a seed dataset (learn.seed_files), "
                         "or lower learn.train.min_examples")
    if val_file:
        return conversations, read_checked(val_file, max_tokens=config.max_length, count_tokens=count_tokens)
    return split_validation(conversations, config.val_fraction, config.seed)


def load_model(config: TrainConfig, base_model: str, device: str):
    """(peft model, tokenizer): the base in fp32 on CPU, bf16 on CUDA, 4-bit nf4 under QLoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except OSError as e:
        raise TrainError(f"cannot load the tokenizer of {base_model}: {e}") from e
    if not tokenizer.is_fast or not tokenizer.chat_template:
        raise TrainError(f"{base_model} needs a fast tokenizer with a chat template to train on chat data")
    kwargs: dict = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    if config.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    if config.qlora:
        model = prepare_model_for_kbit_training(model)
    else:
        model.to(device)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def tokenize(config: TrainConfig, tokenizer, train_rows: list, val_rows: list) -> tuple[list[dict], list[dict]]:
    """Encoded (train, val) examples, without any that has no scored token left after the cut."""
    on_inputs = config.train_on_inputs == "true"  # auto: chat data, so assistant turns only

    def encoded(rows):
        examples = [encode(tokenizer, m, train_on_inputs=on_inputs, max_length=config.max_length) for m in rows]
        return [e for e in examples if any(t != IGNORE for t in e["labels"][1:])]

    train_set, val_set = encoded(train_rows), encoded(val_rows)
    # min_examples counts conversations before the validation split, as load_conversations does
    if len(train_set) + len(val_set) < config.min_examples or not train_set or not val_set:
        dropped = len(train_rows) + len(val_rows) - len(train_set) - len(val_set)
        raise TrainError(f"after cutting to max_length={config.max_length}, {dropped} conversation(s) have no assistant "
                         f"token left, leaving {len(train_set)} training and {len(val_set)} validation conversations "
                         f"(min_examples = {config.min_examples}): raise max_length")
    return train_set, val_set


# ---------------------------------------------------------------- the recipe


def train(config: TrainConfig, *, base_model: str, train_file: str | Path, out_dir: str | Path,
          val_file: str | Path | None = None) -> TrainResult:
    """Train one adapter in this process and return where it is and how the run went."""
    base_model = str(base_model)
    check_paths(base_model=base_model, train_file=train_file, out_dir=out_dir, val_file=val_file)
    import torch
    from tqdm import tqdm
    from transformers import get_scheduler, set_seed

    from learn.report import write_report

    started = time.time()
    # -- setup: data first (a refused file costs no model load), then model, optimizer and schedule
    device = pick_device(config)
    torch.set_num_threads(config.threads or max(1, len(os.sched_getaffinity(0)) // 2))
    train_rows, val_rows = read_data(config, base_model, train_file, val_file)
    set_seed(config.seed)
    model, tokenizer = load_model(config, base_model, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set, val_set = tokenize(config, tokenizer, train_rows, val_rows)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / config.batch_size) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    tmp = Path(f"{out_dir}.tmp-{os.getpid()}")
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
            val_loss = validation_loss(model, val_set, config.batch_size, pad_id, device)
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
        record = run_record(config, base_model=base_model, train_file=train_file, out_dir=out_dir, val_file=val_file)
        write_report(tmp, {"config": record, **metrics, "early_stopped": bad_epochs >= config.early_stopping_patience,
                           "train_loss_per_step": step_losses, "epochs_log": epochs_log})
        try:
            os.replace(tmp, out_dir)
        except OSError as e:
            raise TrainError(f"cannot move the finished adapter to {out_dir}: {e}") from e
        return TrainResult(out_dir=Path(out_dir), metrics=metrics)
    finally:
        # -- cleanup: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- child process


def train_in_child(config: TrainConfig, *, base_model: str, train_file: str | Path, out_dir: str | Path,
                   val_file: str | Path | None = None, timeout: float | None = None) -> TrainResult:
    """`train(...)` in a child Python process; a crash, kill or timeout is a TrainError with its last output.
    `timeout`: seconds before the child is killed (the learner passes what is left of learn.cycle_timeout_s).
    The child gets SIGTERM when this process dies (and then removes its temporary folder)."""
    check_paths(base_model=str(base_model), train_file=train_file, out_dir=out_dir, val_file=val_file)
    paths = {"--base": base_model, "--train": train_file, "--out": out_dir, "--val": val_file}
    with tempfile.TemporaryDirectory(prefix="tunewheel-train-") as work:
        result_path, log_path = Path(work) / "result.json", Path(work) / "train.log"
        command = [sys.executable, "-m", "learn.train", "--config-json", config.model_dump_json(), "--result-json", str(result_path),
                   *(str(x) for flag, path in paths.items() if path is not None for x in (flag, path))]
        # the child imports this checkout of learn/, whatever the caller's working directory; it gets only
        # the environment a trainer needs (no database URL, no keys) and dies with this process
        env = child_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))})
        with open(log_path, "wb") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=functools.partial(die_with_parent, os.getpid()))
            why = None
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                why = f"timed out after {timeout:.0f} s (the rest of learn.cycle_timeout_s)"
            finally:
                if child.poll() is None:  # timeout, or the caller was interrupted: never leave the child running
                    child.kill()
                    child.wait()
        shutil.rmtree(f"{out_dir}.tmp-{child.pid}", ignore_errors=True)
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
        raise TrainError(f"training child {why}; nothing was written to {out_dir}. Last output:\n" + "\n".join(lines[-15:]))


# ---------------------------------------------------------------- command line


PATH_FLAGS = {  # the run's paths: arguments of train(), not config fields
    "base_model": (["--base", "--base-model"], "Base model: a local Hugging Face folder or a Hugging Face id."),
    "train_file": (["--train", "--train-file"], "Chat JSONL to train on."),
    "val_file": (["--val", "--val-file"], "Chat JSONL for the validation loss; default: val_fraction of the training file."),
    "out_dir": (["--out", "--out-dir"], "Where the adapter goes; must not exist yet (adapter versions are never overwritten)."),
}


def argument_parser() -> argparse.ArgumentParser:
    """The paths, then one flag per TrainConfig field, typed and documented by the field itself."""
    parser = argparse.ArgumentParser(prog="python -m learn.train", description="Train a LoRA adapter on chat JSONL.")
    parser.add_argument("--config-json", help="the whole TrainConfig as JSON (how train_in_child passes it)")
    parser.add_argument("--result-json", help="also write the result (or the error) to this file")
    for name, (flags, text) in PATH_FLAGS.items():
        parser.add_argument(*flags, dest=name, help=text)
    for name, field in TrainConfig.model_fields.items():
        kind = field.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        flag = dict(dest=name, help=field.description)
        if typing.get_origin(kind) is list:
            parser.add_argument("--" + name.replace("_", "-"), nargs="+", **flag)
        elif kind is bool:
            parser.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, **flag)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument("--" + name.replace("_", "-"), choices=args, **flag)
        else:
            parser.add_argument("--" + name.replace("_", "-"), type=(args[0] if args else kind), **flag)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m learn.train`: the recipe from the command line (and in train_in_child's child)."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    # SIGTERM (the parent died, or a timeout) unwinds like an error, so `train` removes its temporary folder
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    missing = [PATH_FLAGS[n][0][0] for n in ("base_model", "train_file", "out_dir") if getattr(args, n) is None]
    if missing:
        parser.error("missing " + ", ".join(missing))
    given = {n: getattr(args, n) for n in TrainConfig.model_fields if getattr(args, n) is not None}
    try:
        config = TrainConfig.model_validate({**json.loads(args.config_json or "{}"), **given})
        result = train(config, base_model=args.base_model, train_file=args.train_file, out_dir=args.out_dir, val_file=args.val_file)
    except (TrainError, ValidationError) as e:
        message = str(e) if isinstance(e, TrainError) else "; ".join(
            ": ".join(filter(None, [".".join(map(str, x["loc"])), x["msg"]])) for x in e.errors())
        if args.result_json:
            Path(args.result_json).write_text(json.dumps({"error": message}))
        print(f"error: {message}", file=sys.stderr)
        return 2
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"out_dir": str(result.out_dir), "metrics": result.metrics}))
    m = result.metrics
    print(f"adapter: {result.out_dir}\nsteps {m['steps']}, epochs {m['epochs']}, train loss {m['train_loss']:.4f}, "
          f"validation loss {m['val_loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s, padding {m['padding_fraction']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

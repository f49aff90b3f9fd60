"""The training recipe: a LoRA adapter on chat JSONL and rated answers, read top to bottom
(setup -> stages -> save -> cleanup).

    python -m learn.train --base .tunewheel/models/SmolLM2-135M-Instruct --train data.jsonl --out adapters/chat-v0001
    python -m learn.train --base B --train train.jsonl --preferences preferences.jsonl --stages sft kto --out D
    python -m learn.train --base B --train data.jsonl --out D --processes 2   # data-parallel, through `accelerate launch`
    python -m learn.train --help           # every TrainConfig field is a flag (--rank 8, --max-steps 20, ...)

From code: `train(config, base_model=..., train_file=..., out_dir=..., stages=("sft",))` runs in this
process; `train_in_child(...)` runs the same recipe in a child process (learn/train_child.py), so a
crash or out-of-memory kill cannot touch the caller (the serving gateway), and with
`config.processes` > 1 in that many processes (learn/train_dist.py: each step's examples split
between them, gradients summed, rank 0 writes). `config` is a `TrainConfig`, the `[learn.train]`
section (learn/train_config.py); the paths and stages are arguments, checked before anything loads.

What it does:
- checks every stage's data with the one validator (`tunewheel data check`: format, roles,
  alternation, and each example within `max_length` tokens by the base model's tokenizer); a file
  it refuses is refused here with the same `{path}:{line}: {message}` lines. An assistant message
  with `"weight": 0` is context, not a target.
- runs the stages in order on one LoRA (learn/train_stages.py): `sft` on chat examples, `kto` on
  thumbs up/down (unpaired), `dpo` on pairs (a correction over the answer it corrects). Each starts
  where the previous one ended; a stage without enough data is skipped and the report says why.
  Training starts from a fresh LoRA on the base model, or from `start_adapter` (the champion).
- masking: the scored tokens are exactly the assistant answers as the chat template renders them,
  content plus end-of-turn token, never the role header (learn/train_data.py); the preference
  losses compare the log-probabilities of those same tokens (learn/train_pref.py).
- length-grouped batches with dynamic padding (the padding fraction is measured and reported), and
  the LM head computed only at the scored positions.
- LoRA through peft (QLoRA 4-bit nf4 on CUDA when asked), AdamW, a transformers scheduler with
  warmup per stage, gradient accumulation and clipping, validation loss each epoch, early stopping,
  the best epoch of each stage kept. fp32 on CPU (`precision = "bf16"`: forward passes under bf16 autocast, the
  weights, LM head and losses still fp32), bf16 on CUDA.
- writes the adapter (`adapter_config.json`, `adapter_model.safetensors`) plus `report.json` and
  `loss.png` (one panel per stage) to `<out_dir>.tmp-<pid>` and renames it to `out_dir` only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import typing
from pathlib import Path

from pydantic import ValidationError

from learn.children import die_with_parent
from learn.cores import CoreShare
from learn.dropout import cheap_cpu_dropout
from learn.train_child import train_in_child
from learn.train_config import TrainConfig, TrainError, TrainResult, check_paths, run_record
from learn.train_data import length_grouped_batches
from learn.train_dist import join
from learn.train_stages import STAGES, StageFiles, check_cut, check_finite, read_stages

MAX_GRAD_NORM = 1.0


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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): what bf16 autocast needs to beat fp32."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: stay with fp32
        return False


def pick_precision(config: TrainConfig, device: str) -> str:
    """'bf16' or 'fp32', the forward passes' precision: on CUDA the base model's own bf16; on CPU as `precision` says."""
    if device == "cuda":
        return "bf16"
    if config.precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return config.precision


def forward_precision(precision: str, device: str):
    """A context to run forward passes in: bf16 autocast on CPU (fp32 weights stay the master copy), else nothing."""
    import torch

    if device == "cpu" and precision == "bf16":
        return functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def read_data(config: TrainConfig, base_model: str, stages: tuple[str, ...], files: StageFiles):
    """(stages that have enough data, {skipped stage: why}); every file checked with `max_length` as the token limit."""
    from feedback.check import load_token_counter

    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise TrainError(f"unknown or no stages {unknown or list(stages)}: choose from {', '.join(STAGES)}, in that order")
    try:
        count_tokens = load_token_counter(base_model)
    except FileNotFoundError as exc:
        raise TrainError(str(exc)) from exc
    return read_stages(config, count_tokens, stages, files)


def load_model(config: TrainConfig, base_model: str, device: str, start_adapter: str | Path | None = None):
    """(peft model, tokenizer): the base in fp32 on CPU, bf16 on CUDA, 4-bit nf4 under QLoRA; a fresh LoRA,
    or `start_adapter` (its own rank and targets) to continue training."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
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
        kwargs["device_map"] = {"": torch.device(device).index or 0}  # this process's GPU (cuda:N under the launcher)
    model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    if config.qlora:
        # peft's gradient checkpointing, non-reentrant as torch asks (a plain call warned on the H200 run)
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.to(device)
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    else:
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if device == "cpu":
        cheap_cpu_dropout(model)  # torch's Bernoulli masks were 9-15% of a CPU step (learn/dropout.py)
    return model, tokenizer


def adapter_state(model) -> dict:
    """A copy of the LoRA weights (megabytes): the best epoch of a stage, kept in memory."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def summary(stage_metrics: dict, skipped: dict, losses: list, device: str, steps_at: dict[int, int],
            steps_sharing: dict[int, int], started: float, processes: int = 1, precision: str = "fp32") -> dict:
    """The run's figures: totals over the stages, the last stage's losses, and each stage's own. `threads`: the most
    the run's processes used together in a step (`steps_at_threads`: steps at each count; `steps_at_processes`: steps
    that so many processes shared, learn/cores.py); `examples_seen`: the training examples the steps were computed on,
    over all processes (each by exactly one)."""
    done = list(stage_metrics.values())
    tokens, seconds, cells = (sum(m[k] for m in done) for k in ("tokens", "train_seconds", "padded_cells"))
    examples = {k: sum(m["examples"][k] for m in done) for k in ("train", "val", "dropped")}
    return {"train_loss": done[-1]["train_loss"], "val_loss": done[-1]["val_loss"], "best_epoch": done[-1]["best_epoch"],
            "steps": len(losses), "epochs": sum(m["epochs"] for m in done), "tokens": tokens,
            "scored_tokens": sum(m["scored_tokens"] for m in done), "tokens_per_s": tokens / seconds if seconds else 0.0,
            "padding_fraction": 1 - tokens / cells if cells else 0.0, "examples": examples, "processes": processes,
            "examples_seen": sum(m["examples_seen"] for m in done),
            "stages": stage_metrics, "skipped_stages": skipped, "device": device, "precision": precision,
            "threads": max(steps_at, default=0), "steps_at_threads": {str(k): v for k, v in sorted(steps_at.items())},
            "steps_at_processes": {str(k): v for k, v in sorted(steps_sharing.items())},
            "train_seconds": seconds, "duration_s": time.time() - started}


# ---------------------------------------------------------------- the recipe


def train(config: TrainConfig, *, base_model: str, out_dir: str | Path, train_file: str | Path | None = None,
          val_file: str | Path | None = None, preference_file: str | Path | None = None, pair_file: str | Path | None = None,
          stages: tuple[str, ...] | list[str] = ("sft",), start_adapter: str | Path | None = None) -> TrainResult:
    """Train one adapter in this process, through `stages` in order, and return where it is and how the run went."""
    base_model, stages = str(base_model), tuple(stages)
    files = dict(train_file=train_file, val_file=val_file, preference_file=preference_file, pair_file=pair_file)
    check_paths(base_model=base_model, out_dir=out_dir, start_adapter=start_adapter, **files)
    import torch
    from peft import set_peft_model_state_dict
    from tqdm import tqdm
    from transformers import get_scheduler, set_seed

    from learn.report import write_report

    started = time.time()
    device = pick_device(config)
    ranks = join(device, config.processes)  # alone, or this process's place in the group `accelerate launch` started
    device, tmp = ranks.device, Path(f"{out_dir}.tmp-{ranks.owner_pid}")
    precision = pick_precision(config, device)
    forward = forward_precision(precision, device)
    try:
        # -- setup: data first (a refused file costs no model load), then the model
        cores = CoreShare(config.threads, processes=ranks.world, yielding=device == "cpu" and not config.fsdp)
        torch.set_num_threads(cores.current)
        todo, skipped = read_data(config, base_model, stages, StageFiles(*(Path(f) if f else None for f in files.values())))
        set_seed(config.seed)
        model, tokenizer = load_model(config, base_model, device, start_adapter)
        trainable = [p for p in model.parameters() if p.requires_grad]
        ranks.broadcast(trainable)
        if config.fsdp:  # each process keeps 1/N of the decoder layers; their parameters are now sharded
            ranks = ranks.shard_model(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
        if ranks.world > 1:
            set_seed(config.seed + ranks.rank)  # each process its own dropout masks
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if ranks.main:
            tmp.mkdir(parents=True)
        rng = random.Random(config.seed)  # the same batches in every process: each takes its share of each one
        step_losses, epochs_log, stage_metrics = [], [], {}
        fresh = start_adapter is None  # a fresh LoRA is the identity: the reference is the base model itself
        for stage in todo:
            # -- stage setup: token ids, the reference log-probs (preference stages), a new optimizer and schedule
            stage.pad_id, stage.device = pad_id, device
            stage.encode(tokenizer)
            check_cut(config, stage.name, stage.train_set, stage.val_set)
            tick = time.perf_counter()
            with forward():
                stage.prepare(model, from_base=fresh, ranks=ranks)
            reference_s, fresh = time.perf_counter() - tick, False
            steps_per_epoch = math.ceil(math.ceil(len(stage.train_set) / config.batch_size) / config.grad_accum)
            total_steps = min(steps_per_epoch * config.epochs, config.max_steps or math.inf)
            optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
            scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                                      num_training_steps=total_steps)
            # -- train
            first_step, tokens, scored, cells, seconds, seen = len(step_losses), 0, 0, 0, 0.0, 0
            best_val, best_epoch, bad_epochs, best, epoch_losses = math.inf, 0, 0, None, []
            bar = tqdm(total=total_steps, desc=stage.name, unit="step", dynamic_ncols=True, disable=not ranks.main)
            for epoch in range(1, config.epochs + 1):
                model.train(stage.dropout)  # preference stages train without dropout, as TRL's trainers do
                batches = length_grouped_batches([stage.length(e) for e in stage.train_set], config.batch_size, rng)
                epoch_losses = []
                for g in range(0, len(batches), config.grad_accum):
                    if len(step_losses) - first_step >= total_steps:
                        break
                    cores.apply(ranks)  # several processes: decided together, and maybe not all take a share
                    tick = time.perf_counter()
                    micro = [[stage.train_set[i] for i in b] for b in batches[g: g + config.grad_accum]]
                    n_units = sum(stage.units(m) for m in micro)  # the step's mean is over all of it, as one large batch
                    step_loss, n_tokens, n_cells = 0.0, 0, 0
                    for examples in micro:
                        mine = ranks.shard(examples, cores.sharing)  # alone: all of it
                        with forward():
                            out = stage.micro_loss(model, mine, ranks)
                        if out is None:  # no share of this micro-batch here
                            continue
                        loss = out[0] / n_units
                        loss.backward()
                        step_loss, n_tokens, n_cells, seen = step_loss + loss.item(), n_tokens + out[1], n_cells + out[2], seen + len(mine)
                    ranks.sum_grads(trainable)  # every process now holds the whole step's gradient
                    step_loss, n_tokens, n_cells = ranks.sum([step_loss, n_tokens, n_cells])
                    check_finite(step_loss, f"{stage.name} step {len(step_losses) - first_step + 1}")  # every process: same sum
                    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    seconds += time.perf_counter() - tick
                    tokens, cells, scored = tokens + int(n_tokens), cells + int(n_cells), scored + n_units
                    step_losses.append(step_loss)
                    epoch_losses.append(step_loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / seconds:.0f}")
                model.eval()
                with forward():
                    val_loss = stage.validation_loss(model, ranks)
                check_finite(val_loss, f"{stage.name} validation after epoch {epoch}")
                epochs_log.append({"stage": stage.name, "epoch": epoch, "step": len(step_losses), "val_loss": val_loss,
                                   "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1)})
                if ranks.main:
                    bar.write(f"{stage.name} epoch {epoch}: train loss {epochs_log[-1]['train_loss']:.4f}, validation loss {val_loss:.4f}")
                if val_loss < best_val:
                    best_val, best_epoch, bad_epochs, best = val_loss, epoch, 0, adapter_state(model)
                else:
                    bad_epochs += 1  # a later, worse epoch never replaces the best one
                if bad_epochs >= config.early_stopping_patience or len(step_losses) - first_step >= total_steps:
                    break
            bar.close()
            if best is not None:  # the next stage, and the saved adapter, start from the best epoch
                set_peft_model_state_dict(model, best)
            seen_by = [int(n) for n in ranks.each(seen)]
            stage_metrics[stage.name] = {
                "train_loss": epochs_log[-1]["train_loss"], "val_loss": best_val, "best_epoch": best_epoch, "steps": len(step_losses) - first_step,
                "first_step": first_step, "epochs": epoch, "tokens": tokens, "scored_tokens": scored, "padded_cells": cells,
                "tokens_per_s": tokens / seconds if seconds else 0.0, "train_seconds": seconds, "reference_s": reference_s,
                "early_stopped": bad_epochs >= config.early_stopping_patience, "examples": stage.describe(),
                "examples_seen": sum(seen_by), "examples_seen_per_process": seen_by}

        # -- save (rank 0; the others hold the same weights)
        metrics = summary(stage_metrics, skipped, step_losses, device, dict(cores.steps_at), dict(cores.steps_sharing),
                          started, ranks.world, precision)
        whole = ranks.full_state({k: v for k, v in model.state_dict().items() if "lora_" in k}) if ranks.sharded else None
        if ranks.main:
            model.save_pretrained(tmp, **({"state_dict": whole} if whole is not None else {}))
            record = run_record(config, base_model=base_model, out_dir=out_dir, stages=stages, start_adapter=start_adapter, **files)
            write_report(tmp, {"config": record, **metrics, "early_stopped": any(m["early_stopped"] for m in stage_metrics.values()),
                               "train_loss_per_step": step_losses, "epochs_log": epochs_log})
            try:
                os.replace(tmp, out_dir)
            except OSError as e:
                raise TrainError(f"cannot move the finished adapter to {out_dir}: {e}") from e
        return TrainResult(out_dir=Path(out_dir), metrics=metrics)
    finally:
        # -- cleanup: nothing half-written stays behind, and every process leaves the group
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        ranks.close()


# ---------------------------------------------------------------- command line


PATH_FLAGS = {  # the run's paths: arguments of train(), not config fields
    "base_model": (["--base", "--base-model"], "Base model: a local Hugging Face folder or a Hugging Face id."),
    "train_file": (["--train", "--train-file"], "Chat JSONL to train on (the sft stage)."),
    "val_file": (["--val", "--val-file"], "Chat JSONL for the validation loss; default: val_fraction of the training file."),
    "preference_file": (["--preferences", "--preference-file"], "KTO rows {prompt, completion, label} (the kto stage)."),
    "pair_file": (["--pairs", "--pair-file"], "DPO pairs {prompt, chosen, rejected} (the dpo stage; kto uses them too)."),
    "start_adapter": (["--start-adapter"], "Continue training this adapter folder instead of a fresh LoRA."),
    "out_dir": (["--out", "--out-dir"], "Where the adapter goes; must not exist yet (adapter versions are never overwritten)."),
}


def argument_parser() -> argparse.ArgumentParser:
    """The paths, then one flag per TrainConfig field, typed and documented by the field itself."""
    parser = argparse.ArgumentParser(prog="python -m learn.train", description="Train a LoRA adapter on chat JSONL.")
    parser.add_argument("--config-json", help="the whole TrainConfig as JSON (how train_in_child passes it)")
    parser.add_argument("--result-json", help="also write the result (or the error) to this file")
    for name, (flags, text) in PATH_FLAGS.items():
        parser.add_argument(*flags, dest=name, help=text)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["sft"], help="stages in order (default: sft)")
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
    launched, rank = "WORLD_SIZE" in os.environ, int(os.environ.get("RANK", "0"))
    if launched:  # one of accelerate's processes: SIGTERM when the launcher dies, even by SIGKILL
        die_with_parent()
    missing = [PATH_FLAGS[n][0][0] for n in ("base_model", "out_dir") if getattr(args, n) is None]
    if args.train_file is None and args.preference_file is None and args.pair_file is None:
        missing.append("--train (or --preferences / --pairs)")
    if missing:
        parser.error("missing " + ", ".join(missing))
    given = {n: getattr(args, n) for n in TrainConfig.model_fields if getattr(args, n) is not None}
    try:
        config = TrainConfig.model_validate({**json.loads(args.config_json or "{}"), **given})
        # several processes asked for on a plain command line: start them through accelerate's launcher
        run = functools.partial(train_in_child, progress=True) if config.processes > 1 and not launched else train
        result = run(config, stages=args.stages, **{n: getattr(args, n) for n in PATH_FLAGS})
    except (TrainError, ValidationError) as e:
        message = str(e) if isinstance(e, TrainError) else "; ".join(
            ": ".join(filter(None, [".".join(map(str, x["loc"])), x["msg"]])) for x in e.errors())
        if args.result_json:
            try:
                with open(args.result_json, "x" if launched else "w") as f:  # of several processes, the first to fail tells
                    f.write(json.dumps({"error": message}))
            except FileExistsError:
                pass
        print(f"error: {message}", file=sys.stderr)
        return 2
    if rank != 0:  # rank 0 writes and reports for the run
        return 0
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"out_dir": str(result.out_dir), "metrics": result.metrics}))
    m = result.metrics
    print(f"adapter: {result.out_dir}")
    for name, s in m["stages"].items():
        print(f"{name}: steps {s['steps']}, epochs {s['epochs']}, train loss {s['train_loss']:.4f}, "
              f"validation loss {s['val_loss']:.4f}, {s['tokens_per_s']:.0f} tokens/s")
    for name, why in m["skipped_stages"].items():
        print(f"{name}: skipped, {why}")
    print(f"total: steps {m['steps']}, {m['tokens_per_s']:.0f} tokens/s, padding {m['padding_fraction']:.1%}")
    return 0


if __name__ == "__main__":
    if "WORLD_SIZE" in os.environ:  # one of accelerate's processes: a crash's traceback goes into torchrun's failure summary
        from torch.distributed.elastic.multiprocessing.errors import record

        sys.exit(record(main)())
    sys.exit(main())

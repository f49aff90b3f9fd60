"""Training tokens/s: this project's recipe (learn.train) against TRL's SFTTrainer, in one run.

    python bench/train_throughput.py                 # 20 steps each, batch 4, max_length 384
    python bench/train_throughput.py --steps 10 --model .tunewheel/models/SmolLM2-135M-Instruct

Same model (the prepared SmolLM2-135M-Instruct, fp32 on CPU), same data (64 short CoQA-style
chats made here), same LoRA (r=16, alpha 32, all linear projections), same optimizer settings
and number of steps, same scored tokens: TRL gets the recipe's own input_ids and assistant-only
labels (SmolLM2's template has no {% generation %} markers, so TRL's assistant_only_loss cannot
build them itself). TRL's gradient checkpointing is turned off, as the recipe does not use it.
Both count the non-padding input tokens of the batches they train on, over the training loop
only, with the same number of torch threads. Prints both figures, their ratio (target >= 1.0) and what limits the recipe.
Every recipe row runs as the learner runs it, in a child process (train_in_child); the row against TRL on the C
library's allocator, as TRL runs, and the others on the default mimalloc (learn.train.allocator), whose gain the 1-thread
rows show. Then the recipe on an idle machine, as the demo's learner finds it: with 1 thread, and with its default (learn/cores.py:
every core nobody else uses), and their ratio (target >= 1.8x). Where the CPU has bf16 instructions, also the opt-in
`precision = "bf16"` (bf16 autocast) with 1 thread against fp32. With more than one core, also the opt-in
`processes = N` (a process per core, up to the batch size), started as the learner starts it. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learn.cores import usable_cores  # noqa: E402
from learn.train import TrainConfig, cpu_has_bf16  # noqa: E402
from learn.train_child import train_in_child  # noqa: E402
from learn.train_data import encode  # noqa: E402
from serve.settings import load_settings  # noqa: E402

NAMES = ["Ada", "Tom", "Maria", "Kofi", "Lena", "Ravi", "Ines", "Sam"]
PLACES = ["the harbour", "a small farm", "the old mill", "the market", "a hill village", "the train station"]
THINGS = ["goats", "apple trees", "boats", "lanterns", "bicycles", "beehives"]


def coqa_chats(n: int, seed: int = 0) -> list[dict]:
    """Short CoQA-style conversations: a story as system prompt, 2-4 questions with short answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, place, thing, count = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS), rng.randint(2, 40)
        year = rng.randint(1890, 2020)
        story = (f"{name} lived near {place}. In {year} {name} bought {count} {thing}, and every morning "
                 f"{name} walked to {place} to look after them. Neighbours said the {thing} were the finest around.")
        turns = [("Who is the story about?", name), (f"What did {name} buy?", thing), ("How many?", str(count)),
                 ("In what year?", str(year)), ("Where did they live?", f"near {place}")]
        messages = [{"role": "system", "content": f"Answer each question from the story in a few words.\n\n{story}"}]
        for q, a in rng.sample(turns, rng.randint(2, 4)):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages})
    return rows


LORA = dict(rank=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
OPTIM = dict(learning_rate=2e-4, lr_scheduler="cosine", warmup_ratio=0.05, seed=0)


def run_recipe(model: Path, train_file: Path, val_file: Path, work: Path, steps: int, batch: int, max_length: int,
               threads: int | None, precision: str = "fp32", processes: int = 1, allocator: str = "mimalloc") -> dict:
    """The recipe as the learner runs it, in a child process (train_in_child: its allocator, learn.train.allocator),
    with `threads` torch threads (None: its default, the cores nobody else uses: learn/cores.py); with
    `processes` > 1, data-parallel (`accelerate launch`)."""
    config = TrainConfig(batch_size=batch, max_length=max_length, max_steps=steps, epochs=100, early_stopping_patience=100,
                         device="cpu", threads=threads, precision=precision, processes=processes, allocator=allocator, **LORA, **OPTIM)
    out = work / f"recipe-{threads or 'idle-cores'}-{precision}-{processes}-{allocator}"
    m = train_in_child(config, base_model=str(model), train_file=train_file, val_file=val_file, out_dir=out).metrics
    return {"tokens": m["tokens"], "seconds": m["train_seconds"], "tokens_per_s": m["tokens_per_s"],
            "padding_fraction": m["padding_fraction"], "scored_tokens": m["scored_tokens"], "steps": m["steps"],
            "steps_at_threads": m["steps_at_threads"], "steps_at_processes": m["steps_at_processes"], "precision": m["precision"],
            "processes": m["processes"], "allocator": allocator}


def run_trl(model: Path, rows: list[dict], work: Path, steps: int, batch: int, max_length: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = [encode(tokenizer, r["messages"], train_on_inputs=False, max_length=max_length) for r in rows]
    clock: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            clock["end"] = time.perf_counter()

    args = SFTConfig(output_dir=str(work / "trl"), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     learning_rate=OPTIM["learning_rate"], lr_scheduler_type=OPTIM["lr_scheduler"], warmup_steps=OPTIM["warmup_ratio"],
                     seed=OPTIM["seed"], weight_decay=0.0, max_grad_norm=1.0, max_length=max_length, gradient_checkpointing=False,
                     bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=steps,
                     include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(examples), processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[Clock()])
    collate, cells = trainer.data_collator, {"real": 0, "padded": 0}

    def counting_collator(examples):  # padding of the batches TRL builds (one prefetched batch may be included)
        batch = collate(examples)
        cells["real"] += int(batch["attention_mask"].sum())
        cells["padded"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    seconds = clock["end"] - clock["start"]
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": trainer.state.global_step,
            "padding_fraction": 1 - cells["real"] / cells["padded"]}


def head_share(model: Path, recipe: dict) -> dict:
    """Estimated share of training FLOPs in the LM head: scored positions only (recipe) vs every position."""
    config = json.loads((model / "config.json").read_text())
    h, v, layers, inter = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    body_per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # weights touched per token (attention + MLP)
    tokens, scored = recipe["tokens"], recipe["scored_tokens"]
    ours = scored * h * v / (scored * h * v + tokens * body_per_token)
    full = h * v / (h * v + body_per_token)
    return {"head_share_recipe": ours, "head_share_full_head": full, "scored_fraction": scored / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="default: the one `tunewheel model prepare` made")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) // 2),
                        help="torch threads of the recipe-vs-TRL comparison (default: half the cores, what the recipe "
                             "keeps while an engine is busy)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.json")
    args = parser.parse_args()
    args.model = args.model or Path(load_settings().base_model_path())
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `tunewheel model prepare` or pass --model")

    rows = coqa_chats(args.examples)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        train_file, val_file = work / "train.jsonl", work / "val.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        val_file.write_text("".join(json.dumps(r) + "\n" for r in coqa_chats(4, seed=1)))
        run = functools.partial(run_recipe, args.model, train_file, val_file, work, args.steps, args.batch, args.max_length)
        recipe = run(args.threads, allocator="system")  # TRL runs on the C library's allocator too
        trl = run_trl(args.model, rows, work, args.steps, args.batch, args.max_length, args.threads)
        # the machine as the demo's learner finds it: no engine traffic, so the recipe may take every core
        one = run(1)
        idle = run(None)
        one_bf16 = run(1, "bf16") if cpu_has_bf16() else None  # the opt-in precision, where the CPU has bf16 instructions
        cores = usable_cores()
        spread = run(None, processes=min(cores, args.batch)) if cores > 1 else None  # opt-in: a process per core

    ratio = recipe["tokens_per_s"] / trl["tokens_per_s"]
    idle_ratio = idle["tokens_per_s"] / one["tokens_per_s"]
    share = head_share(args.model, recipe)
    result = {"recipe": recipe, "trl": trl, "ratio": ratio, "recipe_1_thread": one, "recipe_idle_cores": idle,
              "mimalloc_ratio": one["tokens_per_s"] / recipe["tokens_per_s"] if args.threads == 1 else None,
              "idle_cores_ratio": idle_ratio, "recipe_1_thread_bf16": one_bf16,
              "bf16_ratio": one_bf16["tokens_per_s"] / one["tokens_per_s"] if one_bf16 else None,
              "recipe_processes": spread, "processes_ratio": spread["tokens_per_s"] / one["tokens_per_s"] if spread else None, **share,
              "settings": {"steps": args.steps, "batch": args.batch, "max_length": args.max_length, "examples": args.examples, "threads": args.threads,
                           "model": str(args.model), **LORA, **OPTIM}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"recipe (learn.train):  {recipe['tokens_per_s']:7.1f} tokens/s, C allocator  ({recipe['tokens']} tokens in {recipe['seconds']:.1f} s, "
          f"padding {recipe['padding_fraction']:.1%})")
    print(f"TRL SFTTrainer:        {trl['tokens_per_s']:7.1f} tokens/s  ({trl['tokens']} tokens in {trl['seconds']:.1f} s, "
          f"padding {trl['padding_fraction']:.1%})")
    print(f"ratio recipe / TRL:    {ratio:.2f}  (target >= 1.0)")
    if result["mimalloc_ratio"]:
        print(f"allocator:             {one['tokens_per_s']:7.1f} tokens/s with mimalloc (learn.train.allocator, the default) vs "
              f"{recipe['tokens_per_s']:.1f} with the C library's, 1 thread: {result['mimalloc_ratio']:.2f}x")
    print(f"idle cores:            {idle['tokens_per_s']:7.1f} tokens/s with the default threads (steps at each thread count: "
          f"{idle['steps_at_threads']}) vs {one['tokens_per_s']:.1f} with 1 thread: {idle_ratio:.2f}x (target >= 1.8x; "
          f"at most {len(os.sched_getaffinity(0))}x on {len(os.sched_getaffinity(0))} cores)")
    print(f"precision = bf16:      {one_bf16['tokens_per_s']:7.1f} tokens/s with 1 thread, {result['bf16_ratio']:.2f}x fp32 (opt-in: it "
          "learns less per step, learn/train_config.py)" if one_bf16 else
          "precision = bf16:      not measured (this CPU has no bf16 instructions)")
    if spread:
        print(f"processes = {spread['processes']}:         {spread['tokens_per_s']:7.1f} tokens/s, 1 thread each: "
              f"{result['processes_ratio']:.2f}x the 1-thread figure (opt-in data-parallel; steps each number of processes "
              f"shared: {spread['steps_at_processes']})")
    print(f"what limits it: {share['scored_fraction']:.0%} of positions are scored, so the 49k-vocab head is about "
          f"{share['head_share_recipe']:.0%} of the recipe's FLOPs (it would be {share['head_share_full_head']:.0%} with the head "
          "at every position); the rest is the 30-layer decoder's forward and backward, the same work TRL does. On CPU, "
          "TRL's fused head scores every position (it compacts to scored ones only on Triton devices) and also computes "
          "entropy and accuracy; it batches in random order, so it pads more. Within the recipe's step, torch.profiler shows "
          "the frozen matmuls (forward and input gradients) dominate; peft's LoRA dropout masks, a Bernoulli draw per value "
          "and adapted layer that did not spread over threads (9% of a step at 1 thread, 15% at 2), come from 64-bit draws "
          "instead (learn/dropout.py). Wall time also depends on the other processes sharing the cores.")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

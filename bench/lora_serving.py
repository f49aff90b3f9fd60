"""Adapter vs base model on the engine as the project starts it: how much slower is a LoRA answer?

    python bench/lora_serving.py                       # starts its own engine (embedded model)
    python bench/lora_serving.py --requests 24         # fewer requests per measurement

One run, one engine, the flags `tunewheel serve` gives it (serve/engine_child.py: --max-lora-rank
sized to learn.train.rank, --max-loras, float32 on CPU). The adapter has the shape the learner
trains (learn.train rank and target modules, random weights: speed does not depend on what it
learned). Requests go straight to vLLM (no gateway), greedy, in two workloads:
  coqa   CoQA-style turns: a story as system prompt, one question, an answer of at most 16 tokens
         (prefill-bound, what the demo's users and `tunewheel eval` send)
  long   a short prompt and a 128-token answer (decode-bound)
each at 1 and at 8 requests in flight. For each, base then adapter, the same requests, after one
warm-up request each. Prints the wall time of each and the adapter's speed relative to the base
(base time / adapter time; target >= 0.8) and writes bench/results/lora_serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "lora_serving.json"
TOPICS = ["lighthouses", "bread", "bees", "glaciers", "trains", "libraries", "volcanoes", "tea", "bridges", "owls",
          "maps", "clocks", "rivers", "kites", "salt", "violins"]


def coqa_requests(n: int) -> list[dict]:
    from feedback.synth import synth_coqa

    stories = synth_coqa(stories=max(1, n // 6 + 1), seed=7, variant="A")["data"]
    pairs = [(s["story"], q["input_text"]) for s in stories for q in s["questions"]][:n]
    return [{"messages": [{"role": "system", "content": f"Answer each question from the story in a few words.\n\n{story}"},
                          {"role": "user", "content": question}], "max_tokens": 16} for story, question in pairs]


def long_requests(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]}."}],
             "max_tokens": 128, "ignore_eos": True} for i in range(n)]


def make_adapter(settings, out: Path) -> Path:
    """A LoRA of the learner's shape (rank, alpha, target modules) with random, nonzero weights."""
    from bench.hotswap import make_random_adapter

    t = settings.learn.train
    return make_random_adapter(settings.base_model_path(), out, rank=t.rank, alpha=t.alpha, target_modules=tuple(t.target_modules))


async def timed(url: str, model: str, requests: list[dict], in_flight: int) -> dict:
    """Send `requests` to `model`, `in_flight` at a time; wall time and completion tokens."""
    queue = list(requests)
    tokens, failures = 0, []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            body = {**queue.pop(), "model": model, "temperature": 0}
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(in_flight)))
        seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests to {model} failed, e.g. {failures[0]}")
    return {"seconds": seconds, "completion_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement at 8 in flight (a quarter at 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from serve.engine import EngineManager
    from serve.engine_child import engine_command, free_port
    from serve.model import prepare_model
    from serve.settings import load_settings

    settings = load_settings(None, engine={"port": free_port()})
    prepare_model(settings)
    flags = engine_command(settings, "cpu")[3:]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp, EngineManager(settings) as engine:
        adapter = make_adapter(settings, Path(tmp) / "adapter")
        httpx.post(f"{engine.url}/v1/load_lora_adapter", json={"lora_name": "adapter", "lora_path": str(adapter)},
                   timeout=120, trust_env=False).raise_for_status()
        for model in ("base", "adapter"):  # warm-up: the first request of each pays one-time costs
            asyncio.run(timed(engine.url, model, coqa_requests(1), 1))
        for workload, make in (("coqa", coqa_requests), ("long", long_requests)):
            for in_flight in (1, 8):
                n = args.requests if in_flight > 1 else max(4, args.requests // 4)
                if workload == "long":
                    n = max(4, n // 3)
                requests = make(n)
                base = asyncio.run(timed(engine.url, "base", requests, in_flight))
                lora = asyncio.run(timed(engine.url, "adapter", requests, in_flight))
                row = {"workload": workload, "in_flight": in_flight, "requests": n, "base_s": base["seconds"],
                       "adapter_s": lora["seconds"], "speed": base["seconds"] / lora["seconds"],
                       "tokens": {"base": base["completion_tokens"], "adapter": lora["completion_tokens"]}}
                rows.append(row)
                print(f"{workload:<6} {in_flight} in flight, {n:3d} requests: base {row['base_s']:6.1f} s, adapter "
                      f"{row['adapter_s']:6.1f} s -> adapter at {row['speed']:.2f}x the base speed (target >= 0.8)", flush=True)
    result = {"rows": rows, "engine_flags": flags, "rank": settings.learn.train.rank,
              "target_modules": list(settings.learn.train.target_modules), "target_speed": 0.8}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    worst = min(rows, key=lambda r: r["speed"])
    print(f"slowest: {worst['workload']} at {worst['in_flight']} in flight, {worst['speed']:.2f}x; engine flags: {' '.join(flags)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

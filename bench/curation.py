"""Benchmark: curate a large turn log from SQLite; turns/s and peak memory at two log sizes.

    python bench/curation.py                       # 100,000 and 10,000 turns
    python bench/curation.py --turns 100000 --small 10000 --model DIR

Each log is generated into its own SQLite file (bulk insert through the store's migrated
schema): conversations about synthetic CoQA stories, each request holding the whole history,
~35% of turns rated up, ~10% down, some incomplete, empty, duplicated or carrying e-mail
addresses. Curation (the real pipeline: store stream -> filters -> the base model's
tokenizer -> snapshot folder) runs in a fresh child process per size, timed without tracing,
then again under tracemalloc. Memory is the child's peak RSS growth during curation and the
tracemalloc peak; both should stay flat from the small log to the large one. Wall time
depends on what else the machine runs, so the CPU time of the curation is printed too.
Target: >= 10,000 turns/s. Writes bench/results/curation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / ".pytest-data" / "models" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "bench" / "results" / "curation.json"
TARGET_TURNS_PER_S = 10_000


def generate_log(url: str, turns: int, seed: int = 0) -> int:
    """Fill a fresh store with `turns` turns in conversations of 1-8 turns; returns conversations."""
    from sqlalchemy import insert

    from feedback.coqa import SYSTEM_PROMPT
    from feedback.db import make_db
    from feedback.models import Conversation, Turn
    from feedback.synth import synth_record

    db = make_db(url)
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    convs, rows, n, c = [], [], 0, 0
    with db.begin() as conn:
        while n < turns:
            # ~4% of conversations replay an earlier story (exact duplicates when both are rated up),
            # ~2% shout their answers (normalized duplicates)
            record = synth_record("A", seed, c if c < 10 or rng.random() > 0.04 else rng.randrange(c))
            shout = rng.random() < 0.02
            cid = f"conv-{c:07d}"
            at = start + timedelta(seconds=c)
            convs.append({"id": cid, "created_at": at})
            history = [{"role": "system", "content": SYSTEM_PROMPT.format(story=record["story"])}]
            for seq in range(min(rng.randint(1, 8), turns - n)):
                question = record["questions"][seq]["input_text"]
                if rng.random() < 0.02:
                    question += f" Write to me at user{c}@example.com."
                answer = record["answers"][seq]["input_text"] if rng.random() > 0.03 else " "
                answer = answer.upper() + "!" if shout else answer
                history.append({"role": "user", "content": question})
                r = rng.random()
                rows.append({"id": f"cmpl-{n:08d}", "conversation_id": cid, "seq": seq, "created_at": at + timedelta(milliseconds=seq),
                             "alias": "chat", "adapter_version": "base", "request_messages": list(history), "answer": answer,
                             "params": {}, "status": "incomplete" if rng.random() < 0.02 else "ok", "stream": False,
                             "thread_hash": f"{n:064d}", "rating": "up" if r < 0.35 else "down" if r < 0.45 else None})
                history.append({"role": "assistant", "content": answer})
                n += 1
            c += 1
            if len(rows) >= 5000:
                conn.execute(insert(Conversation.__table__), convs)
                conn.execute(insert(Turn.__table__), rows)
                convs, rows = [], []
        if rows:
            conn.execute(insert(Conversation.__table__), convs)
            conn.execute(insert(Turn.__table__), rows)
    db.dispose()
    return c


def child(db_path: str, model: str, traced: bool) -> dict:
    """One curation run in this (fresh) process; prints its figures as JSON."""
    import tracemalloc

    from feedback.check import load_token_counter
    from feedback.curate import CurationConfig
    from feedback.db import make_db
    from feedback.queries import iter_log
    from feedback.snapshot import build_snapshot

    count_tokens = load_token_counter(model)
    db = make_db(f"sqlite:///{db_path}")
    config = CurationConfig(max_tokens=384, pii_scrub=True, heldout_fraction=0.1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if traced:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), time.process_time()
        snap = build_snapshot(iter_log(db), root=out, config=config, count_tokens=count_tokens, tokenizer=model)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "counts": snap.manifest["counts"],
              "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024}
    if traced:
        result["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    return result


def run_child(db_path: Path, model: str, traced: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(db_path), "--model", model] + (["--traced"] if traced else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(turns: int, model: str, workdir: Path) -> dict:
    db_path = workdir / f"log-{turns}.db"
    t0 = time.perf_counter()
    conversations = generate_log(f"sqlite:///{db_path}", turns)
    generated = time.perf_counter() - t0
    timed = run_child(db_path, model, traced=False)
    traced = run_child(db_path, model, traced=True)
    figures = {
        "turns": turns, "conversations": conversations, "generate_seconds": round(generated, 2),
        "curate_seconds": round(timed["seconds"], 2), "turns_per_s": round(turns / timed["seconds"]),
        "curate_cpu_seconds": round(timed["cpu_seconds"], 2), "turns_per_cpu_s": round(turns / timed["cpu_seconds"]),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "peak_rss_growth_mb": round(timed["rss_growth_mb"], 1), "tracemalloc_peak_mb": round(traced["tracemalloc_peak_mb"], 1),
        "counts": timed["counts"],
    }
    print(f"{turns:>7} turns ({conversations} conversations): curated in {figures['curate_seconds']} s = "
          f"{figures['turns_per_s']} turns/s ({figures['curate_cpu_seconds']} s CPU = {figures['turns_per_cpu_s']} turns per CPU-second, "
          f"load average {figures['load_average_1m']}); peak RSS growth {figures['peak_rss_growth_mb']} MB, "
          f"tracemalloc peak {figures['tracemalloc_peak_mb']} MB; train {timed['counts']['train']}, "
          f"held-out {timed['counts']['heldout']}, removed {timed['counts']['removed']}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Base model folder (its tokenizer counts tokens).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.traced)))
        return
    if not (Path(args.model) / "tokenizer.json").is_file() and not (Path(args.model) / "tokenizer_config.json").is_file():
        sys.exit(f"no tokenizer in {args.model}: run `tunewheel model prepare` (or pass --model DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        small = measure(args.small, args.model, Path(tmp))
        large = measure(args.turns, args.model, Path(tmp))
    ratio = large["tracemalloc_peak_mb"] / max(small["tracemalloc_peak_mb"], 1e-9)
    verdict = {"target_turns_per_s": TARGET_TURNS_PER_S, "meets_target": large["turns_per_s"] >= TARGET_TURNS_PER_S,
               "meets_target_per_cpu_second": large["turns_per_cpu_s"] >= TARGET_TURNS_PER_S,
               "tracemalloc_peak_ratio_large_over_small": round(ratio, 2),
               "memory_flat": ratio < 1.5 and large["peak_rss_growth_mb"] < small["peak_rss_growth_mb"] + 50}
    print(f"target {TARGET_TURNS_PER_S} turns/s: {'met' if verdict['meets_target'] else 'NOT met'} in wall time, "
          f"{'met' if verdict['meets_target_per_cpu_second'] else 'NOT met'} per CPU-second; "
          f"peak memory {args.turns} vs {args.small} turns: x{verdict['tracemalloc_peak_ratio_large_over_small']} "
          f"({'flat' if verdict['memory_flat'] else 'GROWS'})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "curation", "model": args.model, "small": small, "large": large, **verdict}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

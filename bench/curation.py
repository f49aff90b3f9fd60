"""Benchmark: curate a large turn log from SQLite; turns/s and peak memory at two log sizes.

    python bench/curation.py                       # 100,000 and 10,000 turns
    python bench/curation.py --turns 100000 --small 10000 --model DIR

Each log is generated into its own SQLite file (bulk insert through the store's migrated
schema): conversations about synthetic CoQA stories, each request holding the whole history,
~35% of turns rated up, ~10% down (a third of those with a correction),
some incomplete, empty, duplicated or carrying e-mail addresses, spread over five API keys.
Curation (the real pipeline: store stream -> PII scrubbing -> filters -> the base model's
tokenizer -> snapshot folder with SFT, KTO and DPO files) runs in a fresh child process per
size, timed without tracing, then again under tracemalloc; at the large size once more with
PII scrubbing off, the baseline its cost is measured against in the same run. Memory is the
child's peak RSS growth during curation and the tracemalloc peak; both should stay flat from
the small log to the large one. Wall time depends on what else the machine runs, so the CPU
time of the curation is printed too. The synthetic stories hold no digits, so a last figure
scrubs number-dense text alone (kB/s), the case where the phone recognizer costs most.
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
    extra = random.Random(seed + 1)  # corrections and keys: the texts stay those of earlier runs
    keys = [f"{k:064x}" for k in range(1, 6)]
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
            key = extra.choice(keys)
            convs.append({"id": cid, "created_at": at, "key_hash": key})
            history = [{"role": "system", "content": SYSTEM_PROMPT.format(story=record["story"])}]
            for seq in range(min(rng.randint(1, 8), turns - n)):
                question = record["questions"][seq]["input_text"]
                if rng.random() < 0.02:
                    question += f" Write to me at user{c}@example.com."
                answer = record["answers"][seq]["input_text"] if rng.random() > 0.03 else " "
                answer = answer.upper() + "!" if shout else answer
                history.append({"role": "user", "content": question})
                r = rng.random()
                rating = "up" if r < 0.35 else "down" if r < 0.45 else None
                gold = record["answers"][seq]["input_text"]
                correction = f"The answer is: {gold}" if rating == "down" and extra.random() < 1 / 3 else None
                rows.append({"id": f"cmpl-{n:08d}", "conversation_id": cid, "seq": seq, "created_at": at + timedelta(milliseconds=seq),
                             "alias": "chat", "adapter_version": "base", "request_messages": list(history), "answer": answer,
                             "params": {}, "status": "incomplete" if rng.random() < 0.02 else "ok", "stream": False,
                             "thread_hash": f"{n:064d}", "rating": rating, "correction": correction, "key_hash": key})
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


def child(db_path: str, model: str, traced: bool, pii: bool = True) -> dict:
    """One curation run in this (fresh) process; prints its figures as JSON."""
    import tracemalloc

    from feedback.check import load_token_counter
    from feedback.curate import CurationConfig
    from feedback.db import make_db
    from feedback.queries import iter_log
    from feedback.snapshot import build_snapshot

    count_tokens = load_token_counter(model)
    db = make_db(f"sqlite:///{db_path}")
    config = CurationConfig(max_tokens=384, pii_scrub=pii, heldout_fraction=0.1)
    if pii:
        from feedback.pii import recognizers

        recognizers()  # presidio's import (a few seconds, once per process) is not curation time
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


def run_child(db_path: Path, model: str, traced: bool, pii: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", str(db_path), "--model", model] + (["--traced"] if traced else [])
    cmd += [] if pii else ["--no-pii"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(turns: int, model: str, workdir: Path, baseline: bool = False) -> dict:
    db_path = workdir / f"log-{turns}.db"
    t0 = time.perf_counter()
    conversations = generate_log(f"sqlite:///{db_path}", turns)
    generated = time.perf_counter() - t0
    timed = run_child(db_path, model, traced=False)
    traced = run_child(db_path, model, traced=True)
    no_pii = run_child(db_path, model, traced=False, pii=False) if baseline else None
    figures = {
        "turns": turns, "conversations": conversations, "generate_seconds": round(generated, 2),
        "curate_seconds": round(timed["seconds"], 2), "turns_per_s": round(turns / timed["seconds"]),
        "curate_cpu_seconds": round(timed["cpu_seconds"], 2), "turns_per_cpu_s": round(turns / timed["cpu_seconds"]),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "peak_rss_growth_mb": round(timed["rss_growth_mb"], 1), "tracemalloc_peak_mb": round(traced["tracemalloc_peak_mb"], 1),
        "counts": timed["counts"],
    }
    if no_pii is not None:
        figures["without_pii_scrub"] = {"curate_seconds": round(no_pii["seconds"], 2), "turns_per_s": round(turns / no_pii["seconds"]),
                                        "curate_cpu_seconds": round(no_pii["cpu_seconds"], 2)}
        figures["pii_scrub_cpu_cost"] = round(timed["cpu_seconds"] / no_pii["cpu_seconds"] - 1, 3)
    print(f"{turns:>7} turns ({conversations} conversations): curated in {figures['curate_seconds']} s = "
          f"{figures['turns_per_s']} turns/s ({figures['curate_cpu_seconds']} s CPU = {figures['turns_per_cpu_s']} turns per CPU-second, "
          f"load average {figures['load_average_1m']}); peak RSS growth {figures['peak_rss_growth_mb']} MB, "
          f"tracemalloc peak {figures['tracemalloc_peak_mb']} MB; train {timed['counts']['train']}, "
          f"held-out {timed['counts']['heldout']}, KTO {timed['counts']['preferences']}, DPO {timed['counts']['preference_pairs']}, "
          f"removed {timed['counts']['removed']}, PII {timed['counts']['pii']}", flush=True)
    if no_pii is not None:
        print(f"{turns:>7} turns without PII scrubbing: {figures['without_pii_scrub']['turns_per_s']} turns/s "
              f"({figures['without_pii_scrub']['curate_cpu_seconds']} s CPU): scrubbing costs "
              f"{figures['pii_scrub_cpu_cost']:+.1%} CPU", flush=True)
    return figures


def pii_text_throughput(seconds: float = 3.0) -> dict:
    """kB/s of PII scrubbing alone on number-dense prose (the slow case) and on a line with PII."""
    from feedback.pii import recognizers, scrub_text

    recognizers()
    dense = ("In 1850, the town of Millbrook had 3,200 people and 14 shops. The mill, built in 1832, employed 120 workers "
             "who earned 2 dollars a day. On May 5, 1861, 45 men left; 31 came back in 1865. Call the museum on "
             "+44 20 7946 0958 or write to info@millbrook.example.org. ") * 4
    out = {}
    for name, text in (("number_dense", dense), ("no_digits", "The quick brown fox jumps over the lazy dog. " * 20)):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            scrub_text(text)
            n += 1
        kb_per_s = n * len(text) / 1000 / (time.perf_counter() - t0)
        out[name] = {"kb_per_s": round(kb_per_s, 1), "ms_per_kb": round(1000 / kb_per_s, 3)}
    print(f"PII scrubbing alone: number-dense prose {out['number_dense']['kb_per_s']} kB/s "
          f"({out['number_dense']['ms_per_kb']} ms per kB), text without digits {out['no_digits']['kb_per_s']} kB/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--model", help="Base model folder (its tokenizer counts tokens); default: the one "
                        "`tunewheel model prepare` made, as `make bench` runs it.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-pii", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from serve.settings import load_settings

        args.model = load_settings().base_model_path()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.traced, pii=not args.no_pii)))
        return
    if not (Path(args.model) / "tokenizer.json").is_file() and not (Path(args.model) / "tokenizer_config.json").is_file():
        sys.exit(f"no tokenizer in {args.model}: run `tunewheel model prepare` (or pass --model DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        small = measure(args.small, args.model, Path(tmp))
        large = measure(args.turns, args.model, Path(tmp), baseline=True)
    pii = pii_text_throughput()
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
    RESULTS.write_text(json.dumps({"benchmark": "curation", "model": args.model, "small": small, "large": large, "pii_text": pii, **verdict},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

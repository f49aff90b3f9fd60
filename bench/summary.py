"""Issue 15's table from one `make bench` run: each figure beside its target, and whether it is met.

    python bench/summary.py                  # reads bench/results/*.json and the demos' results
    python bench/summary.py --since 1764662400   # figures written before this time are marked stale

`make bench` runs it last, with `--since` set to the moment the run began, so a figure left over
from an earlier run (a bench that failed or was skipped) is marked `(earlier run)` rather than
passing for this run's. The demo is not part of `make bench` (it takes its own 12 minutes): its
rows come from the last `make demo` (`.tunewheel/demo-results/default.json`) and the last
`python -m serve.demo --seeded` (`seeded.json`) on this checkout, with the time each finished (marked
`(earlier run)` too, when that was before the bench run began). Writes
bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMOS = REPO / ".tunewheel" / "demo-results"


@dataclass
class Row:
    figure: str
    now: str
    target: str
    met: bool | None  # None: not measured
    source: str
    stale: bool = False


def load(path: Path) -> tuple[dict | None, float | None]:
    try:
        return json.loads(path.read_text()), path.stat().st_mtime
    except (OSError, ValueError):
        return None, None


def lora_rows(d: dict) -> list[Row]:
    by = {(r["workload"], r["in_flight"]): r for r in d["rows"]}
    rows = []
    coqa = by.get(("coqa", 8))
    if coqa:
        rows.append(Row("adapter vs base, CoQA-style turns, 8 in flight, direct vLLM",
                        f"base {coqa['base_s']:.1f} s, adapter {coqa['adapter_s']:.1f} s ({coqa['speed']:.2f}x)",
                        ">= 0.8x", coqa["speed"] >= 0.8, "lora_serving"))
        rows.append(Row("CoQA turns as `tunewheel eval` sends them (8 in flight): adapter time / base time",
                        f"{coqa['adapter_s'] / coqa['base_s']:.2f}", "<= 1.3", coqa["adapter_s"] / coqa["base_s"] <= 1.3,
                        "lora_serving"))
    others = [r for key, r in sorted(by.items()) if key != ("coqa", 8)]
    if others:
        worst = min(others, key=lambda r: r["speed"])
        rows.append(Row("adapter vs base, the other workloads (coqa at 1, long answers at 1 and 8): the slowest",
                        f"{worst['workload']} at {worst['in_flight']}: {worst['speed']:.2f}x", ">= 0.8x",
                        worst["speed"] >= 0.8, "lora_serving"))
    return rows


def train_rows(d: dict) -> list[Row]:
    idle, one = d["recipe_idle_cores"], d["recipe_1_thread"]
    bf16 = f"; opt-in bf16 {d['bf16_ratio']:.2f}x at 1 thread" if d.get("bf16_ratio") else ""
    spread = d.get("recipe_processes")
    processes = f"; opt-in processes = {spread['processes']}: {d['processes_ratio']:.2f}x" if spread else ""
    return [Row("training tokens/s on idle cores vs the recipe's 1 thread",
                f"{idle['tokens_per_s']:.0f} vs {one['tokens_per_s']:.0f} tokens/s ({d['idle_cores_ratio']:.2f}x{bf16}{processes})",
                ">= 1.8x", d["idle_cores_ratio"] >= 1.8, "train_throughput")]


def hotswap_rows(d: dict) -> list[Row]:
    swaps = ", ".join(f"{s['swap'].split()[0]} " + ("never" if s["first_answer_s"] is None else f"{s['first_answer_s']:.2f} s")
                      for s in d["swaps"])
    worst = d["max_first_answer_s"]
    return [Row("promotion/rollback under 8 streams, admin call -> first answer by the new version",
                f"{swaps}; {d['requests_failed']} failed", "0 failed, every swap <= 1 s",
                d["requests_failed"] == 0 and worst is not None and worst <= 1.0, "hotswap")]


def gateway_rows(d: dict) -> list[Row]:
    rows = []
    stub, engine = d.get("stub") or {}, d.get("engine") or {}
    if "1" in stub:
        added = stub["1"]["added_median_ms"]
        rows.append(Row("gateway's own cost (stub engine): added median latency at 1 in flight",
                        f"+{added:.2f} ms", "<= 1 ms", added <= 1.0, "gateway_overhead"))
    if "8" in stub:
        rps = stub["8"]["gateway"]["requests_per_s"]
        direct = stub["8"]["direct"]["requests_per_s"]
        cpu = stub["8"]["gateway"].get("cpu_ms_per_request")  # absent from results of before it was measured
        own = f"; the gateway process's CPU: {cpu:.2f} ms per request" if cpu else ""
        rows.append(Row("gateway's own cost (stub engine): requests/s at 8 in flight, one gateway process",
                        f"{rps:.0f} req/s (direct {direct:.0f}{own})", ">= 1,000 req/s", rps >= 1000, "gateway_overhead"))
    if "8" in engine:
        ratio = engine["8"]["throughput_ratio"]
        rows.append(Row("gateway vs direct vLLM, 8 concurrent, real engine", f"{ratio:.3f}", ">= 0.95", ratio >= 0.95,
                        "gateway_overhead"))
    return rows


def restyle_rows(d: dict) -> list[Row]:
    raw = (d.get("answer_latency_s") or {}).get("median")
    rows = [restyle_row("restyle step, added time per answer (median, one at a time)",
                        d["rows"]["restyler"]["latency_s"]["median"], raw)]
    lookup = d.get("prompt_lookup")
    if lookup:
        rows.append(restyle_row(f"the same, on a restyler engine with engine.prompt_lookup = {lookup['tokens']} (opt-in, "
                                "restyle.engine_url)", lookup["latency_s"]["median"], raw,
                                f"; {lookup['same_rewrites']} of {lookup['n']} rewrites unchanged"))
    return rows


def restyle_row(figure: str, added: float, raw: float | None, extra: str = "") -> Row:
    """A rewrite's added seconds against the raw answer's own (target: no more)."""
    return Row(figure, f"{added:.1f} s" + (f" vs the raw answer's {raw:.1f} s" if raw is not None else "") + extra,
               "<= the raw answer's own time", None if raw is None else added <= raw, "restyle")


def demo_rows(since: float | None) -> list[Row]:
    rows = []
    for name, what in (("seeded", "`python -m serve.demo --seeded` (the issue's seeded demo)"),
                       ("default", "`make demo` (learning from its users alone)")):
        d, mtime = load(DEMOS / f"{name}.json")
        if d is None:
            rows.append(Row(f"{what} wall time", "not run on this checkout", "<= 12 min", None, f"demo-results/{name}"))
            continue
        gain = d.get("gain_f1")
        finished = d.get("finished_at", mtime)  # the file's time only for a result from before the demo wrote it
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(finished))
        target = "<= 12 min, F1 gain >= +0.39" if name == "seeded" else "<= 12 min, as the seeded one"
        # the issue quotes today's gain as +0.39: compared at the two decimals it gives
        ok = d["minutes"] <= 12 and (round(gain or 0, 2) >= 0.39 if name == "seeded" else True)
        rows.append(Row(f"{what} wall time", f"{d['minutes']:.1f} min, held-out F1 {gain:+.3f} (run {when})"
                        if gain is not None else f"{d['minutes']:.1f} min (run {when})", target, ok, f"demo-results/{name}",
                        stale=since is not None and finished < since))
    return rows


READERS = {"lora_serving": lora_rows, "train_throughput": train_rows, "hotswap": hotswap_rows,
           "gateway_overhead": gateway_rows, "restyle": restyle_rows}


def summary(since: float | None) -> list[Row]:
    rows: list[Row] = []
    for name, reader in READERS.items():
        d, mtime = load(RESULTS / f"{name}.json")
        if d is None:
            rows.append(Row(f"bench/{name}.py", "no result", "", None, name))
            continue
        try:
            made = reader(d)
        except (KeyError, TypeError, ZeroDivisionError) as exc:  # a result file from an older version of the bench
            made = [Row(f"bench/{name}.py", f"unreadable result ({type(exc).__name__}: {exc})", "", None, name)]
        for row in made:
            row.stale = since is not None and mtime < since
        rows += made
    return rows + demo_rows(since)


def render(rows: list[Row]) -> str:
    width = max(len(r.figure) for r in rows)
    nows = max(len(r.now) for r in rows)
    lines = []
    for r in rows:
        verdict = "not measured" if r.met is None else "met" if r.met else "NOT met"
        lines.append(f"{r.figure:<{width}}  {r.now:<{nows}}  target {r.target:<34} {verdict}"
                     + ("  (earlier run)" if r.stale else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=float, help="epoch seconds the bench run began; older results are marked")
    args = parser.parse_args()
    rows = summary(args.since)
    print("\n== issue 15's figures, this run")
    print(render(rows))
    missed = [r.figure for r in rows if r.met is False]
    print(f"\n{sum(r.met is True for r in rows)} met, {len(missed)} not met, {sum(r.met is None for r in rows)} not measured")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: the canary's sequential test on simulated rating streams (no engine, no database).

    python bench/canary.py                  # 1,000 runs per row, under a minute on 2 cores
    python bench/canary.py --runs 4000 --seed 1

For each base up-rate (0.5, and 0.8 since chat ratings lean positive) and each true difference
of the candidate's up-rate from the champion's (0, +2, +5, +10 points, then -2, -5, -10), it runs
the rule of learn/canary.py with the default `CanarySettings` (10% canary share, alpha 0.05,
margin 2 points, 200 to 5,000 candidate ratings, at_max = promote) on independent streams of
ratings: each rating goes to the canary with probability `share`, and the rule looks after every
canary rating (the champion's ratings in between count at the next look; tests/learn/test_canary.py
checks the A/A rate with a look after every single rating). The duration limit is not simulated:
a run ends at its decision or at max_ratings.

Wrong decisions: for a candidate as good or better, a rollback; for a worse one, a promotion
(early or at the maximum). "At max" is the share that ended by the maximum without a significant
difference (promoted there, by the default at_max). Ratings to a decision are the candidate arm's
(a run that reached the maximum counts max_ratings); the champion has about 9 times as many.
Probation rows compare a newly promoted version (all traffic) with a frozen predecessor window of
2,000 ratings. The A/A rows' rollback rate must be at most alpha: the bench exits 1 otherwise.
Writes bench/results/canary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.canary import PROMOTE, ROLLBACK, ArmPaths, CanarySettings, decide_paths  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "canary.json"
BASES = (0.5, 0.8)
DIFFS = (0.0, 0.02, 0.05, 0.10, -0.02, -0.05, -0.10)
PROBATION_WINDOW = 2000  # ratings in the predecessor's last window
CHUNK = 250  # runs per batch: (250 x 5,000) arrays keep memory near 100 MB


def canary_streams(rng, runs: int, p_cand: float, p_champ: float, s: CanarySettings) -> tuple[ArmPaths, ArmPaths]:
    """Cumulative figures at each canary rating: the champion's ratings since the previous canary
    rating are geometric with mean (1 - share) / share, as when each rating picks its arm at random."""
    k = s.max_ratings
    c_ratings = np.broadcast_to(np.arange(1, k + 1), (runs, k))
    c_ups = np.cumsum(rng.random((runs, k)) < p_cand, axis=1)
    gaps = rng.geometric(s.share, (runs, k)) - 1
    b_ratings = np.cumsum(gaps, axis=1)
    b_ups = np.cumsum(rng.binomial(gaps, p_champ), axis=1)
    return ArmPaths(c_ratings, c_ups), ArmPaths(b_ratings, b_ups)


def probation_streams(rng, runs: int, p_new: float, p_old: float, s: CanarySettings) -> tuple[ArmPaths, ArmPaths]:
    """The new version's ratings grow; the predecessor's window is frozen (one draw per run)."""
    k = s.max_ratings
    c_ratings = np.broadcast_to(np.arange(1, k + 1), (runs, k))
    c_ups = np.cumsum(rng.random((runs, k)) < p_new, axis=1)
    b_ups = np.broadcast_to(rng.binomial(PROBATION_WINDOW, p_old, (runs, 1)), (runs, k))
    return ArmPaths(c_ratings, c_ups), ArmPaths(np.full((runs, k), PROBATION_WINDOW), b_ups)


def run_row(rng, runs: int, base: float, diff: float, s: CanarySettings, probation: bool) -> dict:
    actions, looks, by_max = [], [], []
    for start in range(0, runs, CHUNK):
        make = probation_streams if probation else canary_streams
        cand, champ = make(rng, min(CHUNK, runs - start), base + diff, base, s)
        out = decide_paths(cand, champ, s, probation=probation)
        actions.append(out.action)
        looks.append(cand.ratings[0, out.look])
        by_max.append(out.by_max)
    a, n, at_max = np.concatenate(actions), np.concatenate(looks), np.concatenate(by_max)
    promoted, rolled_back = float(np.mean(a == PROMOTE)), float(np.mean(a == ROLLBACK))
    return {
        "kind": "probation" if probation else "canary",
        "base": base,
        "diff": diff,
        "runs": runs,
        "promoted": promoted,
        "rolled_back": rolled_back,
        "at_max": float(np.mean(at_max)),
        "promoted_early": float(np.mean(~at_max & (a == PROMOTE))),
        "wrong": rolled_back if diff >= 0 else promoted,
        "median_ratings": float(np.median(n)),
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'kind':<10}{'base':>5}{'diff':>7}{'wrong':>8}{'rollback':>10}{'promote':>9}{'(early)':>9}{'at max':>8}{'median ratings':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kind']:<10}{r['base']:>5.1f}{100 * r['diff']:>+6.0f}p{r['wrong']:>8.1%}{r['rolled_back']:>10.1%}"
              f"{r['promoted']:>9.1%}{r['promoted_early']:>9.1%}{r['at_max']:>8.1%}{r['median_ratings']:>16,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="simulated runs per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    s = CanarySettings()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    rows = [run_row(rng, args.runs, base, diff, s, probation=False) for base in BASES for diff in DIFFS]
    rows += [run_row(rng, args.runs, base, diff, s, probation=True) for base in BASES for diff in (0.0, -0.02, -0.05, -0.10)]
    print(f"canary share {s.share:.0%}, alpha {s.alpha}, margin {100 * s.margin:.0f} points, ratings {s.min_ratings}..{s.max_ratings}, "
          f"at max: {s.at_max}; {args.runs} runs per row; probation window {PROBATION_WINDOW} ratings\n")
    print_table(rows)
    print("\nwrong: a rollback when diff >= 0, a promotion when diff < 0 (at -2 points, the margin, the rule is indifferent);\n"
          "(early): promoted before the maximum; at max: ended by max_ratings without a significant difference;\n"
          "median ratings: the candidate's (or new version's) ratings at the decision, max_ratings when it ran to the end")
    aa = [r for r in rows if r["diff"] == 0.0]
    worst = max(r["rolled_back"] for r in aa)
    ok = worst <= s.alpha
    print(f"\nA/A false-rollback rate: at most {worst:.1%} over {len(aa)} rows vs alpha {s.alpha:.0%} -> {'within' if ok else 'ABOVE'} alpha")
    print(f"{time.perf_counter() - t0:.0f} s")
    result = {"settings": s.model_dump(mode="json"), "runs": args.runs, "seed": args.seed, "probation_window": PROBATION_WINDOW,
              "rows": rows, "aa_false_rollback_max": worst, "aa_within_alpha": ok}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if not ok:
        sys.exit(f"FAIL: the A/A false-rollback rate {worst:.1%} is above alpha {s.alpha:.0%}")


if __name__ == "__main__":
    main()

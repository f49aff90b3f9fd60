"""`learn.max_share_per_key`: no API key contributes more than a share of a snapshot's rows.

    removed = cap_file(folder / "train.jsonl", max_share=0.25)     # rows dropped, rewritten in place
    level = water_level([120, 30, 10], uncapped=40, max_share=0.25)  # rows each key may keep

Applied to each training file of a snapshot (SFT examples, KTO rows, DPO pairs) once curation
has written it, with the key each row records in `meta.key`. Rows without a key (an open
gateway's callers, the operator's seed files) are never capped and count in the total, so a
snapshot whose rows come from one key and nothing else keeps nothing of it: that is the rule
(one caller would be the whole snapshot), and the manifest says how many rows it removed.
A key over its share keeps its first rows in the file's order (conversations are ordered by
their id, which the caller does not choose when it is derived or random).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path


def water_level(per_key: Iterable[int], *, uncapped: int, max_share: float) -> int | None:
    """The most rows any one key may keep so that each keeps at most `max_share` of what is left
    (the largest c with c <= max_share * (uncapped + sum(min(n, c)))); None when no key is over."""
    counts = sorted((n for n in per_key if n > 0), reverse=True)
    if not counts or counts[0] <= max_share * (uncapped + sum(counts)):
        return None
    total = uncapped + sum(counts)
    above = 0  # keys with more than c rows
    for c in range(counts[0], -1, -1):
        while above < len(counts) and counts[above] > c:
            above += 1
        if c < counts[0]:
            total -= above  # every key above c gives up one more row
        if c <= max_share * total:
            return c
    return 0


def _key(line: str) -> str | None:
    return (json.loads(line).get("meta") or {}).get("key")


def cap_file(path: str | Path, *, max_share: float) -> int:
    """Drop the rows of keys over `max_share` of the file (rewriting it in place); how many."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        keys = Counter(_key(line) for line in f if line.strip())
    uncapped = keys.pop(None, 0)
    level = water_level(keys.values(), uncapped=uncapped, max_share=max_share)
    if level is None:
        return 0
    kept: Counter = Counter()
    removed = 0
    tmp = path.with_name(path.name + ".capped")
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
        for line in src:
            key = _key(line) if line.strip() else None
            if key is not None:
                kept[key] += 1
                if kept[key] > level:
                    removed += 1
                    continue
            out.write(line)
    os.replace(tmp, path)
    return removed

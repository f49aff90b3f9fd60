"""The demo's simulated users, and its per-cycle table.

    round_ = users_round(url, stories_file, correct_every=3)     # one round of users through the OpenAI API
    round_["up"], round_["total"], round_["corrections"], round_["versions"]
    print(table(base_heldout, rounds, cycles))

A simulated user holds one conversation about one story (variant A of `data synth-coqa`): it asks
the story's questions in order, through the official `openai` client, keeping the answers it got
as the conversation's history, as a real client does. It rates every answer by comparing it
with the gold answer (thumbs up when the official CoQA F1 is at least 0.5) and, on one thumbs-down
in three (its first, fourth, ...), writes the gold answer as a correction: the answer it wanted.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

UP_F1 = 0.5  # a simulated user gives a thumbs up when the answer's F1 against the gold is at least this


def users_round(url: str, users_file: Path, *, correct_every: int = 3, concurrency: int = 8, max_tokens: int = 32) -> dict:
    """Each simulated user talks through one story, rating every answer; the round's figures."""
    import openai

    from feedback.coqa import parse_record, to_heldout
    from learn.evaluate import SYSTEM_PROMPT
    from learn.metrics import score_turn

    stories = [to_heldout(parse_record(r)) for r in json.loads(Path(users_file).read_text())["data"]]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=2)
    http = httpx.Client(base_url=url, trust_env=False, timeout=60)
    versions: set[str] = set()

    def talk(story: dict) -> list[tuple[str, bool]]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(story=story["story"])}]
        ratings, downs = [], 0
        for turn in story["turns"]:
            messages.append({"role": "user", "content": turn["question"]})
            raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages, max_tokens=max_tokens, temperature=0)
            versions.add(raw.headers.get("x-tunewheel-adapter", "?"))
            reply = raw.parse()
            answer = reply.choices[0].message.content or ""
            up = score_turn(answer, turn["answers"])[1] >= UP_F1
            body = {"completion_id": reply.id, "rating": "up" if up else "down"}
            corrected = not up and correct_every > 0 and downs % correct_every == 0
            downs += not up
            if corrected:
                body["correction"] = turn["answers"][0]
            http.post("/v1/feedback", json=body).raise_for_status()
            ratings.append((body["rating"], corrected))
            messages.append({"role": "assistant", "content": answer})
        return ratings

    with ThreadPoolExecutor(concurrency) as pool:
        ratings = [r for rs in pool.map(talk, stories) for r in rs]
    http.close()
    up = sum(1 for rating, _ in ratings if rating == "up")
    return {"users": len(stories), "up": up, "total": len(ratings), "rate": up / max(1, len(ratings)),
            "corrections": sum(1 for _, c in ratings if c), "versions": sorted(versions)}


def _rate(r: dict) -> str:
    return f"{r['rate']:.0%} ({r['up']}/{r['total']})"


def table(base: dict, rounds: list[dict], cycles: list[dict]) -> str:
    """Before (the base model) and one column per cycle.

    `base`: held-out scores of the base model; `rounds[k]`: the users round answered after k cycles;
    `cycles[k]`: {"version", "outcome", "heldout": candidate scores, "counts": examples by source}."""
    heads = ["before (base)", *[f"cycle {i + 1} ({c['version'] or '-'})" for i, c in enumerate(cycles)]]
    rows: list[tuple[str, list[str]]] = [
        ("held-out EM (variant B)", [f"{base['em']:.3f}", *[f"{c['heldout']['em']:.3f}" if c.get("heldout") else "-" for c in cycles]]),
        ("held-out F1 (variant B)", [f"{base['f1']:.3f}", *[f"{c['heldout']['f1']:.3f}" if c.get("heldout") else "-" for c in cycles]]),
        ("gate", ["", *[c["outcome"] for c in cycles]]),
        ("live thumbs-up rate", [_rate(rounds[0]), *[_rate(rounds[i + 1]) if i + 1 < len(rounds) else "-" for i in range(len(cycles))]]),
    ]
    for label, key in (("  up-rated", ("sft", "rated")), ("  corrected", ("sft", "corrected")), ("  down-rated", ("kto", "down")),
                       ("  pairs", ("dpo", "pairs")), ("  replayed", ("sft", "replay")), ("  seed", ("sft", "seed"))):
        values = ["", *[str((c.get("counts") or {}).get(key[0], {}).get(key[1], 0)) for c in cycles]]
        if key[1] not in ("replay", "seed") or any(v not in ("", "0") for v in values):
            rows.append((label, values))
    rows.insert(4, ("training examples:", ["" for _ in heads]))
    width = max(22, *(len(h) + 2 for h in heads))
    lines = [f"  {'':<26}" + "".join(f"{h:>{width}}" for h in heads), "  " + "-" * (26 + width * len(heads))]
    lines += [f"  {label:<26}" + "".join(f"{v:>{width}}" for v in values) for label, values in rows]
    return "\n".join(lines)

"""Train a restyler adapter and gate it: the learner's recipe on (neutral -> styled) pairs.

    outcome = train_restyler(settings.learn.train, registry, style="pirate", data_dir=pairs_dir,
                             base_model=settings.base_model_path(), dirs=settings.learn_dirs, gateway_url=url)

Steps: train (in a child process, the learner's `learn.train` recipe) into a fresh version
folder -> register it as a `restyler` candidate with its style -> rewrite every held-out
neutral text with the base model and with the candidate, both through the gateway with the
same system prompt -> chrF against the original styled text, plus the content check (the
neutral text's numbers and names survive) -> promote or reject. A failure leaves the
style's promoted restyler as it was.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from learn.restyle import RestyleScores, gate, score
from learn.settings import LearnDirs
from learn.train import TrainResult, train_in_child
from learn.train_config import TrainConfig, TrainError, run_record


@dataclass
class RestyleOutcome:
    style: str
    version: str | None = None
    promoted: bool = False
    base: dict | None = None
    candidate: dict | None = None
    reasons: list[str] = field(default_factory=list)
    latency_ms: dict | None = None
    train_metrics: dict | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.error:
            return f"restyler {self.style}: FAILED: {self.error}"
        verdict = "promoted" if self.promoted else "rejected"
        lines = [f"restyler {self.style}: {self.version} {verdict}"]
        lines += [f"  {r}" for r in self.reasons]
        if self.latency_ms:
            lines.append(f"  restyle latency per answer: median {self.latency_ms['median']:.0f} ms, "
                         f"p95 {self.latency_ms['p95']:.0f} ms (n={self.latency_ms['n']})")
        return "\n".join(lines)


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(system, user, assistant) of each held-out pair."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                m = json.loads(line)["messages"]
                rows.append((m[0]["content"], m[1]["content"], m[2]["content"]))
    return rows


async def rewrite_all(url: str, model: str, pairs: list[tuple[str, str, str]], *, concurrency: int = 8) -> tuple[list[str], list[float]]:
    """Greedy rewrites of every pair's user text by `model`, and each request's latency in ms."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=600) as client:
        async def one(system: str, user: str, original: str) -> tuple[str, float]:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "temperature": 0, "max_tokens": max(64, 2 * len(original.split()) + 32),
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"] or "", 1000 * (time.perf_counter() - t0)
        results = await asyncio.gather(*(one(*p) for p in pairs))
    return [r[0] for r in results], [r[1] for r in results]


def score_model(url: str, model: str, pairs) -> tuple[RestyleScores, list[float]]:
    outputs, latencies = asyncio.run(rewrite_all(url, model, pairs))
    return score(model, [p[1] for p in pairs], outputs, [p[2] for p in pairs]), latencies


def train_restyler(config: TrainConfig, registry, *, style: str, data_dir: Path, base_model: str, dirs: LearnDirs,
                   gateway_url: str, min_chrf_gain: float = 1.0, max_content_drop: float = 0.1,
                   train: Callable[..., TrainResult] = train_in_child) -> RestyleOutcome:
    """Train (`config`, the `[learn.train]` section with any overrides) on the style's pairs under
    `data_dir`, score and gate; the version goes under `dirs.adapters`, its report under `dirs.runs`."""
    outcome = RestyleOutcome(style=style)
    train_file, heldout_file = Path(data_dir) / "restyle.train.jsonl", Path(data_dir) / "restyle.heldout.jsonl"
    for f in (train_file, heldout_file):
        if not f.is_file():
            outcome.error = f"{f} does not exist: run `tunewheel restyle build --style {style} --texts PATH` first"
            return outcome
    name = registry.new_version_name("restyler", style)
    outcome.version = name
    paths = dict(base_model=base_model, train_file=train_file, out_dir=dirs.adapters / name)
    try:
        result = train(config, **paths)
    except TrainError as exc:
        outcome.error = f"training failed, the promoted restyler is unchanged: {exc}"
        return outcome
    outcome.train_metrics = result.metrics
    parent = registry.prod("restyler", style)
    registry.register(name, kind="restyler", style=style, path=result.out_dir, parent=parent.name if parent else None,
                      train_config=run_record(config, **paths), metrics={"train": result.metrics})
    pairs = read_pairs(heldout_file)
    try:
        base, _ = score_model(gateway_url, "base", pairs)
        cand, latencies = score_model(gateway_url, f"chat@{name}", pairs)
    except httpx.HTTPError as exc:
        registry.reject(name, error=f"scoring failed: {exc}")
        outcome.error = f"scoring through {gateway_url} failed ({exc}); is `tunewheel serve` running?"
        return outcome
    decision = gate(base, cand, min_chrf_gain=min_chrf_gain, max_content_drop=max_content_drop)
    outcome.base, outcome.candidate, outcome.reasons = asdict(base), asdict(cand), decision.reasons
    outcome.latency_ms = {"median": statistics.median(latencies), "p95": sorted(latencies)[int(0.95 * (len(latencies) - 1))],
                          "n": len(latencies)}
    gate_record = {"promote": decision.promote, "reasons": decision.reasons, "base": outcome.base, "candidate": outcome.candidate}
    if decision.promote:
        registry.promote(name, gate=gate_record, metrics={"heldout": outcome.candidate})
        outcome.promoted = True
    else:
        registry.reject(name, gate_record, metrics={"heldout": outcome.candidate})
    report = Path(dirs.runs) / f"{name}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(asdict(outcome), indent=2) + "\n")
    return outcome

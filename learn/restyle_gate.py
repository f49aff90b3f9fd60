"""The restyler's gate: scored on what users see, chat answers rewritten through the served engine.

    answers = await gate_answers(url, config, db=db)              # logged answers, topped up by PROBE_PROMPTS
    base = await score_rewrites(url, config, "base", answers, classifier=clf)
    cand = await score_rewrites(url, config, "chat@restyler-pirate-v0002", answers, classifier=clf)
    decision = gate(base, cand, config.gate)                      # a pure function of the two

Both the base model and the candidate rewrite the same answers with the same request
(learn/restyle_request.py, what the gateway sends). Two figures decide, as in the
style-transfer literature: *style strength*, the share of rewrites the style's classifier calls
in-style (it must rise by `restyle.gate.min_style_gain` over the base model's), and *content
kept*, the chrF of each rewrite against the raw answer (at least `min_content_chrf`) and the
share of rewrites keeping every name and number (at least `min_facts_kept`). The in-corpus
chrF (rewrites of held-out neutral chunks against their styled originals) is reported beside
them, never decisive: a restyler that copies its input scores well there and does nothing for
users. The answers are a sample of logged answers (what users asked), topped up, while the log
is short, with the served model's answers to PROBE_PROMPTS (varied, unlike any style corpus).
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from learn.restyle_request import rewrite_request
from learn.restyle_style import StyleClassifier, chrf, facts_kept

PROBE_PROMPTS = [
    "How many legs does a spider have?", "What is the capital of Japan?", "Give me one tip for sleeping better.",
    "Who wrote Romeo and Juliet?", "What is a prime number?", "How do I boil an egg?",
    "Why is the sky blue?", "Name three planets of the solar system.", "What does a bicycle need to stay upright?",
    "How long does it take light from the Sun to reach Earth?", "What is photosynthesis, in two sentences?",
    "Suggest a name for a grey cat.", "What year did the Berlin Wall fall?", "How do I say thank you in French?",
    "What is the boiling point of water?", "Give me a short packing list for a beach day.",
]
GENERAL_PROMPTS = [  # the classifier's general (out-of-style) text: none of these is a PROBE_PROMPT
    "What is the tallest mountain on Earth?", "Explain what a noun is.", "How do vaccines work?",
    "Give me a tip for learning a new language.", "What is the largest ocean?", "Who painted the Mona Lisa?",
    "How do plants drink water?", "What is a healthy breakfast?", "Describe the water cycle.",
    "How many days are in a leap year?", "Why do we have seasons?", "Name a few fruits rich in vitamin C.",
    "How do I make a cup of tea?", "Who was Marie Curie?", "How far away is the Moon?", "What is an island?",
]


@dataclass
class RestyleScores:
    """One model's rewrites of the gate's answers."""

    model: str
    style_strength: float
    """Share of rewrites the style classifier calls in-style."""
    content_chrf: float
    """chrF of the rewrites against the raw answers."""
    facts_kept: float
    """Share of rewrites keeping every name and number of the raw answer."""
    transferred: float
    """Share of rewrites both in-style and keeping every name and number."""
    n: int
    corpus_chrf: float | None = None
    """In-corpus chrF: rewrites of held-out neutral chunks against their styled originals (reported only)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few (answer, rewrite, in_style, facts_kept) rows for the report."""


def score(model: str, answers: list[str], rewrites: list[str], *, classifier: StyleClassifier,
          corpus_chrf: float | None = None, samples: int = 4) -> RestyleScores:
    """Style strength and content kept of `rewrites` (one per answer)."""
    styled = classifier.in_style(rewrites)
    kept = [facts_kept(a, r) for a, r in zip(answers, rewrites)]
    n = max(1, len(answers))
    return RestyleScores(
        model=model, style_strength=sum(styled) / n, content_chrf=chrf(rewrites, answers), facts_kept=sum(kept) / n,
        transferred=sum(s and k for s, k in zip(styled, kept)) / n, n=len(answers), corpus_chrf=corpus_chrf,
        samples=[{"answer": a, "rewrite": r, "in_style": s, "facts_kept": k}
                 for a, r, s, k in list(zip(answers, rewrites, styled, kept))[:samples]])


@dataclass
class RestyleDecision:
    promote: bool
    reasons: list[str]


def gate(base: RestyleScores, candidate: RestyleScores, rules: Any) -> RestyleDecision:
    """Promote when style strength rises by `rules.min_style_gain` over the base model's and content
    kept stays above its floors (`min_content_chrf`, `min_facts_kept`); in-corpus chrF is reported."""
    gain = candidate.style_strength - base.style_strength
    checks = [
        (gain >= rules.min_style_gain,
         f"style strength {base.style_strength:.0%} -> {candidate.style_strength:.0%} ({gain:+.0%}; need >= {rules.min_style_gain:+.0%})"),
        (candidate.content_chrf >= rules.min_content_chrf,
         f"content kept: chrF vs raw answer {candidate.content_chrf:.1f} (base {base.content_chrf:.1f}; floor {rules.min_content_chrf:.1f})"),
        (candidate.facts_kept >= rules.min_facts_kept,
         f"content kept: names and numbers in {candidate.facts_kept:.0%} of rewrites (base {base.facts_kept:.0%}; floor {rules.min_facts_kept:.0%})"),
    ]
    reasons = [("ok   " if ok else "FAIL ") + text for ok, text in checks]
    if base.corpus_chrf is not None and candidate.corpus_chrf is not None:
        reasons.append(f"in-corpus chrF {base.corpus_chrf:.1f} -> {candidate.corpus_chrf:.1f} (reported, not decisive)")
    reasons.append(f"styled with names and numbers kept: {candidate.transferred:.0%} (base {base.transferred:.0%}) of {candidate.n} answers")
    return RestyleDecision(promote=all(ok for ok, _ in checks), reasons=reasons)


# --- the answers and the rewrites -----------------------------------------------------------

def logged_answers(db: Any, n: int, *, skip_system: set[str] = frozenset(), exclude: set[str] = frozenset(), seed: int = 0,
                   max_chars: int = 1200) -> list[str]:
    """Up to `n` answers users got (the raw answer of a restyled turn), sampled from the turn log.
    Turns whose system prompt is in `skip_system` are the restyler's own traffic (its gate's
    rewrites, a build's de-stylings), not answers: left out, and so are the texts in `exclude`
    (the style classifier's own training texts: scored on them it would judge from memory)."""
    from sqlmodel import Session, select

    from feedback.models import Turn

    with Session(db) as s:
        rows = s.exec(select(Turn.raw_answer, Turn.answer, Turn.request_messages).where(Turn.status == "ok")
                      .order_by(Turn.created_at.desc()).limit(50 * n)).all()
    texts = []
    for raw, answer, messages in rows:
        first = (messages or [{}])[0]
        if first.get("role") == "system" and str(first.get("content")).startswith(tuple(skip_system) or ("\0",)):
            continue
        text = whole_sentences(raw or answer or "")
        seen = text in texts or text in exclude or (raw or answer or "").strip() in exclude
        if text and len(text) <= max_chars and not seen:
            texts.append(text)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def whole_sentences(text: str) -> str:
    """`text` without a last sentence cut off mid-way (an answer that ran into max_tokens): a
    restyler given a cut answer goes on writing it instead of closing it, which no user's whole
    answer asks of it."""
    text = text.strip()
    if not text or text[-1] in ".!?:)\"'`*" or text[-1].isdigit():
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text)]
    return text[:ends[-1]] if ends else text


async def served_answers(url: str, prompts: list[str], *, model: str = "base", max_tokens: int = 96,
                         concurrency: int = 8, api_key: str | None = None) -> list[str]:
    """The served model's greedy answers to `prompts`, whole sentences only; empty ones left out."""
    from learn.restyle_destyle import ask_model

    answers = await ask_model(prompts, url=url, model=model, prompt="", concurrency=concurrency, max_tokens=max_tokens,
                              api_key=api_key)
    return [a for a in map(whole_sentences, answers) if a]


async def gate_answers(url: str, config: Any, *, db: Any = None, served: Any = None,
                       exclude: set[str] = frozenset(), api_key: str | None = None) -> list[str]:
    """`config.gate.answers` chat answers to score on: logged ones first, then the served model's
    answers to PROBE_PROMPTS (`served`: served_answers, or a stand-in)."""
    want = config.gate.answers
    from learn.restyle import PARAMS_PROMPT

    skip = {config.system_prompt, config.neutralise_prompt, PARAMS_PROMPT}
    answers = logged_answers(db, want, skip_system=skip, exclude=exclude) if db is not None else []
    if len(answers) < want:
        answers += await (served or served_answers)(url, PROBE_PROMPTS[: want - len(answers)],
                                                    max_tokens=config.gate.answer_max_tokens, api_key=api_key)
    return answers


async def rewrite_all(url: str, config: Any, model: str, texts: list[str], *, concurrency: int = 8,
                      api_key: str | None = None) -> tuple[list[str], list[float]]:
    """`model`'s rewrite of each text with the gateway's restyle request, and each one's seconds."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=600) as client:
        async def one(text: str) -> tuple[str, float]:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=rewrite_request(config, model, text))
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"] or "", time.perf_counter() - t0
        results = await asyncio.gather(*(one(t) for t in texts))
    return [r[0] for r in results], [r[1] for r in results]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """Median and p95 (nearest rank) in seconds, and the count."""
    if not seconds:
        return {"median": 0.0, "p95": 0.0, "n": 0}
    ordered = sorted(seconds)
    return {"median": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "n": len(ordered)}

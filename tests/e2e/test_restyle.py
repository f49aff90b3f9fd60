"""The restyler end to end on the real engine, for two synthetic styles (pirate, scribe): pairs
built through the gateway, a real SmolLM2 restyler trained, gated on chat answers, promoted, and
then judged on 8 varied chat questions unlike the corpus: at least 6 of 8 styled answers in the
style by the classifier with their names and numbers kept, at most 1 of 8 for the base model with
the same prompt (issue 12's check). The serving path (plain and streamed, the turn logged with its
raw answer) runs on the same promoted pirate restyler."""

import asyncio
import json
import time

import httpx
import pytest
from sqlmodel import Session

from feedback.models import Turn
from learn.restyle_gate import rewrite_all, served_answers
from learn.restyle_style import StyleClassifier, facts_kept
from learn.restyle_synth import synth_corpus

pytestmark = [pytest.mark.engine, pytest.mark.slow]

QUESTIONS = [  # none is a gate PROBE_PROMPT, none is about the corpora's shops, towns and recipes
    "What is the largest planet in our solar system?", "How many minutes are in 2 hours?",
    "Who invented the telephone?", "What is 12 times 12?", "Name one benefit of drinking water.",
    "What language is spoken in Brazil?", "How many continents are there?", "What do bees collect from flowers?",
]


def _cli(*args, settings):
    from typer.testing import CliRunner

    from serve.cli import app

    env = {"TUNEWHEEL_DATA_DIR": str(settings.data_dir), "TUNEWHEEL_ENGINE__MODEL": settings.engine.model,
           "TUNEWHEEL_STORE__URL": settings.store_url}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def _gateway_with_restylers(engine_url, model_dir, tmp, styles: list[str], *train_args: str, texts: int = 60):
    """A gateway with a restyler per style built, trained and gated through the CLI; each one must be promoted."""
    from tests.fixtures.gateway import start_gateway

    gw = start_gateway(tmp, engine_url, engine={"url": engine_url, "model": str(model_dir)})
    cost = {}
    try:
        for style in styles:
            started = time.perf_counter()
            corpus = tmp / f"{style}.jsonl"
            corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in synth_corpus(texts, seed=0, style=style)))
            print(_cli("restyle", "build", "--style", style, "--texts", str(corpus), "--url", gw.url, "--markers-only",
                       settings=gw.settings))
            out = _cli("restyle", "train", "--style", style, "--url", gw.url, *train_args, settings=gw.settings)
            print(out)  # the gate's figures and the added latency, in the test log
            cost[style] = time.perf_counter() - started
            assert f"restyler-{style}-v0001 promoted" in out, out
        print("restyler build + train + gate, seconds:", {k: round(v) for k, v in cost.items()})
    except BaseException:
        gw.stop()
        raise
    return gw


@pytest.fixture(scope="module")
def restylers(engine_url, model_dir, tmp_path_factory):
    """Issue 12's check: a promoted restyler per style, trained and gated as an operator would."""
    gw = _gateway_with_restylers(engine_url, model_dir, tmp_path_factory.mktemp("restyle"), ["pirate", "scribe"], "--answers", "8")
    yield gw
    gw.stop()


@pytest.mark.parametrize("style", ["pirate", "scribe"])
def test_promoted_restyler_styles_chat_answers_and_keeps_their_facts(restylers, style):
    gw = restylers
    raw = asyncio.run(served_answers(gw.url, QUESTIONS, model="chat", max_tokens=96))  # whole sentences, as users get
    assert len(raw) == 8
    version = gw.registry.prod("restyler", style).name
    classifier = StyleClassifier.load(gw.settings.datasets_dir / "restyle" / style)

    def transferred(rewrites):
        calls = classifier.in_style(rewrites)
        return sum(c and facts_kept(a, r) for a, r, c in zip(raw, rewrites, calls)), rewrites

    restyled, seconds = asyncio.run(rewrite_all(gw.url, gw.settings.restyle, f"chat@{version}", raw))
    base, _ = asyncio.run(rewrite_all(gw.url, gw.settings.restyle, "base", raw))
    n_styled, n_base = transferred(restyled)[0], transferred(base)[0]
    print(f"{style}: restyler {n_styled}/8, base {n_base}/8, added latency median {sorted(seconds)[4]:.1f} s")
    for a, r in zip(raw, restyled):
        print(f"  {a!r}\n  -> {r!r}")
    assert n_styled >= 6, restyled
    assert n_base <= 1, base


def test_styled_answers_through_the_gateway_plain_and_streamed(restylers):
    gw = restylers
    client = gw.client()
    question = [{"role": "user", "content": "What is the largest planet in our solar system?"}]
    plain = client.chat.completions.create(model="chat", messages=question, max_tokens=24, temperature=0,
                                           extra_body={"style": "pirate"})
    styled = plain.choices[0].message.content
    assert styled and plain.choices[0].finish_reason
    chunks = client.chat.completions.create(model="chat", messages=question, max_tokens=24, temperature=0,
                                            stream=True, extra_body={"style": "pirate"})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == styled
    gw.writer.flush()
    with Session(gw.db) as s:
        turn = s.get(Turn, plain.id)
        assert turn.style == "pirate" and turn.answer == styled
        assert turn.raw_answer and turn.raw_answer != styled  # the user got the restyler's rewrite of the raw answer
    r = httpx.post(f"{gw.url}/v1/feedback", json={"completion_id": plain.id, "rating": "up"})
    assert r.status_code == 201
    assert "tunewheel_restyle_latency_seconds_bucket" in httpx.get(f"{gw.url}/metrics").text


def test_unknown_style_lists_styles(gateway):
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "chat", "style": "nope",
                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert "nope" in r.json()["error"]["message"] and "styles" in r.json()["error"]["message"]

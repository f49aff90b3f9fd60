"""Gateway on the real vLLM engine, driven through the official `openai` client.

    TUNEWHEEL_TEST_ENGINE_URL=http://127.0.0.1:8101 pytest -m engine tests/serve/gateway/test_gateway_engine.py

Plain and streamed answers, a three-turn conversation threaded into one conversation without
any header, feedback on a streamed answer, and the same turn log on PostgreSQL.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from sqlmodel import Session, select

from feedback.models import Turn
from feedback.queries import conversation_turns
from serve.settings import hash_key

pytestmark = pytest.mark.engine

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}
QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"]


def stored(gw, turn_id: str) -> Turn:
    gw.writer.flush(30)
    with Session(gw.db) as s:
        turn = s.get(Turn, turn_id)
        assert turn is not None, f"turn {turn_id} was not logged"
        return turn


def three_turn_conversation(client: openai.OpenAI) -> list[tuple[str, str]]:
    """Chat as a client would: each request repeats the history; the second turn is streamed."""
    messages, said = [SYSTEM], []
    for i, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        if i == 1:
            stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0, stream=True)
            chunks = list(stream)
            completion_id = chunks[0].id
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0)
            completion_id, answer = reply.id, reply.choices[0].message.content
        assert answer.strip()
        said.append((completion_id, answer))
        messages.append({"role": "assistant", "content": answer})
    return said


def test_plain_answer_through_openai_client(gateway):
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[SYSTEM, {"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-tunewheel-adapter"] == "base"
    assert reply.model == "chat" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    turn = stored(gateway, reply.id)
    assert turn.answer == reply.choices[0].message.content
    assert (turn.prompt_tokens, turn.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert turn.params == {"max_tokens": 16, "temperature": 0} and turn.status == "ok"


def test_streamed_answer_through_openai_client(gateway):
    client = gateway.client()
    stream = client.chat.completions.create(model="base", messages=[SYSTEM, {"role": "user", "content": "Count to five."}],
                                            max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and {c.model for c in chunks} == {"base"}
    assert all(c.usage is None for c in chunks)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    turn = stored(gateway, ids.pop())
    assert turn.answer == answer and turn.stream and turn.status == "ok"
    assert turn.completion_tokens and turn.ttft_ms is not None and turn.finish_reason in ("stop", "length")


def test_unknown_model_and_bad_body_through_openai_client(gateway):
    client = gateway.client()
    with pytest.raises(openai.NotFoundError, match="valid names"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model="chat", messages=[])
    with pytest.raises(openai.UnprocessableEntityError, match="serve.limits.max_tokens"):  # the gateway's cap
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):  # vLLM's own refusal (a prompt over the context) keeps its status
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello " * 2500}],
                                       max_tokens=8)
    gateway.writer.flush(30)
    with Session(gateway.db) as s:
        assert s.exec(select(Turn)).all() == []


def test_client_leaving_mid_stream_leaves_an_incomplete_turn(gateway):
    body = {"model": "chat", "messages": [{"role": "user", "content": "Write a long poem."}], "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        completion_id = json.loads(first[6:])["id"]
        for _ in range(6):
            next(lines)
    for _ in range(100):  # the gateway notices the closed connection at its next write
        gateway.writer.flush(30)
        with Session(gateway.db) as s:
            turn = s.get(Turn, completion_id)
        if turn is not None:
            break
        time.sleep(0.1)
    assert turn is not None and turn.status == "incomplete" and turn.finish_reason is None
    assert turn.completion_tokens is None or turn.completion_tokens < 200


def engine_running(engine_url: str) -> float:
    """Requests vLLM is generating for now (its own gauge)."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running"))


def test_a_non_streamed_generation_stops_when_its_client_leaves(gateway, engine_url):
    body = {"model": "chat", "messages": [{"role": "user", "content": "Write a long poem."}], "max_tokens": 1000,
            "ignore_eos": True}  # about a minute of generation on this CPU
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=2))
    for _ in range(50):  # the gateway drops its engine request; vLLM aborts a request whose client closed
        if engine_running(engine_url) == 0:
            break
        time.sleep(0.1)
    assert engine_running(engine_url) == 0
    assert 'tunewheel_requests_total{alias="chat",status="499",version="base"}' in httpx.get(f"{gateway.url}/metrics").text
    gateway.writer.flush(30)
    with Session(gateway.db) as s:
        assert s.exec(select(Turn)).all() == []


def test_three_turns_join_one_conversation(gateway):
    said = three_turn_conversation(gateway.client())
    first = stored(gateway, said[0][0])
    with Session(gateway.db) as s:
        turns = conversation_turns(s, first.conversation_id)
    assert [t.id for t in turns] == [cid for cid, _ in said]
    assert [t.answer for t in turns] == [a for _, a in said]
    assert [t.request_messages[-1]["content"] for t in turns] == QUESTIONS
    assert [t.stream for t in turns] == [False, True, False]


def test_feedback_after_a_streamed_answer(make_gateway):
    gw = make_gateway(serve={"api_keys": [hash_key("alice"), hash_key("bob")]})
    stream = gw.client(api_key="alice").chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, stream=True)
    completion_id = [c.id for c in stream][0]
    rate = {"completion_id": completion_id, "rating": "up", "comment": "good"}
    r = httpx.post(f"{gw.url}/v1/feedback", json=rate, headers={"authorization": "Bearer bob"})
    assert r.status_code == 403
    r = httpx.post(f"{gw.url}/v1/feedback", json=rate, headers={"authorization": "Bearer alice"})
    assert r.status_code == 201, r.text
    assert r.json()["completion_id"] == completion_id and r.json()["rating"] == "up"
    assert stored(gw, completion_id).rating == "up"
    assert 'tunewheel_feedback_total{rating="up",version="base"}' in httpx.get(f"{gw.url}/metrics").text


@pytest.mark.postgres
def test_turn_log_on_postgres(make_gateway, pg_fresh_url):
    gw = make_gateway(store={"url": pg_fresh_url})
    assert gw.db.dialect.name == "postgresql"
    said = three_turn_conversation(gw.client())
    first = stored(gw, said[0][0])
    with Session(gw.db) as s:
        turns = conversation_turns(s, first.conversation_id)
    assert [(t.id, t.answer) for t in turns] == said
    r = httpx.post(f"{gw.url}/v1/feedback", json={"completion_id": said[1][0], "rating": "down"})
    assert r.status_code == 201 and stored(gw, said[1][0]).rating == "down"

"""The bad-input suite, limits: each request over a `[serve.limits]` limit, or a body that is not
strict JSON, gets the documented 4xx (429/503 with Retry-After), writes no row, and the gateway
answers the next good request as before. vLLM faked with respx.

    pytest tests/serve/gateway/test_limits.py
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from sqlmodel import Session, func, select

from feedback.models import Feedback
from serve.settings import hash_key
from tests.serve.gateway.fakes import MESSAGES, call_and_leave, turns, vllm_answer

JSON = {"content-type": "application/json"}


async def assert_unharmed(gw, upstream, headers=None) -> None:
    """No turn and no rating stored, and the gateway still answers a good request."""
    assert turns(gw.writer) == []
    with Session(gw.db) as s:
        assert s.exec(select(func.count()).select_from(Feedback)).one() == 0
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=headers or {})
    assert r.status_code == 200, r.text
    assert (await gw.client.get("/health")).status_code == 200


def chat(**fields) -> dict:
    return {"model": "chat", "messages": MESSAGES, **fields}


@pytest.fixture
async def roomy(make_gw):
    """A gateway with the default body size limit (1 MB), so the other limits are the ones that bite."""
    return await make_gw(serve={"max_request_bytes": 1_000_000})


@pytest.mark.parametrize(("body", "param", "words"), [
    (chat(max_tokens=5000), "max_tokens", "serve.limits.max_tokens"),
    (chat(max_completion_tokens=5000), "max_completion_tokens", "serve.limits.max_tokens"),
    (chat(messages=[{"role": "user", "content": "x" * 40_000}]), "messages", "max_prompt_chars"),
    (chat(messages=[{"role": "user", "content": "hi"}] * 300), "messages", "max_messages"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "description": "d" * 40_000}}]), "messages",
     "max_prompt_chars"),
    (chat(n=8), "n", "serve.limits.max_n"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "serve.limits.max_stop"),
    (chat(stop="x" * 200), "stop", "max_stop_chars"),
    (chat(stop_token_ids=list(range(10))), "stop_token_ids", "serve.limits.max_stop"),
    (chat(logit_bias={str(i): 1 for i in range(400)}), "logit_bias", "max_logit_bias"),
    (chat(logit_bias={"hello": 1}), "logit_bias", "not a token id"),
    (chat(logit_bias={"42": 1000}), "logit_bias", "[-100, 100]"),
    (chat(guided_regex="a" * 20_000), "guided_regex", "max_grammar_bytes"),
    (chat(guided_json={"type": "object", "description": "d" * 20_000}), "guided_json", "max_grammar_bytes"),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {"description": "d" * 20_000}}}),
     "response_format", "max_grammar_bytes"),
    (chat(structured_outputs={"grammar": "g" * 20_000}), "structured_outputs", "max_grammar_bytes"),
    (chat(ignore_eos=True, min_tokens=100_000), "min_tokens", "max_tokens"),
    (chat(ignore_eos=True, max_tokens=8, min_tokens=9), "min_tokens", "max_tokens"),
    (chat(prompt_logprobs=20), "prompt_logprobs", "serve.limits.engine_params"),
    (chat(chat_template="{{ 7*7 }}"), "chat_template", "serve.limits.engine_params"),
])
async def test_a_request_over_a_limit_is_422_naming_the_field(roomy, upstream, body, param, words):
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    r = await roomy.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert not route.called
    await assert_unharmed(roomy, upstream)


async def test_max_tokens_is_filled_in_when_the_request_names_none(make_gw, upstream):
    gw = await make_gw(serve={"limits": {"default_max_tokens": 64}})
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    await gw.client.post("/v1/chat/completions", json=chat(ignore_eos=True))
    assert json.loads(route.calls.last.request.content)["max_tokens"] == 64  # ignore_eos runs to 64 tokens at most
    await gw.client.post("/v1/chat/completions", json=chat(max_completion_tokens=10))
    sent = json.loads(route.calls.last.request.content)
    assert sent["max_completion_tokens"] == 10 and "max_tokens" not in sent


@pytest.mark.parametrize(("content", "status", "param"), [
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    (json.dumps(chat(tools=[{"a": {"b": {"c": {"d": {}}}}}])).encode(), 400, "tools.0.a.b.c.d"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "top_k": Infinity}', 400, None),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', 400, "stop.0"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": "a\\udfffb"}', 400, "user"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "a\\u0000b"}]}', 422, "messages.0.content"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', 400, None),
])
async def test_bodies_that_are_not_strict_json_are_refused(make_gw, upstream, content, status, param):
    gw = await make_gw(serve={"max_request_bytes": 1_000_000, "limits": {"max_json_depth": 6}})
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    r = await gw.client.post("/v1/chat/completions", content=content, headers=JSON)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and not route.called
    await assert_unharmed(gw, upstream)


@pytest.mark.parametrize(("comment", "status"), [("a\x00b", 422), ("\ud800", 400)])
async def test_a_feedback_comment_that_no_store_can_hold_is_refused(gw, upstream, comment, status):
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    completion = (await gw.client.post("/v1/chat/completions", json=chat())).json()["id"]
    body = json.dumps({"completion_id": completion, "rating": "up", "comment": comment}).encode()
    r = await gw.client.post("/v1/feedback", content=body, headers=JSON)
    assert r.status_code == status and r.json()["error"]["param"] == "comment"
    with Session(gw.db) as s:
        assert s.exec(select(func.count()).select_from(Feedback)).one() == 0
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion, "rating": "up"})
    assert r.status_code == 201


@pytest.mark.postgres
async def test_a_nul_in_a_feedback_comment_on_postgres_writes_nothing(make_gw, upstream, pg_fresh_url):
    gw = await make_gw(store={"url": pg_fresh_url})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    completion = (await gw.client.post("/v1/chat/completions", json=chat())).json()["id"]
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion, "rating": "down", "comment": "a\x00b"})
    assert r.status_code == 422, r.text
    with Session(gw.db) as s:
        assert s.exec(select(func.count()).select_from(Feedback)).one() == 0
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion, "rating": "down", "comment": "ok"})
    assert r.status_code == 201, r.text


async def test_feedback_history_of_a_completion_is_bounded(make_gw, upstream):
    gw = await make_gw(serve={"limits": {"max_feedback_per_completion": 3}})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    completion = (await gw.client.post("/v1/chat/completions", json=chat())).json()["id"]
    rating = {"completion_id": completion, "rating": "up"}
    assert [(await gw.client.post("/v1/feedback", json=rating)).status_code for _ in range(3)] == [201] * 3
    r = await gw.client.post("/v1/feedback", json=rating)
    assert r.status_code == 409 and "max_feedback_per_completion" in r.json()["error"]["message"]
    with Session(gw.db) as s:
        assert s.exec(select(func.count()).select_from(Feedback)).one() == 3


async def test_per_key_rate_is_a_token_bucket_with_retry_after_and_admin_keys_are_exempt(make_gw, upstream):
    gw = await make_gw(serve={"api_keys": [hash_key("alice"), hash_key("bob")], "admin_keys": [hash_key("root")],
                              "limits": {"requests_per_minute": 6, "burst": 2}})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    alice, bob, root = ({"authorization": f"Bearer {k}"} for k in ("alice", "bob", "root"))
    codes = [(await gw.client.post("/v1/chat/completions", json=chat(), headers=alice)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = await gw.client.get("/v1/models", headers=alice)  # one bucket for every /v1/ route of the key
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 10
    assert (await gw.client.post("/v1/chat/completions", json=chat(), headers=bob)).status_code == 200
    assert all([(await gw.client.post("/v1/chat/completions", json=chat(), headers=root)).status_code == 200
                for _ in range(5)])
    assert len(turns(gw.writer)) == 2 + 1 + 5  # refusals wrote nothing


async def test_requests_in_flight_are_capped_per_key_and_for_the_gateway(make_gw, upstream):
    gw = await make_gw(serve={"api_keys": [hash_key("alice"), hash_key("bob")],
                              "limits": {"max_in_flight": 3, "max_in_flight_per_key": 2}})
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return httpx.Response(200, json=vllm_answer())

    upstream.post("/v1/chat/completions").mock(side_effect=slow)
    alice, bob = ({"authorization": f"Bearer {k}"} for k in ("alice", "bob"))
    held = [asyncio.create_task(gw.client.post("/v1/chat/completions", json=chat(), headers=h))
            for h in (alice, alice, bob)]
    while gw.router.table.in_flight("base") < 3:
        await asyncio.sleep(0.01)
    r = await gw.client.post("/v1/chat/completions", json=chat(), headers=bob)  # bob holds 1 of 2, the gateway 3 of 3
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy" and r.headers["retry-after"] == "1"
    release.set()
    assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200, 200]
    release.clear()
    held = [asyncio.create_task(gw.client.post("/v1/chat/completions", json=chat(), headers=alice)) for _ in range(2)]
    while gw.router.table.in_flight("base") < 2:
        await asyncio.sleep(0.01)
    r = await gw.client.post("/v1/chat/completions", json=chat(), headers=alice)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests_in_flight"
    assert "retry-after" in r.headers
    release.set()
    await asyncio.gather(*held)
    assert len(turns(gw.writer)) == 5


async def test_a_non_streamed_generation_stops_when_its_client_leaves(make_gw, upstream):
    gw = await make_gw(serve={"limits": {"max_in_flight": 1}})
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def generating(request):
        started.set()
        try:
            await asyncio.sleep(3600)  # the engine is still generating when the client leaves
        except asyncio.CancelledError:
            cancelled.set()  # the gateway dropped the engine request: vLLM aborts a request whose client closed
            raise

    upstream.post("/v1/chat/completions").mock(side_effect=generating)
    await call_and_leave(gw.app, chat(), leave_after=None, leave_on=started)  # leaves while the engine generates
    assert cancelled.is_set()
    assert gw.router.table.in_flight("base") == 0
    metrics = (await gw.client.get("/metrics")).text
    assert 'tunewheel_requests_total{alias="chat",status="499",version="base"}' in metrics
    await assert_unharmed(gw, upstream)  # its in-flight place (1 of 1) was given back

"""Requests the gateway refuses, with vLLM faked by respx: bad bodies, unknown names, limits,
an engine that is not ready, unreachable or answering an error. None of them logs a turn.

    pytest tests/serve/gateway/test_chat_refusals.py
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.gateway.fakes import MESSAGES, turns, vllm_answer


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "chat", "messages": []}).encode(), 422, "messages"),
    (json.dumps({"model": "chat"}).encode(), 422, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 422, "messages.0"),
    (json.dumps({"messages": [{"role": "system", "content": [{"type": "text", "text": "x"}]}]}).encode(), 422, "messages.0"),
    (json.dumps({"messages": [{"role": "user", "content": 42}]}).encode(), 422, "messages.0"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), 422, "messages.0"),
    (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), 422, "temperature"),
])
async def test_bad_requests_are_refused_naming_the_field_and_log_nothing(gw, upstream, body, status, field):
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    r = await gw.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if field:
        assert field in err["message"] and err["param"].startswith(field)
    assert not route.called and turns(gw.writer) == []


async def test_user_content_as_text_parts_is_accepted(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello"}]}]
    r = await gw.client.post("/v1/chat/completions", json={"messages": parts})
    assert r.status_code == 200, r.text


async def test_unknown_model_is_404_listing_valid_names(gw, upstream):
    r = await gw.client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES})
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "gpt-9" in message and "chat" in message and "base" in message
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat@chat-v0009", "messages": MESSAGES})
    assert r.status_code == 404 and turns(gw.writer) == []


async def test_too_large_body_is_413_with_or_without_content_length(gw, upstream):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    r = await gw.client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]

    async def chunked():
        yield json.dumps(big).encode()

    r = await gw.client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert turns(gw.writer) == []


async def test_engine_not_ready_is_503_with_retry_after(gw, upstream):
    gw.engine.ready = False
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    r = await gw.client.get("/ready")
    assert r.status_code == 503 and "retry-after" in r.headers
    gw.engine.ready = True
    assert (await gw.client.get("/ready")).status_code == 200
    assert turns(gw.writer) == []


async def test_engine_unreachable_is_503(gw, upstream):
    upstream.post("/v1/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 503 and "retry-after" in r.headers
    assert turns(gw.writer) == [] and gw.router.table.in_flight("base") == 0


async def test_a_connection_the_engine_closed_before_answering_is_tried_once_more(gw, upstream):
    """A keep-alive connection the engine had just closed (its idle timeout) breaks before any response:
    the request goes out again instead of failing."""
    tries = []

    def answer(request):
        tries.append(request)
        if len(tries) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json=vllm_answer("Hi."))

    upstream.post("/v1/chat/completions").mock(side_effect=answer)
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 200 and len(tries) == 2
    upstream.post("/v1/chat/completions").mock(side_effect=httpx.ReadError("reset"))  # ... but only once
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 503 and "retry-after" in r.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_error_comes_back_openai_style_with_its_status(gw, upstream, stream):
    vllm_error = {"error": {"message": "This model's maximum context length is 2048 tokens.", "type": "BadRequestError",
                            "param": None, "code": 400}}
    upstream.post("/v1/chat/completions").respond(400, json=vllm_error)
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": stream})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == vllm_error["error"]["message"]
    assert r.json()["error"]["type"] == "BadRequestError"
    assert turns(gw.writer) == []

"""Gateway unit tests: the real app, a real SQLite turn log, and vLLM faked with respx.

    pytest tests/serve/test_gateway.py

No engine, no weights: the upstream `http://engine.test` answers what vLLM 0.x answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
import respx
from sqlmodel import Session, select

from feedback.models import Feedback, Turn
from serve.aliases import AliasTable
from serve.app import create_app, make_writer
from serve.auth import check_bind
from serve.settings import hash_key, load_settings
from tests.fixtures.engine import free_port

ENGINE = "http://engine.test"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


def vllm_answer(content: str = "Hello there!", model: str = "base") -> dict:
    return {
        "id": "chatcmpl-vllm-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


def sse_chunks(pieces: list[str], model: str = "base") -> list[bytes]:
    """vLLM's stream with include_usage: role chunk, content chunks, finish chunk, usage chunk, [DONE]."""
    def chunk(choices, usage=None):
        body = {"id": "chatcmpl-vllm-2", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": choices}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    out += [chunk([{"index": 0, "delta": {"content": p}, "finish_reason": None}]) for p in pieces]
    out.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    out.append(chunk([], {"prompt_tokens": 11, "completion_tokens": len(pieces), "total_tokens": 11 + len(pieces)}))
    out.append(b"data: [DONE]\n\n")
    return out


def events(text: str) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture
def upstream():
    with respx.mock(base_url=ENGINE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def make_gw(tmp_path):
    """make_gw(**settings overrides) -> running app (lifespan entered) with an httpx client on it."""
    stack = []

    async def make(**overrides):
        settings = load_settings(None, data_dir=tmp_path / f"gw{len(stack)}", engine={"url": ENGINE},
                                 serve={"max_request_bytes": 4096, **overrides.pop("serve", {})}, **overrides)
        engine = SimpleNamespace(url=ENGINE, ready=True)
        writer = make_writer(settings)
        app = create_app(settings, engine=engine, writer=writer)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        stack.append((lifespan, client))
        return SimpleNamespace(app=app, client=client, engine=engine, writer=writer, db=writer.engine, settings=settings)

    yield make
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def gw(make_gw):
    return await make_gw()


def turns(gw) -> list[Turn]:
    gw.writer.flush(10)
    with Session(gw.db) as s:
        return list(s.exec(select(Turn).order_by(Turn.created_at)))


# --- answers --------------------------------------------------------------------------------


async def test_plain_answer_has_logged_id_alias_and_adapter(gw, upstream):
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "temperature": 0,
                                                           "ignore_eos": True, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["id"] != "chatcmpl-vllm-1"
    assert body["model"] == "chat"
    assert r.headers["x-tunewheel-adapter"] == "base"
    sent = json.loads(route.calls.last.request.content)
    assert sent["model"] == "base" and sent["ignore_eos"] is True and sent["temperature"] == 0
    [turn] = turns(gw)
    assert turn.id == body["id"] and turn.answer == "Hello there!" and turn.status == "ok"
    assert turn.alias == "chat" and turn.adapter_version == "base" and not turn.stream
    assert turn.request_messages == MESSAGES
    assert turn.params == {"temperature": 0, "ignore_eos": True, "max_tokens": 5}
    assert (turn.prompt_tokens, turn.completion_tokens, turn.finish_reason) == (11, 3, "stop")
    assert turn.latency_ms > 0


async def test_stream_is_relayed_with_our_id_and_logged_when_it_ends(gw, upstream):
    route = upstream.post("/v1/chat/completions").respond(200, content=b"".join(sse_chunks(["Hel", "lo", "!"])),
                                                          headers={"content-type": "text/event-stream"})
    r = await gw.client.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES, "stream": True},
                             headers={"x-conversation-id": "conv-42"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids != {"chatcmpl-vllm-2"}
    assert {c["model"] for c in chunks} == {"base"}
    assert all(c["choices"] for c in chunks), "the usage chunk must not reach a client that did not ask for it"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello!"
    assert json.loads(route.calls.last.request.content)["stream_options"] == {"include_usage": True}
    [turn] = turns(gw)
    assert turn.id == ids.pop() and turn.answer == "Hello!" and turn.status == "ok" and turn.stream
    assert turn.conversation_id == "conv-42"
    assert (turn.prompt_tokens, turn.completion_tokens, turn.finish_reason) == (11, 3, "stop")
    assert turn.ttft_ms is not None and turn.ttft_ms <= turn.latency_ms


async def test_stream_usage_chunk_reaches_a_client_that_asked(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, content=b"".join(sse_chunks(["Hi"])))
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    usage = [c for c in events(r.text)[:-1] if not c["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == 1 and usage[0]["model"] == "chat"


async def call_and_leave(app, body: dict, leave_after: bytes | None) -> None:
    """Drive the ASGI app as a client that disconnects once it has seen `leave_after` (None: at once)."""
    sent: list[dict] = []
    left = asyncio.Event()
    if leave_after is None:
        left.set()
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if leave_after is not None and leave_after in message.get("body", b""):
            left.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"host", b"gw"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("gw", 80), "state": {}}
    await asyncio.wait_for(app(scope, receive, send), 10)


@pytest.mark.parametrize(("leave_after", "partial"), [(b"upon", "Once upon"), (None, None)])
async def test_client_leaving_mid_stream_leaves_an_incomplete_turn(gw, upstream, leave_after, partial):
    head = sse_chunks(["Once", " upon"])[:3]
    closed = asyncio.Event()

    async def endless():
        try:
            for c in head:
                yield c
            await asyncio.sleep(3600)  # the engine is still generating when the client leaves
        finally:
            closed.set()

    upstream.post("/v1/chat/completions").respond(200, content=endless())
    await call_and_leave(gw.app, {"model": "chat", "messages": MESSAGES, "stream": True}, leave_after)
    [turn] = turns(gw)
    assert turn.status == "incomplete" and turn.finish_reason is None
    if partial is not None:
        assert turn.answer == partial
        assert closed.is_set(), "the upstream stream must be closed so that vLLM stops generating"
    assert gw.app.state.aliases.in_flight("base") == 0


# --- bad input ------------------------------------------------------------------------------


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
    assert not route.called and turns(gw) == []


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
    assert r.status_code == 404 and turns(gw) == []


async def test_too_large_body_is_413_with_or_without_content_length(gw, upstream):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    r = await gw.client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]

    async def chunked():
        yield json.dumps(big).encode()

    r = await gw.client.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413
    assert turns(gw) == []


async def test_engine_not_ready_is_503_with_retry_after(gw, upstream):
    gw.engine.ready = False
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    r = await gw.client.get("/ready")
    assert r.status_code == 503 and "retry-after" in r.headers
    gw.engine.ready = True
    assert (await gw.client.get("/ready")).status_code == 200
    assert turns(gw) == []


async def test_engine_unreachable_is_503(gw, upstream):
    upstream.post("/v1/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 503 and "retry-after" in r.headers
    assert turns(gw) == [] and gw.app.state.aliases.in_flight("base") == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_error_comes_back_openai_style_with_its_status(gw, upstream, stream):
    vllm_error = {"error": {"message": "This model's maximum context length is 2048 tokens.", "type": "BadRequestError",
                            "param": None, "code": 400}}
    upstream.post("/v1/chat/completions").respond(400, json=vllm_error)
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": stream})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == vllm_error["error"]["message"]
    assert r.json()["error"]["type"] == "BadRequestError"
    assert turns(gw) == []


# --- aliases, models, health, metrics --------------------------------------------------------


async def test_alias_follows_the_table_and_pinned_versions_resolve(gw, upstream):
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    gw.app.state.aliases.set("chat", "chat-v0002")
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES})
    assert r.headers["x-tunewheel-adapter"] == "chat-v0002"
    assert json.loads(route.calls.last.request.content)["model"] == "chat-v0002"
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat@chat-v0002", "messages": MESSAGES})
    assert r.status_code == 200 and r.json()["model"] == "chat@chat-v0002"
    names = {m["id"] for m in (await gw.client.get("/v1/models")).json()["data"]}
    assert names == {"chat", "base", "chat@chat-v0002"}
    assert [t.adapter_version for t in turns(gw)] == ["chat-v0002", "chat-v0002"]


async def test_alias_table_counts_in_flight_and_drains():
    table = AliasTable(["chat"], base="base")
    assert table.resolve("chat") == "base"
    lease = table.acquire("chat")
    table.set("chat", "chat-v0001")
    assert table.resolve("chat") == "chat-v0001" and lease.version == "base"
    assert await table.drain("base", timeout=0.05) is False
    lease.release()
    lease.release()  # twice is harmless
    assert await table.drain("base", timeout=1) is True and table.in_flight("base") == 0


async def test_health_and_metrics(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert (await gw.client.get("/health")).json() == {"status": "ok"}
    text = (await gw.client.get("/metrics")).text
    assert 'tunewheel_requests_total{alias="chat",status="ok",version="base"}' in text
    assert "tunewheel_request_latency_seconds_bucket" in text
    assert 'tunewheel_active_version_info{alias="chat",version="base"} 1.0' in text


# --- feedback -------------------------------------------------------------------------------


async def test_feedback_right_after_a_streamed_answer(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, content=b"".join(sse_chunks(["Hi"])))
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    completion_id = events(r.text)[0]["id"]
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion_id, "rating": "up", "comment": "nice"})
    assert r.status_code == 201, r.text
    assert r.json()["completion_id"] == completion_id and r.json()["rating"] == "up" and r.json()["comment"] == "nice"
    assert r.json()["id"] and r.json()["created_at"]
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion_id, "rating": "down"})
    assert r.status_code == 201
    with Session(gw.db) as s:
        assert s.get(Turn, completion_id).rating == "down"
        assert [f.rating for f in s.exec(select(Feedback).order_by(Feedback.id))] == ["up", "down"]
    assert 'tunewheel_feedback_total{rating="down",version="base"}' in (await gw.client.get("/metrics")).text


@pytest.mark.parametrize(("body", "status"), [
    ({"completion_id": "chatcmpl-nope", "rating": "up"}, 404),
    ({"completion_id": "chatcmpl-nope", "rating": "meh"}, 422),
    ({"rating": "up"}, 422),
])
async def test_feedback_bad_input(gw, body, status):
    r = await gw.client.post("/v1/feedback", json=body)
    assert r.status_code == status, r.text


# --- auth -----------------------------------------------------------------------------------


async def test_keys_guard_chat_and_feedback(make_gw, upstream):
    gw = await make_gw(serve={"api_keys": [hash_key("alice"), hash_key("bob")], "admin_keys": [hash_key("root")]})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    assert (await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})).status_code == 401
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"authorization": "Bearer eve"})
    assert r.status_code == 401
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"authorization": "Bearer alice"})
    assert r.status_code == 200
    rating = {"completion_id": r.json()["id"], "rating": "up"}
    assert (await gw.client.post("/v1/feedback", json=rating, headers={"authorization": "Bearer bob"})).status_code == 403
    assert (await gw.client.post("/v1/feedback", json=rating, headers={"authorization": "Bearer alice"})).status_code == 201
    assert (await gw.client.post("/v1/feedback", json=rating, headers={"authorization": "Bearer root"})).status_code == 201
    assert (await gw.client.get("/admin/adapters", headers={"authorization": "Bearer alice"})).status_code == 403
    assert turns(gw)[0].key_hash == hash_key("alice")


async def test_admin_routes_need_an_admin_key_even_without_api_keys(gw):
    assert (await gw.client.get("/admin/adapters")).status_code == 401


def test_open_gateway_refuses_public_bind(tmp_path):
    with pytest.raises(ValueError, match="refusing to bind"):
        check_bind(load_settings(None, data_dir=tmp_path, serve={"host": "0.0.0.0"}))
    check_bind(load_settings(None, data_dir=tmp_path, serve={"host": "127.0.0.1"}))
    check_bind(load_settings(None, data_dir=tmp_path, serve={"host": "0.0.0.0", "api_keys": [hash_key("k")]}))


def test_serve_command_answers_then_stops_cleanly_on_sigterm(fake_engine_url, tmp_path):
    port = free_port()
    env = {**os.environ, "TUNEWHEEL_ENGINE__URL": fake_engine_url, "TUNEWHEEL_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "A canned answer."
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    from feedback.db import make_db

    with Session(make_db(f"sqlite:///{tmp_path / 'tunewheel.db'}")) as s:
        assert s.get(Turn, r.json()["id"]).answer == "A canned answer."

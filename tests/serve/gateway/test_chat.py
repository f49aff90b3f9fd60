"""Chat answers through the real gateway app, vLLM faked with respx: ids, names, streams, the turn log.

    pytest tests/serve/gateway/test_chat.py

No engine, no weights: the upstream `http://engine.test` answers what vLLM 0.x answers.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.serve.gateway.fakes import MESSAGES, call_and_leave, events, sse_chunks, turns, vllm_answer


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
    [turn] = turns(gw.writer)
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
    [turn] = turns(gw.writer)
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
    [turn] = turns(gw.writer)
    assert turn.status == "incomplete" and turn.finish_reason is None
    if partial is not None:
        assert turn.answer == partial
        assert closed.is_set(), "the upstream stream must be closed so that vLLM stops generating"
    assert gw.router.table.in_flight("base") == 0



# --- names ---------------------------------------------------------------------------------


async def test_alias_follows_the_table_and_pinned_versions_resolve(gw, upstream):
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    gw.router.table.set("chat", "chat-v0002")
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES})
    assert r.headers["x-tunewheel-adapter"] == "chat-v0002"
    assert json.loads(route.calls.last.request.content)["model"] == "chat-v0002"
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat@chat-v0002", "messages": MESSAGES})
    assert r.status_code == 200 and r.json()["model"] == "chat@chat-v0002"
    names = {m["id"] for m in (await gw.client.get("/v1/models")).json()["data"]}
    assert names == {"chat", "base", "chat@chat-v0002"}
    assert [t.adapter_version for t in turns(gw.writer)] == ["chat-v0002", "chat-v0002"]

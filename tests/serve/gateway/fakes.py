"""What vLLM answers, for gateway tests that fake it with respx at `ENGINE`.

    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer("Hi"))
    upstream.post("/v1/chat/completions").respond(200, content=b"".join(sse_chunks(["Hel", "lo"])))
    events(response.text)          # the SSE events a client got, "[DONE]" last
    await call_and_leave(app, body, leave_after=None)   # a client that disconnects (None: at once)
"""

from __future__ import annotations

import asyncio
import json

from sqlmodel import Session, select

from feedback.models import Turn

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


def turns(writer) -> list[Turn]:
    """Every turn logged so far, oldest first (after the writer has written what it holds)."""
    writer.flush(10)
    with Session(writer.engine) as s:
        return list(s.exec(select(Turn).order_by(Turn.created_at)))


async def call_and_leave(app, body: dict, leave_after: bytes | None, *, leave_on: asyncio.Event | None = None) -> None:
    """Drive the ASGI app as a client that disconnects once it has seen `leave_after` (None: at once),
    or once `leave_on` is set."""
    sent: list[dict] = []
    left = leave_on or asyncio.Event()
    if leave_after is None and leave_on is None:
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
             "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("gw", 80), "state": {}}
    await asyncio.wait_for(app(scope, receive, send), 10)

"""What vLLM answers, for gateway tests that fake it with respx at `ENGINE`.

    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer("Hi"))
    upstream.post("/v1/chat/completions").respond(200, content=b"".join(sse_chunks(["Hel", "lo"])))
    events(response.text)          # the SSE events a client got, "[DONE]" last
"""

from __future__ import annotations

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

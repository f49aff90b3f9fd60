"""The gateway's restyle step with vLLM faked (respx): styled answers, unknown styles, restyler failures.

    pytest tests/serve/gateway/test_restyle.py
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.gateway.fakes import MESSAGES, events, sse_chunks, turns, vllm_answer

RAW = "The ship left port at dawn."
STYLED = "Ahoy, matey! The ship left port at dawn. Arr!"


@pytest.fixture
async def styled(make_gw, upstream, tmp_path):
    """A gateway whose registry has a promoted `pirate` restyler; make(fallback=..., restyler_status=...)."""

    async def make(fallback: str = "error", restyler_status: int = 200, restyler_body: bytes | None = None):
        gw = await make_gw(registry=True, restyle={"fallback": fallback})
        folder = tmp_path / f"adapter-{id(gw)}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        gw.version = gw.registry.new_version_name("restyler", "pirate")
        gw.registry.register(gw.version, kind="restyler", style="pirate", path=folder)
        gw.registry.promote(gw.version)
        loaded = {"data": [{"id": "base", "root": "/m"}]}

        def load(request):
            loaded["data"].append({"id": gw.version, "root": str(folder.resolve())})
            return httpx.Response(200, text="ok")

        def chat(request):
            body = json.loads(request.content)
            if body["model"] == "base":
                return httpx.Response(200, json=vllm_answer(RAW))
            assert body["messages"][0]["content"] == gw.settings.restyle.system_prompt
            assert body["messages"][1]["content"] == RAW
            if restyler_status != 200:
                return httpx.Response(restyler_status, json={"error": {"message": "boom"}})
            if restyler_body is not None:
                return httpx.Response(200, content=restyler_body,
                                      headers={"content-type": "text/event-stream" if body.get("stream") else "text/plain"})
            if body.get("stream"):
                pieces = ["Ahoy, matey! ", "The ship left port at dawn.", " Arr!"]
                return httpx.Response(200, content=b"".join(sse_chunks(pieces, model=gw.version)),
                                      headers={"content-type": "text/event-stream"})
            return httpx.Response(200, json=vllm_answer(STYLED, model=gw.version))

        upstream.get("/v1/models").mock(side_effect=lambda r: httpx.Response(200, json=loaded))
        upstream.post("/v1/load_lora_adapter").mock(side_effect=load)
        upstream.post("/v1/chat/completions").mock(side_effect=chat)
        upstream.post("/v1/completions").respond(200, json={"choices": [{"index": 0, "text": "A"}]})  # warm-up
        return gw

    return make


def logged(gw):
    [turn] = turns(gw.writer)
    return turn


async def test_plain_styled_answer_logs_raw_and_styled(styled):
    gw = await styled()
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == STYLED
    assert r.headers["x-tunewheel-restyler"] == gw.version
    turn = logged(gw)
    assert (turn.answer, turn.raw_answer, turn.style, turn.status) == (STYLED, RAW, "pirate", "ok")
    assert turn.id == r.json()["id"]


async def test_streamed_styled_answer_streams_the_restyled_text(styled):
    gw = await styled()
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate",
                                                           "stream": True})
    assert r.status_code == 200
    chunks = [e for e in events(r.text) if e != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == STYLED
    assert {c["id"] for c in chunks} == {logged(gw).id}
    assert logged(gw).raw_answer == RAW and logged(gw).answer == STYLED


async def test_unknown_style_is_404_naming_the_styles(styled):
    gw = await styled()
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "sonnet"})
    assert r.status_code == 404
    assert "sonnet" in r.json()["error"]["message"] and "pirate" in r.json()["error"]["message"]


async def test_restyler_failure_is_an_error_not_a_raw_answer(styled):
    gw = await styled(restyler_status=500)
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate"})
    assert r.status_code == 502
    assert "restyle" in r.json()["error"]["message"]
    turn = logged(gw)  # nothing lost: the raw answer is in the log, marked as an error
    assert turn.status == "error" and turn.raw_answer == RAW and turn.answer is None


async def test_restyler_failure_with_raw_fallback_says_so(styled):
    gw = await styled(fallback="raw", restyler_status=500)
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate"})
    assert r.status_code == 200
    assert r.headers["x-tunewheel-restyle"] == "failed"
    assert r.json()["choices"][0]["message"]["content"] == RAW


@pytest.mark.parametrize("body", [b"<html>proxy error</html>", b'{"object": "chat.completion", "choices": []}',
                                  b'{"choices": [{"index": 0}]}', b'"just a string"'],
                         ids=["not-json", "no-choices", "no-message", "not-an-object"])
async def test_unreadable_restyler_answer_is_a_502_that_keeps_the_turn_and_frees_the_lease(styled, body):
    gw = await styled(restyler_body=body)
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate"})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "restyle_failed"
    turn = logged(gw)  # the turn is not lost ...
    assert turn.status == "error" and turn.raw_answer == RAW and turn.style == "pirate"
    assert gw.router.table.in_flight("base") == 0  # ... and no lease is left for a swap's drain to wait on


async def test_unreadable_restyler_stream_is_a_502_that_keeps_the_turn_and_frees_the_lease(styled):
    gw = await styled(restyler_body=b"data: {not json\n\ndata: [DONE]\n\n")
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate",
                                                           "stream": True})
    assert r.status_code == 502, r.text
    assert logged(gw).status == "error" and gw.router.table.in_flight("base") == 0


async def test_restyler_is_asked_with_a_token_cap_and_a_frequency_penalty(styled, upstream):
    gw = await styled()
    await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate"})
    [asked] = [json.loads(c.request.content) for c in upstream.calls
               if c.request.url.path == "/v1/chat/completions" and b"restyler-pirate" in c.request.content]
    # the raw answer had 3 completion tokens (vllm_answer's usage): 1.5 x 3 + 48, not a fixed 64+
    assert asked["max_tokens"] == 53 and asked["frequency_penalty"] == gw.settings.restyle.frequency_penalty
    assert asked["temperature"] == 0


async def test_restyle_latency_is_a_histogram_in_metrics(styled):
    gw = await styled()
    await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "style": "pirate"})
    text = (await gw.client.get("/metrics")).text
    assert 'tunewheel_restyle_latency_seconds_count{status="ok",style="pirate"}' in text

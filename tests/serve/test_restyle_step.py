"""The gateway's restyle step with vLLM faked (respx): styled answers, unknown styles, restyler failures."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from sqlmodel import Session, select

from feedback.models import Turn
from learn.registry import Registry
from serve.app import create_app, make_writer
from serve.settings import load_settings
from tests.serve.test_gateway import ENGINE, MESSAGES, events, sse_chunks, upstream, vllm_answer  # noqa: F401

RAW = "The ship left port at dawn."
STYLED = "Ahoy, matey! The ship left port at dawn. Arr!"


@pytest.fixture
async def styled(tmp_path, upstream):  # noqa: F811
    """A gateway whose registry has a promoted `pirate` restyler; make(fallback=...)."""
    made = []

    async def make(fallback: str = "error", restyler_status: int = 200):
        settings = load_settings(None, data_dir=tmp_path / f"gw{len(made)}", engine={"url": ENGINE},
                                 restyle={"fallback": fallback})
        writer = make_writer(settings)
        registry = Registry(writer.engine)
        folder = tmp_path / f"adapter{len(made)}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        name = registry.new_version_name("restyler", "pirate")
        registry.register(name, kind="restyler", style="pirate", path=folder)
        registry.promote(name)
        loaded = {"data": [{"id": "base", "root": "/m"}]}

        def load(request):
            loaded["data"].append({"id": name, "root": str(folder.resolve())})
            return httpx.Response(200, text="ok")

        def chat(request):
            body = json.loads(request.content)
            if body["model"] == "base":
                return httpx.Response(200, json=vllm_answer(RAW))
            assert body["messages"][0]["content"] == settings.restyle.system_prompt
            assert body["messages"][1]["content"] == RAW
            if restyler_status != 200:
                return httpx.Response(restyler_status, json={"error": {"message": "boom"}})
            if body.get("stream"):
                return httpx.Response(200, content=b"".join(sse_chunks(["Ahoy, matey! ", "The ship left port at dawn.", " Arr!"], model=name)),
                                      headers={"content-type": "text/event-stream"})
            return httpx.Response(200, json=vllm_answer(STYLED, model=name))

        upstream.get("/v1/models").mock(side_effect=lambda r: httpx.Response(200, json=loaded))
        upstream.post("/v1/load_lora_adapter").mock(side_effect=load)
        upstream.post("/v1/chat/completions").mock(side_effect=chat)
        upstream.post("/v1/completions").respond(200, json={"choices": [{"index": 0, "text": "A"}]})  # warm-up
        app = create_app(settings, engine=SimpleNamespace(url=ENGINE, ready=True), writer=writer, registry=registry)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        made.append((lifespan, client))
        return SimpleNamespace(client=client, writer=writer, version=name)

    yield make
    for lifespan, client in reversed(made):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


def logged(gw) -> Turn:
    gw.writer.flush(10)
    with Session(gw.writer.engine) as s:
        return s.exec(select(Turn)).one()


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

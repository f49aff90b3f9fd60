"""Serving after faults, through the real gateway app with vLLM faked by respx (seconds, no engine).

    pytest tests/serve/gateway/test_serving_faults.py

What a client or an operator sees: while an alias's adapter is not in the engine (gateway
start, engine restart) `chat` answers a retryable 503 with Retry-After and /ready says so,
never the engine's 404; an engine that lost an adapter makes the gateway reload it; an admin
promotion of an adapter the engine refuses, or of one whose rank it cannot hold, is a 409 that
leaves production as it was and shows up in /metrics. The real-engine version of the promotion
test is tests/serve/test_promotion_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from serve.gateway.app import start_worker_threads
from serve.settings import hash_key
from tests.serve.gateway.fakes import MESSAGES, vllm_answer

ADMIN = {"authorization": "Bearer admin-key"}


class Engine:
    """The adapter routes of a fake vLLM: what is loaded, and which loads it refuses."""

    def __init__(self, upstream):
        self.models = [{"id": "base", "root": "/m"}]
        self.refuse: set[str] = set()
        self.down = False
        upstream.get("/v1/models").mock(side_effect=self.list)
        upstream.post("/v1/load_lora_adapter").mock(side_effect=self.load)
        upstream.post("/v1/unload_lora_adapter").respond(200, text="ok")
        upstream.post("/v1/completions").respond(200, json={"choices": [{"index": 0, "text": "A"}]})

    def list(self, request):
        if self.down:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json={"data": self.models})

    def load(self, request):
        body = json.loads(request.content)
        if body["lora_name"] in self.refuse:
            return httpx.Response(400, json={"error": {"message": "size mismatch for lora_A: the weights do not fit"}})
        self.models.append({"id": body["lora_name"], "root": body["lora_path"]})
        return httpx.Response(200, text="ok")


def register(gw, tmp_path, rank: int = 8) -> str:
    name = gw.registry.new_version_name("chat")
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
    gw.registry.register(name, kind="chat", path=tmp_path / name)
    return name


@pytest.fixture
async def setup(make_gw, upstream, tmp_path):
    engine = Engine(upstream)
    gw = await make_gw(registry=True, serve={"admin_keys": [hash_key("admin-key")]})
    return gw, engine


async def test_while_the_adapter_is_not_loaded_chat_is_a_retryable_503_and_not_ready(make_gw, upstream, tmp_path):
    engine = Engine(upstream)
    engine.down = True  # the adapter calls fail: the gateway cannot load prod yet
    first = await make_gw(registry=True)
    v1 = register(first, tmp_path)
    first.registry.promote(v1)
    gw = await make_gw(registry=True, serve={"admin_keys": [hash_key("admin-key")]},
                       store={"url": first.settings.store_url})  # a gateway starting on that registry
    upstream.post("/v1/chat/completions").respond(404, json={"error": {"message": f"The model `{v1}` does not exist."}})

    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES}, headers=ADMIN)
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    assert "not being served yet" in r.json()["error"]["message"]
    ready = await gw.client.get("/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"] and f"chat ({v1})" in ready.text

    engine.down = False
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer(model=v1))
    assert (await gw.client.post("/admin/reload", headers=ADMIN)).json()["aliases"] == {"chat": v1}
    assert (await gw.client.get("/ready")).json()["aliases"] == {"chat": v1}
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES}, headers=ADMIN)
    assert r.status_code == 200 and r.headers["x-tunewheel-adapter"] == v1


async def test_an_adapter_the_engine_lost_is_a_503_and_is_reloaded(setup, upstream, tmp_path):
    gw, engine = setup
    v1 = register(gw, tmp_path)
    gw.registry.promote(v1)
    await gw.client.post("/admin/reload", headers=ADMIN)
    engine.models = [m for m in engine.models if m["id"] != v1]  # e.g. unloaded by hand, or an engine we did not restart
    upstream.post("/v1/chat/completions").respond(404, json={"error": {"message": f"The model `{v1}` does not exist."}})
    r = await gw.client.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES}, headers=ADMIN)
    assert r.status_code == 503 and r.headers["retry-after"] and "being reloaded" in r.text
    assert gw.router.table.unserved() == {"chat": v1}
    await gw.client.post("/admin/reload", headers=ADMIN)
    assert any(m["id"] == v1 for m in engine.models) and gw.router.table.unserved() == {}


async def test_an_admin_promotion_the_engine_refuses_leaves_production_and_shows_in_metrics(setup, tmp_path):
    gw, engine = setup
    good, bad = register(gw, tmp_path), register(gw, tmp_path)
    engine.refuse.add(bad)  # before any pass: it is not loaded ahead of its promotion either
    assert (await gw.client.post(f"/admin/adapters/{good}/promote", headers=ADMIN)).status_code == 200
    r = await gw.client.post(f"/admin/adapters/{bad}/promote", headers=ADMIN)
    assert r.status_code == 409 and "size mismatch" in r.text and f"production stays on {good}" in r.text
    assert gw.registry.prod().name == good and gw.router.table.resolve("chat") == good
    assert 'tunewheel_promotion_fallbacks_total{kind="chat"} 1.0' in (await gw.client.get("/metrics")).text


async def test_an_admin_promotion_beyond_the_engine_rank_is_refused_up_front(setup, upstream, tmp_path):
    gw, engine = setup
    big = register(gw, tmp_path, rank=64)  # the test settings train rank 16: the engine holds rank 16
    r = await gw.client.post(f"/admin/adapters/{big}/promote", headers=ADMIN)
    assert r.status_code == 409 and "LoRA rank 64 but the engine holds at most rank 16" in r.text
    assert not any(c.request.url.path == "/v1/load_lora_adapter" for c in upstream.calls)
    assert gw.registry.prod() is None


async def test_an_admin_promotion_against_a_stale_expectation_is_refused(setup, tmp_path):
    gw, engine = setup
    v1, v2 = register(gw, tmp_path), register(gw, tmp_path)
    r = await gw.client.post(f"/admin/adapters/{v2}/promote?expected={v1}", headers=ADMIN)
    assert r.status_code == 409 and f"not {v1} as this promotion expected" in r.text
    assert (await gw.client.post(f"/admin/adapters/{v2}/promote?expected=base", headers=ADMIN)).status_code == 200


def test_database_calls_never_start_a_thread_on_the_event_loop(monkeypatch):
    """Thread.start blocks until the new thread runs; under load that held the loop (and /health)
    for most of a second when the database went away and the executor grew (tests/faults)."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        start_worker_threads(loop, workers=4)
        started_on_loop = []
        start = threading.Thread.start

        def recording(thread):
            if threading.get_ident() == threading.main_thread().ident:
                started_on_loop.append(thread.name)
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", recording)
        all_in = threading.Barrier(4)  # four calls at once, as when each waits on a database that is away
        await asyncio.gather(*(asyncio.to_thread(all_in.wait, 10) for _ in range(4)))
        monkeypatch.undo()  # asyncio.run's own shutdown starts a thread
        return started_on_loop

    assert asyncio.run(main()) == []

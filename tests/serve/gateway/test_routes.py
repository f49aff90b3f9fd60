"""Feedback, auth, the operational routes (health, metrics) and the learner's converge hook of
the real gateway app, vLLM faked by respx.

    pytest tests/serve/gateway/test_routes.py
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlmodel import Session, select

from feedback.models import Feedback, Turn
from serve.gateway.app import converger
from serve.gateway.auth import check_bind
from serve.settings import hash_key, load_settings
from tests.serve.gateway.fakes import MESSAGES, events, sse_chunks, turns, vllm_answer


async def test_health_and_metrics(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert (await gw.client.get("/health")).json() == {"status": "ok"}
    text = (await gw.client.get("/metrics")).text
    assert 'tunewheel_requests_total{alias="chat",status="ok",version="base"}' in text
    assert "tunewheel_request_latency_seconds_bucket" in text
    assert 'tunewheel_active_version_info{alias="chat",version="base"} 1.0' in text


async def test_the_gateway_metrics_route_reads_the_store(make_gw, upstream, tmp_path):
    gw = await make_gw(registry=True)
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES})
    name = gw.registry.new_version_name("restyler", "pirate")
    (tmp_path / name).mkdir()
    gw.registry.register(name, kind="restyler", style="pirate", path=tmp_path / name)
    gw.registry.promote(name)  # a restyler promotion: the reconciler has nothing to load for it
    text = (await gw.client.get("/metrics")).text
    assert 'tunewheel_requests_total{alias="chat",status="ok",version="base"}' in text
    assert 'tunewheel_promotions_total{kind="restyler"} 1.0' in text
    assert 'tunewheel_learner_cycles_total{outcome="failed"} 0.0' in text


async def test_converger_swaps_a_promotion_in_at_once_from_another_thread(make_gw, upstream, tmp_path):
    gw = await make_gw(registry=True)
    loaded = [{"id": "base", "root": "/m"}]

    def load(request):
        loaded.append({"id": name, "root": str((tmp_path / name).resolve())})
        return httpx.Response(200, text="ok")

    upstream.get("/v1/models").mock(side_effect=lambda r: httpx.Response(200, json={"data": loaded}))
    upstream.post("/v1/load_lora_adapter").mock(side_effect=load)
    upstream.post("/v1/completions").respond(200, json={"choices": [{"index": 0, "text": "A"}]})  # warm-up
    name = gw.registry.new_version_name("chat")
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_config.json").write_text("{}")
    gw.registry.register(name, kind="chat", path=tmp_path / name)
    gw.registry.promote(name)  # as the learner does, in its own thread
    await asyncio.to_thread(converger(gw.app))  # the learner's thread waits for the swap
    assert gw.router.table.resolve("chat") == name


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
    assert turns(gw.writer)[0].key_hash == hash_key("alice")


async def test_admin_routes_need_an_admin_key_even_without_api_keys(gw):
    assert (await gw.client.get("/admin/adapters")).status_code == 401


def test_open_gateway_refuses_public_bind(tmp_path):
    with pytest.raises(ValueError, match="refusing to bind"):
        check_bind(load_settings(None, data_dir=tmp_path, serve={"host": "0.0.0.0"}))
    check_bind(load_settings(None, data_dir=tmp_path, serve={"host": "127.0.0.1"}))
    check_bind(load_settings(None, data_dir=tmp_path, serve={"host": "0.0.0.0", "api_keys": [hash_key("k")]}))

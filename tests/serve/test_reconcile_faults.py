"""The reconciler after faults, against the fake vLLM of test_reconcile.py and a real registry on SQLite.

    pytest tests/serve/test_reconcile_faults.py

A promotion asked for by another process is loaded and warmed before prod moves, and one the
engine refuses is recorded as a fallback (and counted in /metrics); a rank beyond the engine is
refused before the engine sees it; a gateway that cannot load prod serves the last good version,
never the base model silently; aliases are not served before the first pass nor after an engine
restart until their adapter is back; a version leaves the engine only when no replica uses it;
an engine restart is recovered while the database cannot be read.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from serve.reconcile import Reconciler
from serve.routing import Router
from serve.settings import load_settings
from tests.serve.test_reconcile import ENGINE, FakeEngine, world  # noqa: F401  (world is a fixture)



def fallback_gauge(alias: str = "chat") -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("tunewheel_alias_fallback", {"alias": alias})


async def test_a_pending_promotion_is_loaded_and_warmed_before_prod_moves(world):
    from learn import promotion

    registry, engine, new_version, gateway = world
    aliases, rec = gateway()
    v1 = new_version()
    row = promotion.request(registry, v1, expected=None, requested_by="cli")  # `adapters promote` in another process
    assert registry.prod() is None
    assert await rec.reconcile() == {"chat": v1}
    assert engine.calls == [("load", v1), ("warm", v1)] and registry.prod().name == v1
    assert promotion.get(registry, row.id).state == "promoted"


async def test_a_pending_promotion_the_engine_refuses_falls_back_and_is_counted(world):
    from learn import promotion
    from serve import metrics

    registry, engine, new_version, gateway = world
    aliases, rec = gateway()
    v1, v2 = new_version(), new_version()
    registry.promote(v1)
    await rec.reconcile()
    engine.refuse.add(v2)
    row = promotion.request(registry, v2, expected=v1, requested_by="learner")
    assert await rec.reconcile() == {"chat": v1}  # production stays on the last good version
    assert registry.prod().name == v1 and registry.get(v1).state == "promoted"
    assert promotion.get(registry, row.id).state == "fell_back" and "max_lora_rank" in promotion.get(registry, row.id).error
    body = metrics.render(metrics.StoreMetrics(registry.db))[0].decode()
    assert 'tunewheel_promotion_fallbacks_total{kind="chat"} 1.0' in body


async def test_a_rank_beyond_the_engine_is_refused_before_the_engine_sees_it(world, tmp_path):
    registry, engine, new_version, gateway = world
    router = Router(load_settings(None, data_dir=tmp_path).serve.aliases, registry=registry)
    rec = Reconciler(router, world_client(engine), ENGINE, max_lora_rank=8)
    v1 = new_version()
    (tmp_path / "adapters" / v1 / "adapter_config.json").write_text(json.dumps({"r": 16}))
    registry.promote(v1)
    assert await rec.reconcile() == {"chat": "base"}
    assert "rank 16 but the engine holds at most rank 8" in rec.last_error and "engine.max_lora_rank >= 16" in rec.last_error
    assert ("load", v1) not in engine.calls


def world_client(engine: FakeEngine) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(engine.handler))


async def test_a_fresh_gateway_falls_back_to_the_last_good_version_never_silently_to_base(world, tmp_path, caplog):
    registry, engine, new_version, gateway = world
    v1, v2 = new_version(), new_version()
    registry.promote(v1)
    registry.promote(v2)
    (tmp_path / "adapters" / v2 / "adapter_config.json").unlink()  # prod's folder broke after its promotion
    aliases, rec = gateway()  # a gateway (re)started now
    with caplog.at_level(logging.ERROR, logger="tunewheel.reconcile"):
        assert await rec.reconcile() == {"chat": v1}
    assert f"serves {v1} in place of its target {v2}" in caplog.text
    assert rec.off_target == {"chat": v2} and fallback_gauge() == 1
    assert registry.prod().name == v2  # the registry still says what production should be; the alert says it is not
    (tmp_path / "adapters" / v2 / "adapter_config.json").write_text("{}")  # fixed
    assert await rec.reconcile() == {"chat": v2}
    assert rec.off_target == {} and fallback_gauge() == 0


async def test_aliases_are_not_served_before_the_first_pass_nor_after_an_engine_restart(world):
    from serve.routing import NotServed

    registry, engine, new_version, gateway = world
    aliases, rec = gateway()
    v1 = new_version()
    registry.promote(v1)
    with pytest.raises(NotServed):  # before the first pass the gateway does not know what `chat` is yet
        await rec.router.route("chat")
    (await rec.router.route("base")).lease.release()  # the base model answers as soon as the engine does
    await rec.reconcile()
    (await rec.router.route("chat")).lease.release()
    assert aliases.unserved() == {}
    engine.loaded.clear()  # the engine died and came back empty
    rec.on_engine_restart()
    with pytest.raises(NotServed, match=f"{v1} is loading"):
        await rec.router.route("chat")
    assert aliases.unserved() == {"chat": v1}
    await rec.reconcile()
    assert (await rec.router.route("chat")).version == v1


async def test_a_version_stays_loaded_until_no_replica_uses_it(world, tmp_path):
    registry, engine, new_version, gateway = world
    table_a, a = gateway()
    table_b, b = gateway()  # a second gateway replica on the same engine and registry
    v1, v2, v3 = new_version(), new_version(), new_version()
    registry.promote(v1)
    await a.reconcile()
    await b.reconcile()
    lease = table_b.acquire("chat")  # a long request on replica b, still on v1
    registry.promote(v2)  # v1 is what a rollback reaches: both keep it loaded anyway
    assert await a.reconcile() == await b.reconcile() == {"chat": v2}
    registry.promote(v3)  # now v1 is two rollbacks away: each replica unloads it once nobody uses it
    assert await a.reconcile() == {"chat": v3}
    for _ in range(20):  # replica a drained its own requests at once, but b still uses v1
        await asyncio.sleep(0.02)
    assert v1 in engine.loaded and ("unload", v1) not in engine.calls
    assert await b.reconcile() == {"chat": v3}
    await asyncio.sleep(0.1)
    assert v1 in engine.loaded  # b's own request is still running on it
    lease.release()
    for _ in range(100):
        if v1 not in engine.loaded:
            break
        await asyncio.sleep(0.02)
    assert set(engine.loaded) == {v2, v3}
    await a.reconcile()  # a retries its unload: nothing left to do
    await asyncio.sleep(0.1)
    assert engine.calls.count(("unload", v1)) == 1 and not a._retiring


async def test_an_engine_restart_is_recovered_while_the_registry_cannot_be_read(world):
    registry, engine, new_version, gateway = world
    aliases, rec = gateway()
    v1 = new_version()
    registry.promote(v1)
    await rec.reconcile()

    def database_down():
        raise OSError("database is locked")

    rec.router.targets = database_down
    engine.loaded.clear()
    rec.on_engine_restart()
    assert await rec.reconcile() == {"chat": v1}  # from the targets it read before
    assert v1 in engine.loaded and aliases.unserved() == {}

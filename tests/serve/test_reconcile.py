"""The reconciler against a fake vLLM (httpx.MockTransport) and a real registry on SQLite.

    pytest tests/serve/test_reconcile.py

The fake engine keeps the set of loaded adapters and answers the four routes the
reconciler uses as vLLM does (400 on a second load of the same name). The swap under
real load through the gateway is at the end of this file (marked `engine`); the fast tests
check the order of operations and the failure paths a user would notice.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from feedback.db import make_db
from learn.registry import Registry
from serve.reconcile import Reconciler
from serve.routing import AliasTable, Router, UnknownModel
from serve.settings import load_settings

ENGINE = "http://engine.test"


class FakeEngine:
    def __init__(self):
        self.loaded: dict[str, str] = {}  # name -> path, as vLLM reports it in `root`
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base", "root": "/models/base"},
                                                      *({"id": n, "root": p} for n, p in sorted(self.loaded.items()))]})
        if path == "/v1/load_lora_adapter":
            self.calls.append(("load", body["lora_name"]))
            if body["lora_name"] in self.refuse:
                return httpx.Response(400, json={"error": {"message": "LoRA rank 128 is greater than max_lora_rank 64"}})
            if body["lora_name"] in self.loaded:
                return httpx.Response(400, json={"error": {"message": "already loaded"}})
            self.loaded[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text="ok")
        if path == "/v1/unload_lora_adapter":
            self.calls.append(("unload", body["lora_name"]))
            self.loaded.pop(body["lora_name"], None)
            return httpx.Response(200, text="ok")
        if path == "/v1/completions":
            self.calls.append(("warm", body["model"]))
            ok = body["model"] == "base" or body["model"] in self.loaded
            return httpx.Response(200 if ok else 404, json={"choices": [{"text": "x"}]})
        return httpx.Response(404)


def add_version(registry: Registry, adapters_dir) -> str:
    """A new chat version in `registry`, its folder (an adapter_config.json) under `adapters_dir`."""
    name = registry.new_version_name("chat")
    folder = adapters_dir / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    registry.register(name, kind="chat", path=folder)
    return name


@pytest.fixture
async def world(tmp_path):
    settings = load_settings(None, data_dir=tmp_path)
    registry = Registry(make_db(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    engine = FakeEngine()
    client = httpx.AsyncClient(transport=httpx.MockTransport(engine.handler))

    def new_version() -> str:
        return add_version(registry, tmp_path / "adapters")

    def gateway(**kwargs) -> tuple[AliasTable, Reconciler]:
        router = Router(settings.serve.aliases, base=settings.engine.served_name, registry=registry)
        return router.table, Reconciler(router, client, ENGINE, **kwargs)

    yield registry, engine, new_version, gateway
    await client.aclose()


async def test_promotion_loads_warms_then_flips_then_unloads_after_drain(world):
    registry, engine, new_version, gateway = world
    aliases, rec = gateway()
    v1, v2, v3 = new_version(), new_version(), new_version()
    assert await rec.reconcile() == {"chat": "base"}  # nothing promoted: the base model answers

    registry.promote(v1)
    assert await rec.reconcile() == {"chat": v1}
    assert engine.calls == [("load", v1), ("warm", v1)]  # warmed before any user sees it

    lease = aliases.acquire("chat")  # a request still running on v1
    registry.promote(v2)
    assert await rec.reconcile() == {"chat": v2}
    assert aliases.acquire("chat").version == v2  # new requests go to v2 at once
    await asyncio.sleep(0.1)
    assert v1 in engine.loaded  # ... but v1 stays until its request ends
    lease.release()
    await asyncio.sleep(0.2)
    assert set(engine.loaded) == {v1, v2} and rec.standby == {v1}  # v1 is what a rollback reaches: it stays

    lease = aliases.acquire("chat")  # a request still running on v2
    registry.promote(v3)
    assert await rec.reconcile() == {"chat": v3} and rec.standby == {v2}
    lease.release()
    for _ in range(100):
        if v1 not in engine.loaded:
            break
        await asyncio.sleep(0.02)
    assert set(engine.loaded) == {v2, v3}  # v1 is two rollbacks away: unloaded after its drain


async def test_a_canary_is_loaded_and_warmed_before_it_answers_and_leaves_when_rolled_back(world):
    from learn.live import end_canary, start_canary

    registry, engine, new_version, gateway = world
    v1, v2 = new_version(), new_version()
    registry.promote(v1, expected=None)
    table, reconciler = gateway()
    await reconciler.reconcile()
    start_canary(registry, v2, share=0.25, expected=v1)
    await reconciler.reconcile()
    assert engine.calls[-2:] == [("load", v2), ("warm", v2)]
    assert table.canaries == {"chat": (v2, 0.25)} and table.resolve("chat") == v1 and v2 in reconciler.in_use()
    restarted, again = gateway()  # a restarted (or another) gateway replica routes the same canary from the registry
    await again.reconcile()
    assert restarted.canaries == {"chat": (v2, 0.25)} and restarted.resolve("chat") == v1
    end_canary(registry, v2, {"reasons": ["rated worse"]})
    await again.reconcile()  # each replica stops using it; the engine unloads it once neither does
    await reconciler.reconcile()
    for _ in range(50):
        if v2 not in engine.loaded:
            break
        await asyncio.sleep(0.02)
    assert table.canaries == {} and v2 not in engine.loaded and engine.loaded.keys() == {v1}


async def test_a_promoted_canary_becomes_the_alias_without_a_reload(world):
    from learn.live import start_canary

    registry, engine, new_version, gateway = world
    v1, v2 = new_version(), new_version()
    registry.promote(v1, expected=None)
    table, reconciler = gateway()
    await reconciler.reconcile()
    start_canary(registry, v2, share=0.25, expected=v1)
    await reconciler.reconcile()
    loads = engine.calls.count(("load", v2))
    registry.promote(v2, expected=v1)
    await reconciler.reconcile()
    assert table.resolve("chat") == v2 and table.canaries == {} and engine.calls.count(("load", v2)) == loads == 1
    assert v1 in reconciler.standby  # and the version it replaced is what a rollback flips back to


async def test_rollback_brings_the_previous_version_back(world):
    registry, engine, new_version, gateway = world
    _, rec = gateway()
    v1, v2 = new_version(), new_version()
    registry.promote(v1)
    await rec.reconcile()
    registry.promote(v2)
    await rec.reconcile()
    engine.calls.clear()
    registry.rollback("chat")
    assert await rec.reconcile() == {"chat": v1}
    assert engine.calls == []  # v1 stayed loaded: the rollback is a flip, no load, no warm-up
    registry.rollback("chat")
    assert await rec.reconcile() == {"chat": "base"}


async def test_candidates_are_loaded_ahead_of_promotion_while_slots_are_spare(world):
    registry, engine, new_version, gateway = world
    _, rec = gateway(max_loras=2)
    v1, v2, v3 = new_version(), new_version(), new_version()
    await rec.reconcile()
    assert set(engine.loaded) == {v3, v2} and rec.staged == {v3, v2}  # the two newest; the oldest waits for a slot
    engine.calls.clear()
    registry.promote(v2)
    assert await rec.reconcile() == {"chat": v2} and ("load", v2) not in engine.calls  # a flip, not a load
    assert rec.staged == {v3} and set(engine.loaded) == {v2, v3}  # one slot left: v1 is still not loaded
    registry.reject(v3)
    await rec.reconcile()
    await asyncio.sleep(0.1)
    assert set(engine.loaded) == {v2, v1} and rec.staged == {v1}  # the rejected one left; v1 got its slot


async def test_vanished_adapter_folder_keeps_the_current_version(world, caplog, tmp_path):
    registry, engine, new_version, gateway = world
    _, rec = gateway()
    v1, v2 = new_version(), new_version()
    registry.promote(v1)
    await rec.reconcile()
    registry.promote(v2)
    (tmp_path / "adapters" / v2 / "adapter_config.json").unlink()
    with caplog.at_level(logging.ERROR, logger="tunewheel.reconcile"):
        assert await rec.reconcile() == {"chat": v1}
    assert v2 in caplog.text and "rollback" in caplog.text
    assert v1 in engine.loaded


async def test_engine_refusal_keeps_the_current_version(world):
    registry, engine, new_version, gateway = world
    _, rec = gateway()
    v1 = new_version()
    engine.refuse.add(v1)
    registry.promote(v1)
    assert await rec.reconcile() == {"chat": "base"}
    assert "max_lora_rank" in rec.last_error


async def test_restarted_gateway_converges_without_reloading(world):
    registry, engine, new_version, gateway = world
    _, first = gateway()
    v1 = new_version()
    registry.promote(v1)
    await first.reconcile()
    engine.calls.clear()

    aliases, second = gateway()  # a new gateway process: its table starts on base
    assert aliases.resolve("chat") == "base"
    assert await second.reconcile() == {"chat": v1}
    assert ("load", v1) not in engine.calls


async def test_engine_restart_reloads_the_promoted_version(world):
    registry, engine, new_version, gateway = world
    aliases, rec = gateway()
    v1 = new_version()
    registry.promote(v1)
    await rec.reconcile()
    engine.loaded.clear()  # the engine died and came back empty
    rec.on_engine_restart()
    await rec.reconcile()
    assert v1 in engine.loaded and aliases.resolve("chat") == v1


async def test_pinned_versions_load_on_demand_only_when_servable(world):
    registry, engine, new_version, gateway = world
    _, rec = gateway()
    cand, rejected = new_version(), new_version()
    registry.reject(rejected, {"promote": False})
    route = await rec.router.route(f"chat@{cand}")
    await rec.ensure_pinned(route.load)
    assert cand in engine.loaded
    for name in (f"chat@{rejected}", "chat@chat-v9999"):
        with pytest.raises(UnknownModel):  # the router refuses, so nothing is loaded
            await rec.router.route(name)
    assert rejected not in engine.loaded


async def test_periodic_loop_picks_up_a_promotion_from_another_process(world):
    registry, engine, new_version, gateway = world
    aliases, rec = gateway()
    await rec.start(interval_s=0.05)
    try:
        v1 = new_version()
        registry.promote(v1)  # e.g. `tunewheel adapters promote` in another process
        for _ in range(100):
            if aliases.resolve("chat") == v1:
                break
            await asyncio.sleep(0.05)
        assert aliases.resolve("chat") == v1
    finally:
        await rec.stop()


async def test_same_name_from_another_folder_is_replaced_by_ours(world, tmp_path):
    registry, engine, new_version, gateway = world
    _, rec = gateway()
    v1 = new_version()
    engine.loaded[v1] = "/elsewhere/old-data-dir/chat-v0001"  # left by another registry on a shared engine
    registry.promote(v1)
    assert await rec.reconcile() == {"chat": v1}
    assert engine.loaded[v1] == str((tmp_path / "adapters" / v1).resolve())


# --- on the real engine, through the gateway -----------------------------------------------

ADMIN = "test-admin-key"


@pytest.fixture(scope="module")
def lora_folder(model_dir, tmp_path_factory):
    """A real (randomly initialised) peft LoRA for the base model: no training needed to swap it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    return out


def _register_copies(gw, source, n: int) -> list[str]:
    import shutil

    names = []
    for _ in range(n):
        name = gw.registry.new_version_name("chat")
        shutil.copytree(source, gw.settings.adapters_dir / name)
        gw.registry.register(name, kind="chat", path=gw.settings.adapters_dir / name)
        names.append(name)
    return names


class StreamLoad:
    """`n` threads sending streamed chat completions back to back; records (time, version) or the failure."""

    def __init__(self, url: str, key: str, n: int = 8):
        import threading

        self.url, self.key = url, key
        self.answers: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        import time

        body = {"model": "chat", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, "stream": True}
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=300, trust_env=False) as c:
            while not self.stop.is_set():
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        lines = [line for line in r.iter_lines()]
                        if r.status_code != 200 or "data: [DONE]" not in lines:
                            self.failures.append(f"HTTP {r.status_code}: {lines[-3:]}")
                        else:
                            self.answers.append((time.monotonic(), r.headers["x-tunewheel-adapter"]))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(300)

    def wait_for(self, version: str, since: float, timeout: float = 300) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(v == version and at > since for at, v in list(self.answers)):
                return True
            time.sleep(0.05)
        return False


def _engine_has(engine_url: str, name: str) -> bool:
    return any(m["id"] == name for m in httpx.get(f"{engine_url}/v1/models", trust_env=False).json()["data"])


@pytest.mark.engine
def test_promotion_and_rollback_under_load_fail_no_request(make_gateway, engine_url, lora_folder, tmp_path):
    import time

    from serve.settings import hash_key

    gw = make_gateway(data_dir=tmp_path / "shared", serve={"admin_keys": [hash_key(ADMIN)]})
    v1, v2 = _register_copies(gw, lora_folder, 2)
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300, trust_env=False)
    try:
        with StreamLoad(gw.url, ADMIN) as load:
            assert load.wait_for("base", 0)
            for call, expect in ((f"/admin/adapters/{v1}/promote", v1), (f"/admin/adapters/{v2}/promote", v2),
                                 ("/admin/adapters/rollback", v1)):
                t0 = time.monotonic()
                r = admin.post(call)
                assert r.status_code == 200, r.text
                assert r.json()["aliases"]["chat"] == expect
                assert load.wait_for(expect, t0), f"no answer from {expect} after {call}"
        assert load.failures == []
        assert gw.registry.prod("chat").name == v1
        deadline = time.monotonic() + 60  # v2 leaves the engine once its last request finished
        while _engine_has(engine_url, v2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _engine_has(engine_url, v2)

        # A gateway started later on the same registry converges on v1 by itself.
        gw.stop()
        again = make_gateway(data_dir=tmp_path / "shared", serve={"admin_keys": [hash_key(ADMIN)]})
        reply = httpx.post(f"{again.url}/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN}"}, trust_env=False,
                           json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=300)
        assert reply.status_code == 200 and reply.headers["x-tunewheel-adapter"] == v1
    finally:
        admin.close()
        for name in (v1, v2):
            httpx.post(f"{engine_url}/v1/unload_lora_adapter", json={"lora_name": name}, trust_env=False)


@pytest.mark.engine
def test_promoting_a_broken_adapter_is_refused_and_production_stays(make_gateway, engine_url, lora_folder):
    from serve.settings import hash_key

    gw = make_gateway(serve={"admin_keys": [hash_key(ADMIN)]})
    [bad] = _register_copies(gw, lora_folder, 1)
    (gw.settings.adapters_dir / bad / "adapter_model.safetensors").write_bytes(b"not weights")
    r = httpx.post(f"{gw.url}/admin/adapters/{bad}/promote", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300, trust_env=False)
    assert r.status_code == 409 and "production was not changed" in r.text
    assert gw.registry.prod("chat") is None
    ok = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN}"}, trust_env=False, timeout=300,
                    json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200 and ok.headers["x-tunewheel-adapter"] == "base"


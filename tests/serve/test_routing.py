"""Which version answers a name (serve/routing.py): aliases, `base`, pinned versions, restylers,
and the table of what is served now with its in-flight leases. A real registry on SQLite.

    pytest tests/serve/test_routing.py
"""

from __future__ import annotations

import logging

import pytest

from feedback.db import make_db
from learn.registry import Registry
from serve.routing import AliasTable, Router, Target, UnknownModel
from serve.settings import AliasSettings


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(make_db(f"sqlite:///{tmp_path / 'db.sqlite'}"))


def add_version(registry: Registry, tmp_path, kind: str = "chat", style: str | None = None) -> str:
    name = registry.new_version_name(kind, style)
    folder = tmp_path / "adapters" / name
    folder.mkdir(parents=True)
    registry.register(name, kind=kind, style=style, path=folder)
    return name


def aliases(**specs: dict) -> dict[str, AliasSettings]:
    return {name: AliasSettings(**spec) for name, spec in (specs or {"chat": {}}).items()}


async def test_alias_table_counts_in_flight_and_drains():
    table = AliasTable(["chat"], base="base")
    assert table.resolve("chat") == "base"
    lease = table.acquire("chat")
    table.set("chat", "chat-v0001")
    assert table.resolve("chat") == "chat-v0001" and lease.version == "base"
    assert await table.drain("base", timeout=0.05) is False
    lease.release()
    lease.release()  # twice is harmless
    assert await table.drain("base", timeout=1) is True and table.in_flight("base") == 0


async def test_an_alias_is_answered_by_what_the_table_serves_now_and_leased():
    router = Router(aliases(), base="base")
    first = await router.route("chat")
    assert (first.model, first.version, first.load) == ("chat", "base", None)
    router.table.set("chat", "chat-v0002")  # the reconciler flipped it after loading
    second = await router.route("chat", conversation_key="conv-1")
    assert second.version == "chat-v0002"
    assert router.table.in_flight("base") == 1 and router.table.in_flight("chat-v0002") == 1
    with first.lease, second.lease:
        pass
    assert router.table.in_flight("base") == 0 and router.table.in_flight("chat-v0002") == 0


async def test_base_is_the_engine_base_model_whatever_it_is_called():
    router = Router(aliases(), base="smol")
    assert (await router.route("base")).version == "smol"


async def test_unknown_names_list_the_valid_ones():
    router = Router(aliases(chat={}, pirate={"adapter": "base"}), base="base")
    with pytest.raises(UnknownModel) as err:
        await router.route("gpt-9")
    assert err.value.names == ["chat", "pirate", "base"]
    assert "gpt-9" in str(err.value) and "pirate" in str(err.value)
    for name in ("chat@", "chat@chat-v0009"):
        with pytest.raises(UnknownModel):
            await router.route(name)
    assert router.table.in_flight("chat-v0009") == 0


async def test_without_a_registry_only_versions_the_engine_holds_can_be_pinned():
    router = Router(aliases(), base="base")
    router.table.set("chat", "chat-v0002")
    route = await router.route("chat@chat-v0002")
    assert (route.version, route.load) == ("chat-v0002", None)
    assert router.model_names() == ["chat", "base", "chat@chat-v0002"]
    assert router.targets() == {"chat": Target("base")}


async def test_pinned_versions_come_from_the_registry_when_servable(registry, tmp_path):
    router = Router(aliases(), base="base", registry=registry)
    cand, rejected = add_version(registry, tmp_path), add_version(registry, tmp_path)
    registry.reject(rejected, {"promote": False})
    route = await router.route(f"chat@{cand}")
    assert route.version == cand and route.load == Target(cand, registry.get(cand).path)
    assert router.table.in_flight(cand) == 1
    for name in (f"chat@{rejected}", "chat@chat-v9999"):
        with pytest.raises(UnknownModel):
            await router.route(name)


def test_targets_follow_config_and_the_prod_pointer(registry, tmp_path, caplog):
    v1, v2 = add_version(registry, tmp_path), add_version(registry, tmp_path)
    router = Router(aliases(chat={}, plain={"adapter": "base"}, fixed={"adapter": v2}, gone={"adapter": "chat-v0099"}),
                    base="base", registry=registry)
    with caplog.at_level(logging.ERROR, logger="tunewheel.routing"):
        targets = router.targets()
    staged = (Target(v2, registry.get(v2).path), Target(v1, registry.get(v1).path))  # candidates, newest first
    assert targets["chat"] == Target("base", staged=staged)  # nothing promoted yet: the base model answers
    assert targets["plain"] == Target("base")
    assert targets["fixed"] == Target(v2, registry.get(v2).path)
    assert targets["gone"] == Target("base") and "chat-v0099" in caplog.text
    registry.promote(v1)
    assert router.targets()["chat"] == Target(v1, registry.get(v1).path, staged=staged[:1])
    registry.reject(v2)
    assert router.targets()["chat"].staged == ()


def test_a_style_is_restyled_by_its_promoted_restyler(registry, tmp_path):
    router = Router(aliases(), base="base", registry=registry)
    assert router.restyler("pirate") is None and router.styles() == []
    name = add_version(registry, tmp_path, kind="restyler", style="pirate")
    assert router.restyler("pirate") is None  # a candidate does not restyle yet
    registry.promote(name)
    assert router.restyler("pirate") == Target(name, registry.get(name).path)
    assert router.styles() == ["pirate"]
    assert router.restyler("Not A Style!") is None
    assert Router(aliases(), base="base").restyler("pirate") is None


def test_a_conversation_keeps_its_key_from_turn_to_turn_and_per_api_key():
    from serve.routing import conversation_key

    system = {"role": "system", "content": "Story: Ann has a kite."}
    first = [system, {"role": "user", "content": "What does Ann have?"}]
    later = [*first, {"role": "assistant", "content": "a kite"}, {"role": "user", "content": "What colour?"}]
    key = conversation_key(first, conversation_id=None, key_hash="k1")
    assert conversation_key(later, conversation_id=None, key_hash="k1") == key
    assert conversation_key(first, conversation_id=None, key_hash="k2") != key
    other = [system, {"role": "user", "content": "Who is Ann?"}]
    assert conversation_key(other, conversation_id=None, key_hash="k1") != key
    assert conversation_key(other, conversation_id="c-9", key_hash="k1") == conversation_key(later, conversation_id="c-9", key_hash="k1")


def test_the_canary_share_is_a_stable_hash_of_the_conversation():
    from serve.routing import in_canary

    keys = [f"conversation {i}" for i in range(4000)]
    picked = [k for k in keys if in_canary(k, "chat-v0002", 0.1)]
    assert 0.08 < len(picked) / len(keys) < 0.12
    assert picked == [k for k in keys if in_canary(k, "chat-v0002", 0.1)]  # the same on every replica, every time
    assert set(picked) < {k for k in keys if in_canary(k, "chat-v0002", 0.3)}  # a larger share keeps the smaller's
    assert picked != [k for k in keys if in_canary(k, "chat-v0003", 0.1)]  # each canary its own sample


async def test_an_alias_with_a_loaded_canary_sends_its_share_of_conversations_there(registry, tmp_path):
    from learn.live import start_canary
    from serve.routing import in_canary

    v1, v2 = add_version(registry, tmp_path), add_version(registry, tmp_path)
    registry.promote(v1, expected=None)
    start_canary(registry, v2, share=0.5, expected=v1)
    router = Router(aliases(), base="base", registry=registry)
    target = router.targets()["chat"]
    assert (target.version, target.canary.version, target.canary_share) == (v1, v2, 0.5)
    router.table.synced = True
    router.table.set("chat", v1)
    keys = [f"c{i}" for i in range(40)]
    assert {(await router.route("chat", conversation_key=k)).version for k in keys} == {v1}  # not loaded yet: prod only
    router.table.canaries["chat"] = (v2, 0.5)
    router.table.loaded.add(v2)
    routes = {k: (await router.route("chat", conversation_key=k)).version for k in keys}
    assert routes == {k: v2 if in_canary(k, v2, 0.5) else v1 for k in keys} and set(routes.values()) == {v1, v2}
    assert router.table.in_flight(v2) == sum(v == v2 for v in routes.values())  # each route leases its arm

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
    second = await router.route("chat", conversation_id="conv-1")
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
    assert targets["chat"] == Target("base")  # nothing promoted yet: the base model answers
    assert targets["plain"] == Target("base")
    assert targets["fixed"] == Target(v2, registry.get(v2).path)
    assert targets["gone"] == Target("base") and "chat-v0099" in caplog.text
    registry.promote(v1)
    assert router.targets()["chat"] == Target(v1, registry.get(v1).path)


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

"""The one promotion path (learn/promotion.py) and the replica leases (learn/replicas.py) on real
databases, with the gateway's side faked (tests/learn/fake_gateway.py): seconds, no engine.

    pytest tests/learn/test_promotion.py                # SQLite, and Postgres with -m postgres

What an operator would notice: a version the engine will not load never becomes prod, and the
fallback is recorded (and counted on /metrics); a promotion decided against a champion that has
since been rolled back is refused; a rank beyond the engine's capacity is refused up front with
what to change; nobody waits forever for a gateway that is not there; exactly one gateway
replica loads a pending promotion; a replica's leases keep a version loaded for it, and a dead
replica leases nothing. The same path on the real engine, through the CLI, the learner and the
admin route, is tests/serve/test_promotion_engine.py.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from feedback.db import make_db
from learn import promotion
from learn.promotion import Promotion, PromotionFailed, PromotionTimeout, RankTooLarge, adapter_rank
from learn.registry import UNCHECKED, ChampionMoved, Registry, RegistryError
from learn.replicas import ReplicaLeases
from tests.learn.fake_gateway import FakeGateway


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reg(request, tmp_path):
    url = f"sqlite:///{tmp_path}/registry.db" if request.param == "sqlite" else request.getfixturevalue("pg_fresh_url")
    engine = make_db(url)
    yield Registry(engine)
    engine.dispose()


def add(reg: Registry, tmp_path: Path, rank: int = 8) -> str:
    name = reg.new_version_name("chat")
    folder = tmp_path / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    reg.register(name, kind="chat", path=folder)
    return name


def rows(reg: Registry) -> list[Promotion]:
    with Session(reg.db) as s:
        return list(s.query(Promotion).order_by(Promotion.id))


def test_a_version_that_loads_becomes_prod_after_its_load(reg, tmp_path):
    v1 = add(reg, tmp_path)
    order = []
    change = promotion.promote(reg, v1, expected=None, requested_by="admin",
                               load=lambda v: order.append(("load", v.name, reg.prod() is None)))
    assert order == [("load", v1, True)]  # loaded while prod was still the base model
    assert change.describe() == "chat: prod base -> chat-v0001" and reg.prod().name == v1
    assert [(r.state, r.requested_by, r.expected) for r in rows(reg)] == [("promoted", "admin", None)]


def test_a_version_that_will_not_load_leaves_prod_on_the_last_good_one(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    promotion.promote(reg, v1, expected=None, requested_by="admin", load=lambda v: None)

    def refuse(v):
        raise RuntimeError("engine refused adapter: size mismatch for lora_A")

    with pytest.raises(PromotionFailed, match=f"production stays on {v1}.*size mismatch"):
        promotion.promote(reg, v2, expected=v1, requested_by="admin", load=refuse)
    assert reg.prod().name == v1 and reg.get(v1).state == "promoted"  # the last good version is not retired
    assert reg.get(v2).state == "candidate"
    with Session(reg.db) as s:
        assert promotion.fallbacks(s) == {"chat": 1}  # tunewheel_promotion_fallbacks_total{kind="chat"}


def test_a_rollback_after_the_decision_wins_over_the_promotion(reg, tmp_path):
    v1, v2, v3 = add(reg, tmp_path), add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1)
    reg.promote(v2)  # the learner scores v3 against v2 ...
    reg.rollback()   # ... while an operator rolls back to v1
    with pytest.raises(ChampionMoved, match=f"production of chat is {v1}, not {v2}"):
        promotion.promote(reg, v3, expected=v2, requested_by="learner", load=lambda v: pytest.fail("must not load"))
    assert reg.prod().name == v1 and rows(reg) == []


def test_prod_moving_while_the_version_loads_is_caught_by_the_swap(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1)
    with pytest.raises(ChampionMoved):
        promotion.promote(reg, v2, expected=v1, requested_by="learner", load=lambda v: reg.rollback())
    assert reg.prod() is None  # the rollback to base stands
    assert [(r.state, r.version) for r in rows(reg)] == [("superseded", v2)]


def test_a_rank_beyond_the_engine_is_refused_with_what_to_change(reg, tmp_path):
    big = add(reg, tmp_path, rank=64)
    assert adapter_rank(reg.get(big).path) == 64
    with pytest.raises(RankTooLarge, match=r"rank 64 but the engine holds at most rank 16.*engine.max_lora_rank >= 64"):
        promotion.promote(reg, big, expected=None, requested_by="cli", max_rank=16)
    assert reg.prod() is None and rows(reg) == []


def test_the_engine_holds_the_training_rank_and_every_rank_the_registry_serves(reg, tmp_path):
    from serve.cli_serve import sized_to_registry
    from serve.engine_child import engine_command
    from serve.settings import load_settings

    def capacity(settings) -> str:
        cmd = engine_command(sized_to_registry(settings), "cpu")
        return cmd[cmd.index("--max-lora-rank") + 1]

    url = str(reg.db.url.render_as_string(hide_password=False))
    settings = load_settings(None, data_dir=tmp_path, store={"url": url}, learn={"train": {"rank": 8}})
    assert promotion.served_rank(reg) is None and capacity(settings) == "8"  # the training rank alone
    old = add(reg, tmp_path, rank=32)  # trained before learn.train.rank was lowered to 8
    reg.promote(old)
    add(reg, tmp_path, rank=64)  # a candidate is not served (a promotion of it is checked then)
    reg.promote(add(reg, tmp_path, rank=8))
    assert promotion.served_rank(reg) == 32  # the retired version is prod's last good one: a rollback may load it
    assert capacity(settings) == "32" and sized_to_registry(settings).lora_capacity == 32
    with pytest.raises(RankTooLarge):  # nor is a rank-64 version promoted beyond what the sized engine holds
        promotion.promote(reg, "chat-v0002", expected=UNCHECKED, requested_by="cli", max_rank=settings.lora_capacity_for(32))
    fixed = load_settings(None, data_dir=tmp_path, store={"url": url}, engine={"max_lora_rank": 16}, learn={"train": {"rank": 8}})
    assert capacity(fixed) == "16"  # an operator's engine.max_lora_rank stands


def test_another_process_hands_the_load_to_a_gateway_and_waits(reg, tmp_path):
    v1 = add(reg, tmp_path)
    with FakeGateway(reg) as gateway:
        change = promotion.promote(reg, v1, expected=None, requested_by="cli", wait_s=30)
    assert change.current == v1 and reg.prod().name == v1 and gateway.loaded == [v1]


def test_no_gateway_calls_the_promotion_off(reg, tmp_path):
    v1 = add(reg, tmp_path)
    started = time.monotonic()
    with pytest.raises(PromotionTimeout, match="no gateway loaded chat-v0001 within 0.5 s"):
        promotion.promote(reg, v1, expected=None, requested_by="cli", wait_s=0.5)
    assert time.monotonic() - started < 10
    FakeGateway(reg).run_pass()  # a gateway that comes up later does not promote it behind the caller's back
    assert reg.prod() is None and rows(reg)[0].state == "cancelled"


def test_one_promotion_at_a_time_and_an_abandoned_one_expires(reg, tmp_path, monkeypatch):
    clock = [promotion.utcnow()]  # the promotions' clock, moved by hand: the outcome never depends on the machine's speed
    monkeypatch.setattr(promotion, "utcnow", lambda: clock[0])
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    row = promotion.request(reg, v1, expected=None, requested_by="cli", wait_s=60)  # its requester died
    with pytest.raises(RegistryError, match="a promotion of chat-v0001 .* is still under way"):
        promotion.request(reg, v2, expected=None, requested_by="cli")
    clock[0] += timedelta(seconds=61)
    assert promotion.claim(reg, "gw") == []  # past its deadline: expired, not loaded
    assert promotion.get(reg, row.id).state == "expired"
    monkeypatch.undo()
    with FakeGateway(reg):
        assert promotion.promote(reg, v2, expected=None, requested_by="cli", wait_s=30).current == v2


def test_exactly_one_replica_claims_a_pending_promotion(reg, tmp_path):
    v1 = add(reg, tmp_path)
    promotion.request(reg, v1, expected=None, requested_by="learner")
    claims, barrier = {}, threading.Barrier(4)

    def replica(i: int) -> None:
        barrier.wait()
        claims[i] = promotion.claim(reg, f"gw-{i}")

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(len(c) for c in claims.values()) == [0, 0, 0, 1]


def test_a_gateway_refusal_reaches_the_waiting_caller(reg, tmp_path):
    v1 = add(reg, tmp_path)
    with FakeGateway(reg, refuse={v1}), pytest.raises(PromotionFailed, match="engine refused adapter chat-v0001"):
        promotion.promote(reg, v1, expected=None, requested_by="cli", wait_s=30)
    assert reg.prod() is None


def test_replicas_lease_what_they_use_and_a_dead_one_leases_nothing(reg):
    a = ReplicaLeases(reg.db, engine_url="http://vllm:8000/")
    b = ReplicaLeases(reg.db, engine_url="http://vllm:8000")
    elsewhere = ReplicaLeases(reg.db, engine_url="http://other-engine:8000")
    a.beat({"chat-v0001"})
    b.beat({"chat-v0001", "chat-v0002"})
    elsewhere.beat({"chat-v0003"})
    assert a.others_using("chat-v0002") == [b.id] and b.others_using("chat-v0002") == []
    assert a.others_using("chat-v0003") == []  # another engine's replicas do not hold this engine's adapters
    b.beat({"chat-v0001"})  # b drained chat-v0002
    assert a.others_using("chat-v0002") == []
    b.leave()
    assert a.others_using("chat-v0001") == []
    dead = ReplicaLeases(reg.db, engine_url="http://vllm:8000", ttl_s=-1)  # sees every heartbeat as too old
    a.beat({"chat-v0001"})
    assert dead.others_using("chat-v0001") == []


def test_migration_0006_matches_the_models(reg):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    from learn.replicas import ServingReplica

    ours = {Promotion.__tablename__, ServingReplica.__tablename__}

    def table_of(diff) -> str | None:
        diff = diff[0] if isinstance(diff, list) else diff
        obj = diff[1]
        return getattr(getattr(obj, "table", None), "name", None) or getattr(obj, "name", None) or diff[2]

    with reg.db.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    assert [d for d in diffs if table_of(d) in ours] == []

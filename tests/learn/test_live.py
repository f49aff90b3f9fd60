"""Live trials (learn/live.py) on real databases: the canary's and probation's state on the prod
pointer, the turn log's figures per version, and each check's decision carried out, with
fabricated turns and ratings (seconds, no engine). The same on the real engine with simulated
users is tests/e2e/test_canary.py.

    pytest tests/learn/test_live.py                # SQLite, and Postgres with -m postgres
"""

from __future__ import annotations

import json
import random
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from feedback.db import make_db
from feedback.models import Conversation, Turn
from feedback.queries import version_figures
from learn import promotion
from learn.canary import CanarySettings
from learn.live import LiveTrials, canary_of, describe, end_canary, pointers, start_canary
from learn.registry import AliasHistory, ChampionMoved, Registry, RegistryError, utcnow

FAST = CanarySettings(min_ratings=20, max_ratings=400, min_requests=20, alpha=0.05)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reg(request, tmp_path):
    url = f"sqlite:///{tmp_path}/live.db" if request.param == "sqlite" else request.getfixturevalue("pg_fresh_url")
    engine = make_db(url)
    yield Registry(engine)
    engine.dispose()


def add(reg: Registry, tmp_path: Path) -> str:
    name = reg.new_version_name("chat")
    folder = tmp_path / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    reg.register(name, kind="chat", path=folder)
    return name


def answered(reg: Registry, version: str, *, n: int, up_rate: float, errors: int = 0, latency_ms: float = 100.0,
             at=None, seed: int = 0) -> None:
    """`n` rated turns answered by `version` (thumbs up with probability `up_rate`), `errors` of them failed."""
    rng = random.Random(f"{version}{seed}")
    at = at or utcnow()
    with Session(reg.db) as s:
        for i in range(n):
            cid = f"{version}-{seed}-{i}"
            s.add(Conversation(id=cid))
            s.add(Turn(id=f"t-{cid}", conversation_id=cid, thread_hash=cid, alias="chat", adapter_version=version,
                       request_messages=[{"role": "user", "content": "hi"}], answer="hello", created_at=at,
                       rating="up" if rng.random() < up_rate else "down", status="error" if i < errors else "ok",
                       latency_ms=latency_ms + i))
        s.commit()


def trials(reg: Registry, promoted: list, settings: CanarySettings = FAST, now=None) -> LiveTrials:
    def promote(name, expected, detail):  # the one promotion path, with a gateway's load that succeeds at once
        promoted.append(name)
        return promotion.promote(reg, name, expected=expected, requested_by="canary", load=lambda v: None, detail=detail)

    return LiveTrials(reg, settings, base_name="base", promote=promote, now=now or utcnow)


def test_version_figures_count_ratings_errors_and_p95_per_version_and_window(reg, tmp_path):
    answered(reg, "chat-v0001", n=40, up_rate=1.0, errors=4, latency_ms=1000)
    answered(reg, "base", n=10, up_rate=0.0, at=utcnow() - timedelta(days=2))
    f = version_figures(reg.db, "chat-v0001", since=utcnow() - timedelta(hours=1))
    assert f == {"ratings": 40, "ups": 40, "requests": 40, "errors": 4, "p95_latency_s": pytest.approx(1.038)}
    assert version_figures(reg.db, "base", since=utcnow() - timedelta(hours=1))["requests"] == 0
    assert version_figures(reg.db, "base", since=utcnow() - timedelta(days=3))["ratings"] == 10


def test_a_canary_stands_beside_prod_and_one_at_a_time(reg, tmp_path):
    v1, v2, v3 = add(reg, tmp_path), add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    with pytest.raises(ChampionMoved):
        start_canary(reg, v2, share=0.2, expected=None)  # decided against the base model, but prod is v1
    start_canary(reg, v2, share=0.2, expected=v1)
    version, share = canary_of(reg)
    assert (version.name, share, reg.prod().name, version.state) == (v2, 0.2, v1, "candidate")
    with pytest.raises(RegistryError, match="already the canary"):
        start_canary(reg, v3, share=0.2)
    with pytest.raises(RegistryError, match="between 0 and 1"):
        start_canary(reg, v3, share=1.0)
    canary, probation = describe(pointers(reg.db)[0])
    assert canary.startswith("canary chat-v0002: 20% of new conversations beside chat-v0001") and "not checked yet" in canary
    assert probation.startswith("probation of chat-v0001 against base's last window")


def test_a_check_promotes_a_canary_users_rate_better_through_the_promotion_path(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    start_canary(reg, v2, share=0.5, expected=v1)
    promoted: list = []
    answered(reg, v1, n=60, up_rate=0.3)
    answered(reg, v2, n=60, up_rate=0.9)
    [outcome] = [o for o in trials(reg, promoted).check() if o.phase == "canary"]
    assert (outcome.action, outcome.rule, promoted) == ("promote", "not_worse", [v2])
    assert reg.prod().name == v2 and canary_of(reg) is None
    pointer = pointers(reg.db)[0]
    assert pointer.probation == v2 and pointer.probation_baseline == v1  # and it is on probation now
    with Session(reg.db) as s:
        move = s.exec(select(AliasHistory).where(AliasHistory.action == "promote", AliasHistory.version == v2)).one()
    assert move.detail["phase"] == "canary" and move.detail["statistic"]["up_rate_candidate"] == pytest.approx(up_rate(reg, v2))


def up_rate(reg, version) -> float:
    f = version_figures(reg.db, version)
    return f["ups"] / f["ratings"]


def test_a_check_rolls_back_a_canary_users_rate_worse_and_records_why(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    start_canary(reg, v2, share=0.5, expected=v1)
    answered(reg, v1, n=60, up_rate=0.8)
    answered(reg, v2, n=60, up_rate=0.2)
    promoted: list = []
    [outcome] = [o for o in trials(reg, promoted).check() if o.phase == "canary"]
    assert (outcome.action, outcome.rule, promoted) == ("rollback", "worse", [])
    assert reg.prod().name == v1 and canary_of(reg) is None
    v = reg.get(v2)
    assert v.state == "rejected" and "rolled back by the live canary" in v.error
    assert v.metrics["canary"]["statistic"]["difference"] < -0.3
    with Session(reg.db) as s:
        end = s.exec(select(AliasHistory).where(AliasHistory.action == "canary_end")).one()
    assert end.detail["action"] == "rollback" and end.detail["rule"] == "worse"


def test_a_canary_keeps_collecting_below_the_minimum_and_the_check_is_recorded(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    start_canary(reg, v2, share=0.5, expected=v1)
    answered(reg, v2, n=5, up_rate=0.0)
    [outcome] = [o for o in trials(reg, []).check() if o.phase == "canary"]
    assert outcome.action == "continue" and canary_of(reg)[0].name == v2
    live = pointers(reg.db)[0].live
    assert live["canary"]["candidate"]["ratings"] == 5 and "too few ratings" in " ".join(live["canary"]["reasons"])


def test_probation_rolls_back_a_promoted_version_whose_up_rate_drops(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    answered(reg, v1, n=80, up_rate=0.8, at=utcnow() - timedelta(hours=2))  # v1's last window before v2
    reg.promote(v2, expected=v1)
    answered(reg, v2, n=80, up_rate=0.2)
    [outcome] = trials(reg, []).check()
    assert (outcome.phase, outcome.action, outcome.rule, outcome.baseline) == ("probation", "rollback", "worse", v1)
    assert reg.prod().name == v1 and pointers(reg.db)[0].probation is None
    with Session(reg.db) as s:
        back = s.exec(select(AliasHistory).where(AliasHistory.action == "rollback")).one()
    assert back.detail["phase"] == "probation" and back.version == v1 and back.previous == v2


def test_probation_ends_keeping_a_version_that_holds_up(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    answered(reg, v1, n=80, up_rate=0.5, at=utcnow() - timedelta(hours=2))
    reg.promote(v2, expected=v1)
    answered(reg, v2, n=80, up_rate=0.5)
    later = lambda: utcnow() + timedelta(days=4)  # noqa: E731  past the probation window
    [outcome] = trials(reg, [], now=later).check()
    assert (outcome.action, outcome.rule) == ("promote", "max") and reg.prod().name == v2
    assert pointers(reg.db)[0].probation is None and reg.get(v2).metrics["probation"]["action"] == "promote"


def test_an_operator_rollback_or_promotion_ends_the_trials_it_invalidates(reg, tmp_path):
    v1, v2, v3 = add(reg, tmp_path), add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    start_canary(reg, v2, share=0.3, expected=v1)
    reg.promote(v3, expected=v1)  # the canary's champion changed: its comparison no longer holds
    assert canary_of(reg) is None and reg.get(v2).state == "candidate" and pointers(reg.db)[0].probation == v3
    reg.rollback("chat")
    assert pointers(reg.db)[0].probation is None and reg.prod().name == v1
    with pytest.raises(RegistryError, match="not the canary"):
        end_canary(reg, v2, {"reasons": []})


def test_probation_does_not_roll_back_a_version_that_is_no_longer_prod(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1, expected=None)
    answered(reg, v1, n=80, up_rate=0.9, at=utcnow() - timedelta(hours=2))
    reg.promote(v2, expected=v1)
    answered(reg, v2, n=80, up_rate=0.1)
    with pytest.raises(ChampionMoved):  # the registry's compare-and-swap the probation rollback uses
        reg.rollback("chat", expected=v1)
    assert reg.prod().name == v2


def test_migration_0007_matches_the_models(reg):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with reg.db.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    ours = {"aliaspointer", "aliashistory", "promotion"}
    flat = [d for diff in diffs for d in (diff if isinstance(diff, list) else [diff])]
    assert [d for d in flat if any(str(x) in ours for x in d[1:4] if isinstance(x, str))] == []

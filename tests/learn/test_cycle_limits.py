"""The learner cycle's promotion step and its limits, with training and scores faked (seconds, no engine).

    pytest tests/learn/test_cycle_limits.py

A rollback an operator makes while the cycle trains is not overridden (the promotion's
compare-and-swap refuses and the cycle says why); a candidate the engine will not load fails
the cycle and leaves production where it was; training gets what is left of
`learn.cycle_timeout_s`, a cycle past it does not promote, and the lock of a hung cycle stops
being refreshed so that it lapses. The same on the real engine: tests/serve/test_promotion_engine.py.
"""

from __future__ import annotations

import time

from learn.evaluate import EvalReport
from learn.lock import CycleLock
from learn.promotion import Promotion
from tests.learn.fake_gateway import FakeGateway
from tests.learn.test_cycle import BETTER, cycle, fake_scores, fake_train, setup  # noqa: F401  (setup is a fixture)


def better_than(champion: str):
    """Scores by which a new candidate beats `champion`, the candidate of a BETTER cycle included: each
    version's scores rise with its number and are the same every time (the cycle reuses a champion's
    earlier scores on the same items)."""
    def evaluate(data, *, model, **_):
        n = int(model.rsplit("-v", 1)[1]) if model.startswith("chat@") else 0
        return EvalReport(model=model, n_turns=len(data), em=0.6 + 0.05 * n, f1=0.9 + 0.02 * n)

    return evaluate


def test_a_rollback_made_while_the_cycle_trains_is_not_overridden(setup):
    settings, db, registry = setup
    v1 = cycle(settings, db, train=fake_train, evaluate=BETTER).version
    v2 = cycle(settings, db, train=fake_train, evaluate=better_than(v1)).version
    assert registry.prod().name == v2

    def train_while_an_operator_rolls_back(config, **paths):
        registry.rollback()  # v2 misbehaves in production: back to v1
        return fake_train(config, **paths)

    gateway = FakeGateway(registry)
    report = cycle(settings, db, train=train_while_an_operator_rolls_back, evaluate=better_than(v2), converge=gateway)
    assert report.champion == v2 and report.outcome == "rejected", report.text()
    assert f"production of chat is {v1}, not {v2}" in report.message
    assert registry.prod().name == v1 and gateway.loaded == []
    assert registry.get(report.version).state == "rejected"
    assert report.gate["promote"] is False and any("moved meanwhile" in r for r in report.gate["reasons"])


def test_a_candidate_the_engine_will_not_load_fails_the_cycle_and_production_stays(setup):
    settings, db, registry = setup
    prod = cycle(settings, db, train=fake_train, evaluate=BETTER).version
    report = cycle(settings, db, train=fake_train, evaluate=better_than(prod), converge=FakeGateway(registry, refuse_all=True))
    assert report.outcome == "failed" and "PromotionFailed" in report.error and f"production stays on {prod}" in report.error
    assert registry.prod().name == prod and registry.get(prod).state == "promoted"
    assert registry.get(report.version).state == "failed"  # a failed cycle marks its candidate failed
    with registry.locked("chat", None) as (s, _):
        assert [p.state for p in s.query(Promotion).order_by(Promotion.id)] == ["promoted", "fell_back"]


def test_no_gateway_to_load_the_candidate_fails_the_cycle_after_the_wait(setup):
    settings, db, registry = setup
    settings.learn.promotion_wait_s = 0.5
    report = cycle(settings, db, train=fake_train, evaluate=BETTER, converge=lambda: None)
    assert report.outcome == "failed" and "no gateway loaded" in report.error
    assert registry.prod() is None


def test_training_gets_what_is_left_of_the_cycle_timeout(setup):
    settings, db, registry = setup
    settings.learn.cycle_timeout_s = 120
    seen = []

    def train(config, **paths):
        seen.append(paths.pop("timeout"))
        return fake_train(config, **paths)

    assert cycle(settings, db, train=train, evaluate=BETTER).outcome == "promoted"
    assert 60 < seen[0] <= 120


def test_a_cycle_past_its_timeout_does_not_promote(setup):
    settings, db, registry = setup
    settings.learn.cycle_timeout_s = 0.5

    def slow(config, **paths):
        time.sleep(1.0)  # a training child that does not honour its timeout
        return fake_train(config, **paths)

    report = cycle(settings, db, train=slow, evaluate=BETTER)
    assert report.outcome == "failed" and "learn.cycle_timeout_s" in report.error
    assert registry.prod() is None


def test_the_lock_of_a_hung_cycle_is_no_longer_refreshed_and_lapses(setup):
    _, db, _ = setup
    hung = CycleLock(db, ttl_s=0.5, max_hold_s=0.3)
    assert hung.acquire() and hung.held()
    with hung.heartbeat(every_s=0.05):
        time.sleep(0.4)  # past max_hold_s: the heartbeat gives up
        assert hung.overdue() and not hung.refresh() and not hung.held()
        assert not CycleLock(db).acquire()  # ... until its lease lapses one TTL later
        time.sleep(0.6)
        assert CycleLock(db).acquire()

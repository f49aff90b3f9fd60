"""The learner's and the registry's figures, read from the store at scrape time (StoreMetrics).

    pytest tests/serve/test_metrics.py

Cycles are `learner_cycle` rows as the learner writes them, in another process as far as the
gateway knows; promotions and rollbacks go through the real registry, whoever makes them.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlmodel import Session

from feedback.db import make_db
from learn.cycle import LearnerCycle
from learn.registry import Registry
from serve.metrics import StoreMetrics, render

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture
def db(tmp_path):
    return make_db(f"sqlite:///{tmp_path / 'db.sqlite'}")


def scraped(*collectors) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every tunewheel learner/registry sample."""
    body = render(*collectors)[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples
            if s.name.startswith(("tunewheel_learner_", "tunewheel_promotions", "tunewheel_rollbacks", "tunewheel_live_",
                                  "tunewheel_canary_"))}


def cycle(db, outcome: str, minutes: int, **columns) -> None:
    with Session(db) as s:
        s.add(LearnerCycle(trigger="interval", outcome=outcome, started_at=T0 + timedelta(minutes=minutes - 1),
                           finished_at=T0 + timedelta(minutes=minutes), **columns))
        s.commit()


def test_every_series_exists_at_zero_before_the_first_cycle(db):
    figures = scraped(StoreMetrics(db))
    for outcome in ("promoted", "rejected", "skipped", "failed"):
        assert figures[("tunewheel_learner_cycles_total", (("outcome", outcome),))] == 0
        assert figures[("tunewheel_learner_last_cycle_timestamp_seconds", (("outcome", outcome),))] == 0
    for role in ("candidate", "champion"):
        for metric in ("em", "f1"):
            assert figures[("tunewheel_learner_eval_score", (("metric", metric), ("role", role)))] == 0
    for split in ("train", "heldout"):
        assert figures[("tunewheel_learner_dataset_examples", (("split", split),))] == 0
    assert figures[("tunewheel_learner_training_duration_seconds", ())] == 0
    for kind in ("chat", "restyler"):
        assert figures[("tunewheel_promotions_total", (("kind", kind),))] == 0
        assert figures[("tunewheel_rollbacks_total", (("kind", kind),))] == 0
    assert figures[("tunewheel_canary_share", ())] == 0
    assert figures[("tunewheel_live_decisions_total", (("decision", "rollback"), ("phase", "probation"), ("rule", "worse")))] == 0
    assert figures[("tunewheel_live_ratings", (("arm", "candidate"), ("phase", "canary")))] == 0


def test_cycles_by_outcome_and_the_figures_of_the_last_cycle_that_measured_them(db, tmp_path):
    registry = Registry(db)
    name = registry.new_version_name("chat")
    (tmp_path / name).mkdir()
    registry.register(name, kind="chat", path=tmp_path / name)
    cycle(db, "rejected", 1, train_examples=30, heldout_items=4, champion_scores={"em": 0.1, "f1": 0.2, "n_turns": 4},
          candidate_scores={"em": 0.05, "f1": 0.1, "n_turns": 4})
    cycle(db, "promoted", 2, train_examples=40, heldout_items=5, version=name, train_metrics={"duration_s": 12.5},
          champion_scores={"em": 0.1, "f1": 0.2, "n_turns": 5}, candidate_scores={"em": 0.5, "f1": 0.6, "n_turns": 5})
    cycle(db, "skipped", 3, message="too few examples")  # measures nothing: the gauges keep the last cycle's
    cycle(db, "failed", 4, error="boom")
    with Session(db) as s:
        s.add(LearnerCycle(trigger="manual"))  # still running: counted once it ends
        s.commit()
    figures = scraped(StoreMetrics(db))
    assert figures[("tunewheel_learner_cycles_total", (("outcome", "promoted"),))] == 1
    assert figures[("tunewheel_learner_cycles_total", (("outcome", "skipped"),))] == 1
    assert figures[("tunewheel_learner_cycles_total", (("outcome", "failed"),))] == 1
    failed_at = figures[("tunewheel_learner_last_cycle_timestamp_seconds", (("outcome", "failed"),))]
    assert failed_at == (T0 + timedelta(minutes=4)).timestamp()
    assert figures[("tunewheel_learner_eval_score", (("metric", "f1"), ("role", "candidate")))] == 0.6
    assert figures[("tunewheel_learner_eval_score", (("metric", "em"), ("role", "champion")))] == 0.1
    assert figures[("tunewheel_learner_dataset_examples", (("split", "train"),))] == 40
    assert figures[("tunewheel_learner_dataset_examples", (("split", "heldout"),))] == 5
    assert figures[("tunewheel_learner_training_duration_seconds", ())] == 12.5


def test_promotions_and_rollbacks_count_whoever_made_them(db, tmp_path):
    registry = Registry(db)
    names = []
    for kind, style in (("chat", None), ("chat", None), ("restyler", "pirate")):
        name = registry.new_version_name(kind, style)
        (tmp_path / name).mkdir()
        registry.register(name, kind=kind, style=style, path=tmp_path / name)
        names.append(name)
    for name in names:
        registry.promote(name)  # as `tunewheel adapters promote`, the learner or the admin route does
    registry.rollback("chat")
    figures = scraped(StoreMetrics(db))
    assert figures[("tunewheel_promotions_total", (("kind", "chat"),))] == 2
    assert figures[("tunewheel_promotions_total", (("kind", "restyler"),))] == 1
    assert figures[("tunewheel_rollbacks_total", (("kind", "chat"),))] == 1
    assert figures[("tunewheel_rollbacks_total", (("kind", "restyler"),))] == 0


def test_an_unreadable_store_leaves_only_its_own_series_out(tmp_path):
    broken = create_engine(f"sqlite:///{tmp_path / 'missing' / 'nope.db'}")
    body = render(StoreMetrics(broken))[0].decode()
    assert "tunewheel_requests_total" in body or "tunewheel_engine_up" in body
    assert "tunewheel_learner_cycles_total" not in body


def test_the_live_canary_and_each_automatic_decision_with_its_rule(db, tmp_path):
    from learn.live import LiveTrials, start_canary
    from learn.canary import CanarySettings
    from tests.learn.test_live import answered

    registry = Registry(db)
    names = []
    for _ in range(3):
        names.append(registry.new_version_name("chat"))
        (tmp_path / names[-1]).mkdir()
        registry.register(names[-1], kind="chat", path=tmp_path / names[-1])
    v1, v2, v3 = names
    registry.promote(v1, expected=None)
    answered(registry, v1, n=60, up_rate=0.9, at=datetime.now(timezone.utc) - timedelta(hours=1))
    registry.promote(v2, expected=v1)
    answered(registry, v2, n=60, up_rate=0.1)
    settings = CanarySettings(min_ratings=20, min_requests=20)
    LiveTrials(registry, settings, base_name="base", promote=lambda *a: None).check()  # probation rolls v2 back
    figures = scraped(StoreMetrics(db))
    assert figures[("tunewheel_live_decisions_total", (("decision", "rollback"), ("phase", "probation"), ("rule", "worse")))] == 1
    assert figures[("tunewheel_rollbacks_total", (("kind", "chat"),))] == 1 and figures[("tunewheel_canary_share", ())] == 0
    start_canary(registry, v3, share=0.1, expected=v1)
    answered(registry, v3, n=7, up_rate=1.0)
    LiveTrials(registry, settings, base_name="base", promote=lambda *a: None).check()  # too few ratings: continue
    figures = scraped(StoreMetrics(db))
    assert figures[("tunewheel_canary_share", ())] == 0.1
    assert figures[("tunewheel_live_ratings", (("arm", "candidate"), ("phase", "canary")))] == 7
    assert figures[("tunewheel_live_up_rate", (("arm", "candidate"), ("phase", "canary")))] == 1.0

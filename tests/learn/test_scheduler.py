"""The learner's scheduler: which jobs a config makes, the new-ratings trigger, one cycle at a time.

    pytest tests/learn/test_scheduler.py

Cycles are replaced by a recording `run` (the Learner gets a plain callable); the lock across
processes is tested with real cycles in tests/learn/test_cycle.py. The in-process learner of
`tunewheel serve --with-learner` converges serving through a callable built where the gateway
is assembled (serve/cli_serve.py), tested here because it is the learner's wiring.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlmodel import Session

from feedback.models import Conversation, Turn, utcnow
from feedback.db import make_db
from learn.cycle import LearnerCycle
from learn.scheduler import Learner, build_scheduler, new_rated_turns, run_forever
from learn.settings import ScheduleSettings
from serve.settings import load_settings


class Recorder:
    def __init__(self, hold_s: float = 0.0):
        self.triggers: list[str] = []
        self.running = 0
        self.max_running = 0
        self.hold_s = hold_s
        self.lock = threading.Lock()

    def __call__(self, trigger: str) -> LearnerCycle:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.triggers.append(trigger)
        time.sleep(self.hold_s)
        with self.lock:
            self.running -= 1
        return LearnerCycle(trigger=trigger, outcome="skipped", message="recorded")


@pytest.fixture
def db(tmp_path):
    return make_db(load_settings(None, data_dir=tmp_path).store_url)


def _rate(db, n: int, *, at=None) -> None:
    at = at or utcnow()
    with Session(db) as s:
        conv = Conversation(id=f"c-{at.timestamp()}")
        s.add(conv)
        for i in range(n):
            s.add(Turn(id=f"t-{at.timestamp()}-{i}", conversation_id=conv.id, seq=i, alias="chat", adapter_version="base",
                       request_messages=[{"role": "user", "content": "hi"}], answer="hello", thread_hash="h",
                       rating="up", rated_at=at))
        s.commit()


def test_jobs_follow_the_config(db):
    schedule = ScheduleSettings(cron="0 3 * * *", min_new_ratings=5)
    cron = build_scheduler(schedule, Learner(Recorder(), db=db, schedule=schedule))
    jobs = {j.id: j for j in cron.get_jobs()}
    assert set(jobs) == {"learner-cycle", "learner-ratings"}
    assert "hour='3'" in str(jobs["learner-cycle"].trigger)
    for job in jobs.values():
        assert job.coalesce is True and job.max_instances == 1 and job.misfire_grace_time > 0

    nothing = ScheduleSettings()
    none = build_scheduler(nothing, Learner(Recorder(), db=db, schedule=nothing), blocking=True)
    assert none.get_jobs() == []
    with pytest.raises(ValueError, match="no learner schedule"):
        run_forever(none)


def test_new_ratings_trigger_counts_only_ratings_since_the_last_cycle(db):
    run = Recorder()
    learner = Learner(run, db=db, schedule=ScheduleSettings(min_new_ratings=3))

    _rate(db, 2, at=utcnow() - timedelta(hours=2))
    learner.check_ratings()
    assert run.triggers == []  # 2 < 3

    _rate(db, 1, at=utcnow() - timedelta(hours=2))
    learner.check_ratings()
    assert run.triggers == ["ratings"]
    assert learner.last_cycle.message == "recorded"

    with Session(db) as s:  # a cycle ran an hour ago: the three older ratings no longer count
        s.add(LearnerCycle(started_at=utcnow() - timedelta(hours=1), outcome="promoted"))
        s.commit()
    assert new_rated_turns(db) == 0
    learner.check_ratings()
    assert run.triggers == ["ratings"]
    _rate(db, 3)
    assert new_rated_turns(db) == 3


def test_a_crashing_run_is_logged_not_raised(db):
    def crash(trigger):
        raise RuntimeError("boom")

    assert Learner(crash, db=db, schedule=ScheduleSettings()).cycle("cron") is None


def test_a_slow_cycle_never_overlaps_the_next_tick(db):
    schedule = ScheduleSettings(interval_minutes=0.001)  # a tick every 60 ms, cycles of 300 ms
    run = Recorder(hold_s=0.3)
    scheduler = build_scheduler(schedule, Learner(run, db=db, schedule=schedule))
    scheduler.start()
    try:
        deadline = time.monotonic() + 30
        while len(run.triggers) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.shutdown(wait=True)
    assert len(run.triggers) >= 3
    assert run.max_running == 1


def test_serve_with_learner_schedules_the_configured_jobs(tmp_path, db):
    from serve.cli_serve import start_learner

    settings = load_settings(None, data_dir=tmp_path, learn={"schedule": {"min_new_ratings": 10, "check_seconds": 3600}})
    scheduler = start_learner(settings, db, converge=lambda: None)
    try:
        # the live trials (canary, probation) are checked on a thread of their own, beside any cycle
        jobs = {j.id: j for j in scheduler.get_jobs()}
        assert sorted(jobs) == ["learner-live", "learner-ratings"] and jobs["learner-live"].executor == "live"
    finally:
        scheduler.shutdown(wait=False)

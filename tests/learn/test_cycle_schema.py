"""The learner's tables in the database match learn/cycle.py and learn/lock.py, and migration 0004
adds the cycle's report columns to a store that already has cycles.

    pytest tests/learn/test_cycle_schema.py
"""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlmodel import Session, SQLModel

from feedback.db import make_db, migrate
from learn.cycle import LearnerCycle
from learn.lock import LearnerLock

LEARNER_TABLES = {LearnerCycle.__tablename__, LearnerLock.__tablename__}


def _table(diff) -> str | None:
    diff = diff[0] if isinstance(diff, list) else diff
    obj = diff[1]
    return getattr(getattr(obj, "table", None), "name", None) or getattr(obj, "name", None) or diff[2]


def test_migrated_store_matches_the_learner_tables(tmp_path):
    db = make_db(f"sqlite:///{tmp_path}/tunewheel.db")
    with db.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    assert [d for d in diffs if _table(d) in LEARNER_TABLES] == []


def test_0004_keeps_old_cycles_and_adds_the_report_columns(tmp_path):
    url = f"sqlite:///{tmp_path}/tunewheel.db"
    db = create_engine(url)
    migrate(db, "0003")
    with db.begin() as conn:
        conn.execute(text("INSERT INTO learner_cycle (started_at, trigger, outcome, version, champion_scores) "
                          "VALUES ('2025-01-01 03:00:00', 'cron', 'promoted', 'chat-v0001', '{\"em\": 0.5, \"f1\": 0.6, \"n_turns\": 4}')"))
    migrate(db, "head")
    assert {"snapshot", "gate", "train_metrics", "timings"} <= {c["name"] for c in inspect(db).get_columns("learner_cycle")}
    with Session(make_db(url)) as s:
        old = s.get(LearnerCycle, 1)
    assert (old.trigger, old.outcome, old.version, old.champion_scores["f1"]) == ("cron", "promoted", "chat-v0001", 0.6)
    assert old.gate is None and old.timings is None
    assert "PROMOTED" in old.text()

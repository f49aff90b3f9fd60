"""Tests of the store's database setup: migrations, the schema they give, the migrate lock.

    pytest tests/feedback/test_db.py                 # SQLite only
    pytest tests/feedback/test_db.py -m postgres     # the same on a real PostgreSQL
"""

from __future__ import annotations

import multiprocessing

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from feedback import models  # noqa: F401  (the tables compared with the migrated schema)
from feedback.db import MIGRATIONS_DIR, alembic_config, make_db
from tests.feedback.turns import count_turns, turn, user, write

TURN_LOG_TABLES = {"conversation", "turn", "feedback", "deletion", "store_secret"}


def schema_drift(engine):
    """Differences between the migrated database and feedback/models.py, for the turn log's tables."""

    def table_of(d):
        d = d[0] if isinstance(d, list) else d
        obj = d[1]
        return getattr(getattr(obj, "table", None), "name", None) or getattr(obj, "name", None) or d[2]

    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    return [d for d in diffs if table_of(d) in TURN_LOG_TABLES]


def head_revision(engine):
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def test_make_db_creates_migrated_sqlite_in_wal_mode(tmp_path, db):
    assert (tmp_path / "sub" / "dir" / "tunewheel.db").exists()
    assert TURN_LOG_TABLES <= set(inspect(db).get_table_names())
    with db.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision(db)
    assert schema_drift(db) == []


def test_make_db_again_keeps_the_data(tmp_path, db):
    write(db, turn("t1", [user("hi")], "hello"))
    again = make_db(f"sqlite:///{tmp_path}/sub/dir/tunewheel.db")
    assert count_turns(again) == 1


def _migrate_in_child(url):
    make_db(url).dispose()


def test_two_processes_migrating_at_once_both_succeed(tmp_path):
    url = f"sqlite:///{tmp_path}/race.db"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_migrate_in_child, args=(url,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert count_turns(make_db(url)) == 0


def test_migration_files_ship_with_the_package():
    found = {p.name for p in (MIGRATIONS_DIR / "versions").glob("0*.py")}
    assert "0001_turn_log.py" in found
    assert (MIGRATIONS_DIR / "script.py.mako").exists()
    assert (MIGRATIONS_DIR / "env.py").exists()


@pytest.mark.postgres
def test_postgres_migrates_to_the_models_schema(pg_fresh_url):
    db = make_db(pg_fresh_url)
    make_db(pg_fresh_url).dispose()  # idempotent
    assert schema_drift(db) == []
    with db.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision(db)
    db.dispose()


@pytest.mark.postgres
def test_postgres_two_processes_migrating_at_once(pg_fresh_url):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_migrate_in_child, args=(pg_fresh_url,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    db = make_db(pg_fresh_url)
    assert count_turns(db) == 0
    db.dispose()

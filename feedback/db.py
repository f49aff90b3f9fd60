"""The store's database: open it by URL, with its schema migrated to the newest revision.

    db = make_db("sqlite:///.tunewheel/tunewheel.db")   # or postgresql+psycopg://user@host/db
    with Session(db) as session: ...
    migrate(db, "0002")                                  # tests: an older schema

`make_db` brings the schema to the newest Alembic migration (feedback/migrations) every time it
is called; that is cheap when nothing is to do, and a cross-process lock keeps two processes
(two gateway replicas, a gateway and a learner) from migrating at once. Every package's tables
(the turn log here, the registry and the learner's cycles in learn/) share this database and
its migrations. Nothing is opened at import time.
"""

from __future__ import annotations

import fcntl
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_MIGRATE_LOCK = zlib.crc32(b"tunewheel-migrate")  # pg_advisory_lock key


def make_db(url: str) -> Engine:
    """An engine for `url` with the schema migrated to the newest revision.

    SQL parameters (prompts, answers) are hidden from errors and logs. SQLite: the parent folder is created, WAL journal, foreign keys on, a 5 s busy timeout, and
    the connection may be used from the writer's thread. Postgres: `postgresql://` means psycopg 3.
    """
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() == "sqlite":
        engine = _sqlite_engine(u)
    else:
        engine = create_engine(u, pool_pre_ping=True, hide_parameters=True)
    migrate(engine)
    return engine


def _sqlite_engine(u) -> Engine:
    memory = u.database in (None, "", ":memory:")
    if not memory and not u.database.startswith("file:"):
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 5}, "hide_parameters": True}
    if memory:  # one shared connection, or every session would see its own empty database
        kwargs["poolclass"] = StaticPool
    engine = create_engine(u, **kwargs)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()

    return engine


def alembic_config(engine: Engine, connection=None):
    """The Alembic config of the store, built in code (there is no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Run Alembic `upgrade revision` on `engine`, one process at a time."""
    from alembic import command

    with _migrate_lock(engine) as conn:
        command.upgrade(alembic_config(engine, conn), revision)
        conn.commit()


@contextmanager
def _migrate_lock(engine: Engine):
    """A connection held under a cross-process lock: an advisory lock on Postgres, a lock file
    next to the SQLite database (never the database file itself: closing any descriptor of it
    would drop SQLite's own locks), taken before connecting so only one process turns on WAL."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with open(f"{engine.url.database}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with engine.connect() as conn:
                    yield conn
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    with engine.connect() as conn:
        if engine.dialect.name != "postgresql":
            yield conn
            return
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
        conn.commit()
        try:
            yield conn
        finally:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATE_LOCK})
            conn.commit()

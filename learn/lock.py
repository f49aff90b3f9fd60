"""The learner's database lock: one learner cycle at a time across every process and replica.

    lock = CycleLock(db)                     # db: a migrated sqlalchemy Engine (feedback.db.make_db)
    if lock.acquire():
        try:
            with lock.heartbeat():           # refresh the lease while a long cycle runs
                ...
        finally:
            lock.release()
    else:
        print(lock.current_holder())         # "host:pid:tag since 2025-01-01 03:00:00 UTC"

A lock is a lease row in `learner_lock` (migration 0003): taking it is one INSERT (a concurrent
creator fails on the primary key) or one UPDATE of an expired row, so it is atomic on SQLite and
Postgres alike; a crashed holder's lease lapses after `LOCK_TTL_S`, and a live holder refreshes it.
learn/cycle.py takes it around every cycle; tests/learn/test_cycle.py checks that it is exclusive.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

from feedback.models import utcnow

log = logging.getLogger("tunewheel.learn")

LOCK_TTL_S = 900.0


class LearnerLock(SQLModel, table=True):
    __tablename__ = "learner_lock"
    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=200)
    acquired_at: datetime
    expires_at: datetime


class CycleLock:
    """A lease row in `learner_lock`: atomic on SQLite and Postgres, expires if its holder dies."""

    def __init__(self, db: Engine, name: str = "learner", ttl_s: float = LOCK_TTL_S):
        self.db, self.name, self.ttl = db, name, timedelta(seconds=ttl_s)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()

    def acquire(self) -> bool:
        table = LearnerLock.__table__
        now = utcnow()
        values = {"holder": self.holder, "acquired_at": now, "expires_at": now + self.ttl}
        with self.db.begin() as conn:  # take over an expired lease ...
            stale = conn.execute(update(table).where(table.c.name == self.name, table.c.expires_at < now).values(**values))
            if stale.rowcount == 1:
                return True
        try:  # ... or create the lease; a concurrent creator makes this fail
            with self.db.begin() as conn:
                conn.execute(insert(table).values(name=self.name, **values))
            return True
        except IntegrityError:
            return False

    def current_holder(self) -> str | None:
        with Session(self.db) as s:
            row = s.get(LearnerLock, self.name)
            return f"{row.holder} since {row.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if row else None

    def refresh(self) -> bool:
        table = LearnerLock.__table__
        with self.db.begin() as conn:
            r = conn.execute(update(table).where(table.c.name == self.name, table.c.holder == self.holder)
                             .values(expires_at=utcnow() + self.ttl))
            return r.rowcount == 1

    def release(self) -> None:
        self._stop.set()
        table = LearnerLock.__table__
        with self.db.begin() as conn:
            conn.execute(delete(table).where(table.c.name == self.name, table.c.holder == self.holder))

    @contextmanager
    def heartbeat(self, every_s: float = 60.0):
        """Refresh the lease while the body runs (training takes longer than the TTL)."""

        def beat() -> None:
            while not self._stop.wait(every_s):
                if not self.refresh():
                    log.error("learner lock %s was lost (expired and taken over?)", self.name)

        thread = threading.Thread(target=beat, name="learner-lock", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()

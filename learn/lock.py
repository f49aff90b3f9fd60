"""The learner's database lock: one learner cycle at a time across every process and replica.

    lock = CycleLock(db, max_hold_s=6 * 3600)   # db: a migrated sqlalchemy Engine (feedback.db.make_db)
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
Postgres alike; a crashed holder's lease lapses after `LOCK_TTL_S`, and a live holder refreshes it,
but only for `max_hold_s` after it took the lock (learn.cycle_timeout_s): a cycle hung past that
(a stuck evaluation, a child that ignores its timeout) is given up, its lease lapses one TTL later,
and another learner may start. `held()` tells the holder whether it still has the lock.
learn/cycle.py takes it around every cycle; tests/learn/test_cycle.py checks that it is exclusive.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
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

    def __init__(self, db: Engine, name: str = "learner", ttl_s: float = LOCK_TTL_S, max_hold_s: float | None = None):
        self.db, self.name, self.ttl = db, name, timedelta(seconds=ttl_s)
        self.max_hold_s = max_hold_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._acquired: float | None = None  # time.monotonic() when this holder took the lock

    def acquire(self) -> bool:
        table = LearnerLock.__table__
        now = utcnow()
        values = {"holder": self.holder, "acquired_at": now, "expires_at": now + self.ttl}
        with self.db.begin() as conn:  # take over an expired lease ...
            stale = conn.execute(update(table).where(table.c.name == self.name, table.c.expires_at < now).values(**values))
        if stale.rowcount != 1:
            try:  # ... or create the lease; a concurrent creator makes this fail
                with self.db.begin() as conn:
                    conn.execute(insert(table).values(name=self.name, **values))
            except IntegrityError:
                return False
        self._acquired = time.monotonic()
        return True

    def overdue(self) -> bool:
        """Held longer than `max_hold_s`: no longer refreshed, so it lapses."""
        return self.max_hold_s is not None and self._acquired is not None and time.monotonic() - self._acquired > self.max_hold_s

    def held(self) -> bool:
        """Whether this holder still has the lock (not overdue, not lapsed and taken over)."""
        return not self.overdue() and self.refresh()

    def current_holder(self) -> str | None:
        with Session(self.db) as s:
            row = s.get(LearnerLock, self.name)
            return f"{row.holder} since {row.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if row else None

    def refresh(self) -> bool:
        """Extend the lease by one TTL; False when it is no longer ours, or held past `max_hold_s`."""
        if self.overdue():
            return False
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
                if self.overdue():
                    log.error("learner lock %s has been held for over %g s: the cycle is given up, the lock lapses "
                              "within %g s (learn.cycle_timeout_s)", self.name, self.max_hold_s, self.ttl.total_seconds())
                    return
                if not self.refresh():
                    log.error("learner lock %s was lost (expired and taken over?)", self.name)

        thread = threading.Thread(target=beat, name="learner-lock", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()

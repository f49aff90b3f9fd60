"""The turn writer: every submitted turn reaches the database once, through database errors,
bad values and a SIGKILL; prompts never reach the logs.

    pytest tests/feedback/test_writer.py
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlmodel import Session, select

from feedback.db import make_db
from feedback.models import Turn
from feedback.writer import TurnWriter, without_nul
from tests.feedback.turns import count_turns, turn, user, write

ROOT = Path(__file__).resolve().parents[2]


def test_close_writes_every_submitted_turn(db, tmp_path):
    pending = []
    writer = TurnWriter(db, tmp_path / "spool", batch_size=64, on_pending=pending.append).start()
    for i in range(500):
        writer.submit(turn(f"t{i}", [user(f"question {i}")], f"answer {i}"))
    assert writer.close(timeout=60)
    assert count_turns(db) == 500
    assert pending[-1] == 0 and max(pending) > 0
    assert not list((tmp_path / "spool").rglob("*.seg"))  # all written: the spool is empty


def test_flush_and_close_work_on_a_writer_never_started(db):
    writer = TurnWriter(db)
    writer.submit(turn("t1", [user("hi")], "hello"))
    assert writer.flush(timeout=30)
    assert count_turns(db) == 1
    writer.submit(turn("t2", [user("hi")], "hello"))
    assert writer.close(timeout=30)
    assert count_turns(db) == 2
    with pytest.raises(RuntimeError):
        writer.submit(turn("t3", [user("hi")], "hello"))


def test_a_flush_is_not_kept_waiting_by_the_linger_of_its_small_batches(db, tmp_path):
    # 5 turns in batches of 2: the last batch is small, and a writer that lingers a minute for
    # more turns would keep the flush waiting; a flush hurries every batch until it returns
    writer = TurnWriter(db, tmp_path / "spool", batch_size=2, linger_s=60)
    for fut in [writer.submit(turn(f"t{i}", [user(f"question {i}")], f"answer {i}")) for i in range(5)]:
        fut.result(timeout=30)  # spooled before the writer starts: it finds a backlog
    assert writer.flush(timeout=20)
    assert count_turns(db) == 5
    assert writer.close(timeout=20)


async def test_asubmit_returns_once_spooled_and_wait_written_once_stored(db):
    writer = TurnWriter(db)  # not started: the turn reaches the spool, not the database
    await writer.asubmit(turn("t1", [user("hi")], "hello"))
    assert writer.spool.pending_bytes > 0
    assert await writer.wait_written("t1", timeout=0.05) is False
    writer.start()
    assert await writer.wait_written("t1", timeout=30) is True
    with Session(db) as s:
        assert s.get(Turn, "t1").answer == "hello"
    assert await writer.wait_written("never-submitted", timeout=0) is True
    writer.close(timeout=30)


def test_a_repeated_id_is_stored_once(db):
    writer = TurnWriter(db)
    writer.submit(turn("dup", [user("first")], "kept"))
    writer.submit(turn("dup", [user("second")], "not stored again"))
    writer.submit(turn("other", [user("x")], "y"))
    writer.start().flush(timeout=30)
    writer.submit(turn("dup", [user("third")], "not stored again"))
    assert writer.close(timeout=30)
    with Session(db) as s:
        assert s.get(Turn, "dup").answer == "kept"
        assert {t.id for t in s.exec(select(Turn))} == {"dup", "other"}


def test_a_value_json_cannot_hold_is_stored_as_text(db):
    writer = TurnWriter(db).start()
    writer.submit(turn("odd", [user("a")], "b", params={"not json": object()}))
    assert writer.close(timeout=30)
    with Session(db) as s:
        assert s.get(Turn, "odd").params["not json"].startswith("<object object")


def test_a_turn_the_database_refuses_is_quarantined_not_dropped_and_not_logged(db, tmp_path, caplog):
    @event.listens_for(db, "before_cursor_execute")
    def refuse(conn, cursor, statement, parameters, context, executemany):
        # the bad turn's own text: "bad" alone also matches random hex ids of the good turns
        if statement.startswith("INSERT INTO turn") and "TOP-SECRET-PROMPT" in str(parameters):
            raise sqlite3.IntegrityError("NOT NULL constraint failed: turn.new_column")  # a newer schema

    quarantined = []
    writer = TurnWriter(db, tmp_path / "spool", on_quarantine=lambda: quarantined.append(1))
    writer.submit(turn("good1", [user("a")], "b"))
    writer.submit(turn("bad", [user("TOP-SECRET-PROMPT")], "TOP-SECRET-ANSWER"))
    writer.submit(turn("good2", [user("c")], "d"))
    with caplog.at_level(logging.DEBUG):
        assert writer.start().close(timeout=30)
    with Session(db) as s:
        assert {t.id for t in s.exec(select(Turn))} == {"good1", "good2"}
    assert quarantined == [1]
    [entry] = [json.loads(line) for line in writer.quarantine.path.read_text().splitlines()]
    assert entry["turn"]["id"] == "bad" and entry["turn"]["answer"] == "TOP-SECRET-ANSWER"
    assert entry["error"].startswith("IntegrityError: NOT NULL constraint failed")
    assert "quarantined" in caplog.text and "TOP-SECRET" not in caplog.text


def test_the_writer_survives_a_quarantine_it_cannot_write(db, monkeypatch):
    from feedback.spool import Quarantine

    real_put, failures = Quarantine.put, iter([True])

    def put(self, error, **kw):
        if next(failures, False):
            raise OSError(28, "No space left on device")
        real_put(self, error, **kw)

    monkeypatch.setattr(Quarantine, "put", put)
    writer = TurnWriter(db, backoff_s=(0.01,))
    odd = turn("odd", [user("x")], "y")
    odd.finish_reason = "f" * 100
    writer.submit(odd)
    writer.submit(turn("fine", [user("x")], "y"))
    assert writer.start().close(timeout=30)
    assert count_turns(db) == 1 and len(writer.quarantine.path.read_text().splitlines()) == 1


def test_a_turn_that_breaks_its_own_schema_is_quarantined_whole(db):
    quarantined = []
    writer = TurnWriter(db, on_quarantine=lambda: quarantined.append(1)).start()
    odd = turn("odd", [user("x")], "y")
    odd.finish_reason = "f" * 100  # assigned after validation, as the relay assigns: read back, it fails it
    writer.submit(odd)
    writer.submit(turn("fine", [user("x")], "y"))
    assert writer.close(timeout=30)
    assert count_turns(db) == 1 and quarantined == [1]
    [entry] = [json.loads(line) for line in writer.quarantine.path.read_text().splitlines()]
    assert entry["error"] == "unreadable record: ValidationError" and '"id":"odd"' in entry["raw"]


def test_database_errors_are_retried_until_the_turn_is_written(db):
    failures = iter([True, True])

    @event.listens_for(db, "before_cursor_execute")
    def locked(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO turn") and next(failures, False):
            raise sqlite3.OperationalError("database is locked")  # as SQLite says it, wrapped by SQLAlchemy

    errors = []
    writer = TurnWriter(db, backoff_s=(0.01,), on_error=lambda: errors.append(1)).start()
    writer.submit(turn("t1", [user("hi")], "hello"))
    assert writer.close(timeout=30)
    assert len(errors) == 2 and count_turns(db) == 1


def test_close_is_bounded_and_the_next_writer_writes_what_is_left(db, tmp_path):
    down = [True]

    @event.listens_for(db, "before_cursor_execute")
    def unavailable(conn, cursor, statement, parameters, context, executemany):
        if down[0] and statement.startswith("INSERT INTO turn"):
            raise sqlite3.OperationalError("unable to open database file")

    first = TurnWriter(db, tmp_path / "spool", backoff_s=(0.05,)).start()
    for i in range(10):
        first.submit(turn(f"t{i}", [user(f"q{i}")], "a")).result(timeout=10)
    started = time.monotonic()
    assert first.close(timeout=1) is False
    assert time.monotonic() - started < 5
    down[0] = False
    second = TurnWriter(db, tmp_path / "spool").start()
    assert second.pending == 10
    assert second.close(timeout=30)
    assert count_turns(db) == 10


CHILD = """
import sys, time
from feedback.db import make_db
from feedback.writer import TurnWriter
from tests.feedback.turns import turn, user
writer = TurnWriter(make_db(sys.argv[1]), sys.argv[2], backoff_s=(0.05,)).start()
for line in sys.stdin:
    n, prefix = line.split()
    for f in [writer.submit(turn(f"{prefix}{i}", [user(f"q{i}")], f"a{i}")) for i in range(int(n))]:
        f.result()
    if prefix == "stored":
        writer.flush()
    print("ok", flush=True)
"""


def test_turns_spooled_while_the_database_is_locked_survive_a_sigkill(tmp_path):
    """The issue's measurement: SQLite locked by another process, turns answered, the process
    SIGKILLed; after a restart every turn is in the log exactly once."""
    url, spool_dir = f"sqlite:///{tmp_path}/tunewheel.db", tmp_path / "spool"
    db = make_db(url)
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(spool_dir)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        child.stdin.write("8 stored\n")  # written to the database (and still in the spool's open file)
        child.stdin.flush()
        assert child.stdout.readline() == "ok\n"
        lock = sqlite3.connect(f"{tmp_path}/tunewheel.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        child.stdin.write("8 spooled\n")  # answered while the database is locked: only in the spool
        child.stdin.flush()
        assert child.stdout.readline() == "ok\n"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        lock.execute("ROLLBACK")
        lock.close()
    finally:
        child.kill()
    writer = TurnWriter(db, spool_dir).start()
    assert writer.close(timeout=60)
    with Session(db) as s:
        ids = sorted(t.id for t in s.exec(select(Turn)))
    assert ids == sorted([f"stored{i}" for i in range(8)] + [f"spooled{i}" for i in range(8)])
    db.dispose()


def test_the_scrubber_runs_before_the_turn_is_spooled(db, tmp_path):
    def scrub(t):
        return t.model_copy(update={"request_messages": [user("[email]")]})

    writer = TurnWriter(db, tmp_path / "spool", scrub=scrub)  # not started: the turn stays in the spool
    writer.submit(turn("p1", [user("mail me at a@b.example")], "ok")).result(timeout=10)
    assert b"a@b.example" not in b"".join(p.read_bytes() for p in (tmp_path / "spool").rglob("*.seg"))
    assert writer.start().close(timeout=30)
    with Session(db) as s:
        assert s.get(Turn, "p1").request_messages == [user("[email]")]


def test_nul_characters_are_escaped_for_postgres():
    t = turn("n1", [user("a\x00b")], "c\x00", params={"stop": ["\x00"]})
    clean = without_nul(t)
    assert clean.request_messages == [user("a\\u0000b")] and clean.answer == "c\\u0000"
    assert clean.params == {"stop": ["\\u0000"]}
    plain = turn("n2", [user("ab")], "c")
    assert without_nul(plain) is plain


@pytest.mark.postgres
def test_postgres_stores_nul_characters_and_quarantines_what_it_refuses(pg_fresh_url, tmp_path):
    db = make_db(pg_fresh_url)
    writer = TurnWriter(db, tmp_path / "spool").start()
    writer.submit(turn("nul", [user("a\x00b")], "c\x00d", params={"stop": ["\x00"]}))
    writer.submit(turn("big", [user("x")], "y", prompt_tokens=2**40))  # INTEGER: NumericValueOutOfRange
    writer.submit(turn("fine", [user("x")], "y"))
    assert writer.close(timeout=60)
    with Session(db) as s:
        assert {t.id for t in s.exec(select(Turn))} == {"nul", "fine"}
        stored = s.get(Turn, "nul")
        assert (stored.answer, stored.request_messages) == ("c\\u0000d", [user("a\\u0000b")])
    [entry] = [json.loads(line) for line in writer.quarantine.path.read_text().splitlines()]
    assert entry["turn"]["id"] == "big" and entry["error"].startswith("NumericValueOutOfRange")
    db.dispose()


def test_all_turn_fields_round_trip(db):
    created = datetime(2025, 1, 2, 3, 4, 5)  # naive: taken as UTC
    fields = dict(
        raw_answer="raw", style="pirate", params={"temperature": 0.2, "stop": ["\n"], "response_format": {"type": "json_object"}},
        prompt_tokens=5, completion_tokens=7, latency_ms=12.5, ttft_ms=3.25, finish_reason="stop",
        status="incomplete", stream=True, key_hash="k" * 64, created_at=created,
    )
    write(db, turn("t1", [user("héllo ✓")], "styled", **fields))
    writer = TurnWriter(db).start()  # the same through the spool
    writer.submit(turn("t2", [user("héllo ✓")], "styled", conversation_id="c" * 80, **fields))
    assert writer.close(timeout=30)
    with Session(db) as s:
        for turn_id in ("t1", "t2"):
            t = s.get(Turn, turn_id)
            assert (t.request_messages, t.answer, t.raw_answer, t.style) == ([user("héllo ✓")], "styled", "raw", "pirate")
            assert t.params == {"temperature": 0.2, "stop": ["\n"], "response_format": {"type": "json_object"}}
            assert (t.prompt_tokens, t.completion_tokens, t.latency_ms, t.ttft_ms) == (5, 7, 12.5, 3.25)
            assert (t.finish_reason, t.status, t.stream, t.key_hash) == ("stop", "incomplete", True, "k" * 64)
            assert t.created_at == created.replace(tzinfo=timezone.utc)


def test_a_lane_whose_gateway_is_gone_is_written_by_another(db, tmp_path, monkeypatch):
    from feedback import writer as writer_module

    monkeypatch.setattr(writer_module, "ADOPT_EVERY_S", 0.1)
    alive = TurnWriter(db, tmp_path / "spool")  # lane-0
    gone = TurnWriter(db, tmp_path / "spool")  # lane-1, never started: its turns stay in its lane
    for i in range(3):
        gone.submit(turn(f"g{i}", [user("q")], "a")).result(timeout=10)
    gone.spool.close()  # its process is gone: the lock with it, the turns still on disk
    alive.start()
    deadline = time.monotonic() + 30
    while count_turns(db) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count_turns(db) == 3 and alive.pending == 0
    assert not list(gone.spool.lane.glob("*.seg"))
    assert alive.close(timeout=30)

"""The turn writer: every submitted turn is written, in batches, through database errors.

    pytest tests/feedback/test_writer.py
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest
from sqlalchemy import event
from sqlmodel import Session, select

from feedback.models import Turn
from feedback.writer import TurnWriter
from tests.feedback.turns import count_turns, turn, user, write


def test_close_writes_every_submitted_turn(db):
    pending = []
    writer = TurnWriter(db, batch_size=64, on_pending=pending.append).start()
    for i in range(500):
        writer.submit(turn(f"t{i}", [user(f"question {i}")], f"answer {i}"))
    assert writer.close()
    assert count_turns(db) == 500
    assert pending[-1] == 0 and max(pending) > 0


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


async def test_wait_written_resolves_once_the_turn_is_stored(db):
    writer = TurnWriter(db)  # not started yet: the turn stays queued
    await writer.asubmit(turn("t1", [user("hi")], "hello"))
    assert await writer.wait_written("t1", timeout=0.05) is False
    writer.start()
    assert await writer.wait_written("t1", timeout=30) is True
    with Session(db) as s:
        assert s.get(Turn, "t1").answer == "hello"
    assert await writer.wait_written("never-submitted", timeout=0) is True
    writer.close()


def test_repeated_id_is_dropped_and_the_writer_keeps_going(db):
    errors = []
    writer = TurnWriter(db, on_error=lambda: errors.append(1))
    writer.submit(turn("dup", [user("first")], "kept"))
    writer.submit(turn("dup", [user("second")], "dropped"))
    writer.submit(turn("other", [user("x")], "y"))
    writer.start().flush(timeout=30)
    writer.submit(turn("dup", [user("third")], "dropped too"))
    writer.submit(turn("after", [user("x")], "y"))
    assert writer.close(timeout=30)
    with Session(db) as s:
        assert s.get(Turn, "dup").answer == "kept"
        assert {t.id for t in s.exec(select(Turn))} == {"dup", "other", "after"}


def test_a_turn_the_database_refuses_does_not_take_its_batch_down(db):
    errors = []
    writer = TurnWriter(db, on_error=lambda: errors.append(1))
    writer.submit(turn("good1", [user("a")], "b"))
    writer.submit(turn("bad", [user("a")], "b", params={"not json": object()}))
    writer.submit(turn("good2", [user("c")], "d"))
    assert writer.start().close(timeout=30)
    with Session(db) as s:
        assert {t.id for t in s.exec(select(Turn))} == {"good1", "good2"}
    assert len(errors) == 1


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


def test_all_turn_fields_round_trip(db):
    created = datetime(2025, 1, 2, 3, 4, 5)  # naive: taken as UTC
    write(db, turn(
        "t1", [user("héllo ✓")], "styled", raw_answer="raw", style="pirate",
        params={"temperature": 0.2, "stop": ["\n"], "response_format": {"type": "json_object"}},
        prompt_tokens=5, completion_tokens=7, latency_ms=12.5, ttft_ms=3.25, finish_reason="stop",
        status="incomplete", stream=True, key_hash="k" * 64, created_at=created,
    ))
    with Session(db) as s:
        t = s.get(Turn, "t1")
        assert (t.request_messages, t.answer, t.raw_answer, t.style) == ([user("héllo ✓")], "styled", "raw", "pirate")
        assert t.params == {"temperature": 0.2, "stop": ["\n"], "response_format": {"type": "json_object"}}
        assert (t.prompt_tokens, t.completion_tokens, t.latency_ms, t.ttft_ms) == (5, 7, 12.5, 3.25)
        assert (t.finish_reason, t.status, t.stream, t.key_hash) == ("stop", "incomplete", True, "k" * 64)
        assert t.created_at == created.replace(tzinfo=timezone.utc)

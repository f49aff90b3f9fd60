"""Reading and rating the turn log: feedback, conversation order, windows, rated-turn counts.

    pytest tests/feedback/test_queries.py                 # SQLite only
    pytest tests/feedback/test_queries.py -m postgres     # the same store on a real PostgreSQL
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import Session, select

from feedback.db import make_db
from feedback.models import Feedback, Turn
from feedback.queries import conversation_turns, iter_log, iter_turns, rated_turns, record_feedback, store_secret
from feedback.writer import TurnWriter
from tests.feedback.turns import bot, turn, user, write

BASE = datetime(2025, 1, 1, tzinfo=timezone.utc)


def rate(db, turn_id, rating, **kw):
    with Session(db) as s:
        return record_feedback(s, turn_id=turn_id, rating=rating, comment=kw.get("comment"),
                               key_hash=kw.get("key_hash"), admin=kw.get("admin", False))


def test_rating_again_replaces_the_rating_and_keeps_history(db):
    write(db, turn("t1", [user("hi")], "hello"))
    with Session(db) as s:
        first = record_feedback(s, turn_id="t1", rating="up", comment="nice", key_hash=None, admin=False)
        second = record_feedback(s, turn_id="t1", rating="down", comment=None, key_hash=None, admin=False)
        assert second.id != first.id and second.rating == "down"
        assert s.get(Turn, second.turn_id).adapter_version == "base"
    with Session(db) as s:
        t = s.get(Turn, "t1")
        assert t.rating == "down" and t.rated_at == second.created_at
        history = s.exec(select(Feedback).where(Feedback.turn_id == "t1").order_by(Feedback.id)).all()
        assert [(f.rating, f.comment) for f in history] == [("up", "nice"), ("down", None)]


def test_a_correction_is_kept_with_its_rating_and_withdrawn_by_a_later_rating_without_one(db):
    write(db, turn("t1", [user("Capital of France?")], "Lyon."))
    with Session(db) as s:
        fb = record_feedback(s, turn_id="t1", rating="down", comment=None, key_hash=None, admin=False, correction="Paris.")
        assert fb.correction == "Paris." and s.get(Turn, "t1").correction == "Paris."
        record_feedback(s, turn_id="t1", rating="up", comment=None, key_hash=None, admin=False)
    with Session(db) as s:
        assert s.get(Turn, "t1").correction is None and s.get(Turn, "t1").rating == "up"
        assert [f.correction for f in s.exec(select(Feedback).order_by(Feedback.id))] == ["Paris.", None]
    assert [r["correction"] for r in iter_log(db)] == [None]


def test_the_store_secret_is_made_once_and_kept(db, tmp_path):
    first = store_secret(db, "heldout_salt")
    assert len(first) == 64 and store_secret(db, "heldout_salt") == first
    assert make_db(f"sqlite:///{tmp_path}/sub/dir/tunewheel.db") and store_secret(db, "other") != first


def test_unknown_completion_id_is_a_lookup_error_and_a_bad_rating_a_value_error(db):
    with pytest.raises(LookupError):
        rate(db, "nope", "up")
    write(db, turn("t1", [user("hi")], "hello"))
    with pytest.raises(ValueError, match="rating must be one of"):
        rate(db, "t1", "meh")


def test_only_the_answering_key_or_an_admin_may_rate(db):
    owner, other = "a" * 64, "b" * 64
    write(db, turn("t1", [user("hi")], "hello", key_hash=owner))
    with Session(db) as s:
        with pytest.raises(PermissionError):
            record_feedback(s, turn_id="t1", rating="up", comment=None, key_hash=other, admin=False)
        with pytest.raises(PermissionError):
            record_feedback(s, turn_id="t1", rating="up", comment=None, key_hash=None, admin=False)
        assert s.get(Turn, "t1").rating is None
        record_feedback(s, turn_id="t1", rating="up", comment=None, key_hash=owner, admin=False)
        record_feedback(s, turn_id="t1", rating="down", comment=None, key_hash=other, admin=True)
        assert len(s.exec(select(Feedback)).all()) == 2


def test_incomplete_turns_can_be_rated(db):
    write(db, turn("t1", [user("hi")], "hel", status="incomplete", stream=True))
    rate(db, "t1", "up")
    with Session(db) as s:
        assert s.get(Turn, "t1").rating == "up"


def interleaved(db) -> None:
    """Two conversations of five turns each, created one minute apart, alternating."""
    turns = []
    for i in range(5):
        for conv in ("a", "b"):
            turns.append(turn(f"{conv}{i}", [user(f"{conv}{i}")], "x", conversation_id=conv,
                              created_at=BASE + timedelta(minutes=len(turns))))
    write(db, *turns)


def test_iter_turns_streams_by_conversation_and_seq_within_the_window(db):
    interleaved(db)
    with Session(db) as s:
        all_ids = [t.id for t in iter_turns(s, batch=3)]
        assert all_ids == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
        window = [t.id for t in iter_turns(s, since=BASE + timedelta(minutes=4), until=BASE + timedelta(minutes=8), batch=2)]
        assert window == ["a2", "a3", "b2", "b3"]


def test_iter_log_gives_curations_columns_in_the_same_order_and_window(db):
    interleaved(db)
    rows = list(iter_log(db, batch=3))
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    assert set(rows[0]) == {"id", "conversation_id", "seq", "created_at", "request_messages", "answer", "raw_answer",
                            "style", "status", "rating", "correction", "key_hash"}
    naive = (BASE + timedelta(minutes=4)).replace(tzinfo=None)  # what `data curate --since` passes: taken as UTC
    assert [r["id"] for r in iter_log(db, since=naive, until=BASE + timedelta(minutes=8))] == ["a2", "a3", "b2", "b3"]


def test_rated_turns_counts_turns_with_a_rating_rated_after_since(db):
    write(db, turn("t1", [user("a")], "b"), turn("t2", [user("c")], "d"), turn("t3", [user("e")], "f"))
    assert rated_turns(db) == 0
    first = rate(db, "t1", "up")
    rate(db, "t1", "down")  # rated again: still one rated turn
    rate(db, "t2", "down")
    assert rated_turns(db) == 2
    assert rated_turns(db, since=first.created_at) == 2  # t1's latest rating came after
    assert rated_turns(db, since=datetime.now(timezone.utc) + timedelta(seconds=1)) == 0


@pytest.mark.postgres
def test_postgres_writes_rates_and_reads(pg_fresh_url):
    db = make_db(pg_fresh_url)
    writer = TurnWriter(db).start()
    params = {"temperature": 0.7, "logit_bias": {"50256": -100}, "stop": ["\n\n"]}
    writer.submit(turn("p1", [user("Grüße ✓")], "hallo", params=params, key_hash="a" * 64))
    writer.submit(turn("p2", [user("Grüße ✓"), bot("hallo"), user("und?")], "mehr", key_hash="a" * 64))
    assert writer.close(timeout=60)
    with Session(db) as s:
        p1 = s.get(Turn, "p1")
        assert p1.params == params and p1.request_messages == [user("Grüße ✓")]
        assert [t.id for t in conversation_turns(s, p1.conversation_id)] == ["p1", "p2"]
        record_feedback(s, turn_id="p2", rating="up", comment=None, key_hash="a" * 64, admin=False)
        with pytest.raises(PermissionError):
            record_feedback(s, turn_id="p2", rating="up", comment=None, key_hash="b" * 64, admin=False)
    with Session(db) as s:
        assert [(t.id, t.rating) for t in iter_turns(s, batch=1)] == [("p1", None), ("p2", "up")]
    assert [(r["id"], r["rating"]) for r in iter_log(db, batch=1, since=datetime(2000, 1, 1))] == [("p1", None), ("p2", "up")]
    assert rated_turns(db) == 1 and rated_turns(db, since=datetime.now(timezone.utc)) == 0
    db.dispose()

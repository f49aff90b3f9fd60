"""Reading and rating the turn log: what the gateway, curation and the learner ask the store.

    with Session(db) as session:
        fb = record_feedback(session, turn_id="chatcmpl-1", rating="down", comment=None, key_hash=None, admin=False,
                             correction="The answer I wanted.")
        turns = conversation_turns(session, session.get(Turn, fb.turn_id).conversation_id)
    for row in iter_log(db, since=since):   # curation's input, streamed
        ...
    rated_turns(db, since=last_cycle_started)   # the learner's new-ratings trigger
    version_figures(db, "chat-v0004", since=canary_began)   # a live arm: ratings, ups, requests, errors, p95
    store_secret(db, "heldout_salt")            # a random secret made once per store

Windows (`since`, `until`) are [since, until) on the turn's creation time; a naive datetime is
taken as UTC.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import datetime
from typing import Any, get_args

import sqlalchemy
from sqlalchemy import Engine, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from feedback.models import Feedback, Rating, StoreSecret, Turn, as_utc

RATINGS = get_args(Rating)


def record_feedback(
    session: Session, *, turn_id: str, rating: str, comment: str | None, key_hash: str | None, admin: bool,
    correction: str | None = None,
) -> Feedback:
    """Store a rating (and the correction it may carry) of turn `turn_id` and make both the
    turn's current ones; commits. A rating without a correction withdraws an earlier correction.

    Raises LookupError for an unknown id, PermissionError when the turn was answered for another
    API key and the caller is not admin, ValueError for a rating other than up/down. The rated
    turn stays in `session` (`session.get(Turn, fb.turn_id)` costs no query), e.g. for its
    adapter_version. Ratings of incomplete turns are kept; curation does not train on them.
    """
    if rating not in RATINGS:
        raise ValueError(f"rating must be one of {RATINGS}, got {rating!r}")
    turn = session.get(Turn, turn_id)
    if turn is None:
        raise LookupError(f"no completion with id {turn_id!r}")
    if turn.key_hash is not None and turn.key_hash != key_hash and not admin:
        raise PermissionError(f"completion {turn_id!r} was answered for another API key")
    fb = Feedback(turn_id=turn_id, rating=rating, comment=comment, correction=correction, key_hash=key_hash)
    turn.rating, turn.rated_at, turn.correction = rating, fb.created_at, correction
    session.add(fb)
    session.add(turn)
    session.commit()
    session.refresh(fb)
    return fb


def conversation_turns(session: Session, conversation_id: str) -> list[Turn]:
    """The turns of one conversation in the order they were answered."""
    q = select(Turn).where(Turn.conversation_id == conversation_id).order_by(Turn.seq, Turn.created_at)
    return list(session.exec(q))


def _window(q, since: datetime | None, until: datetime | None):
    if since is not None:
        q = q.where(Turn.created_at >= as_utc(since))
    if until is not None:
        q = q.where(Turn.created_at < as_utc(until))
    return q


def iter_turns(
    session: Session, since: datetime | None = None, until: datetime | None = None, batch: int = 1000
) -> Iterator[Turn]:
    """Every turn created in [since, until), ordered by (conversation_id, seq), fetched `batch`
    rows at a time (a server-side cursor on Postgres) so memory does not grow with the log."""
    q = _window(select(Turn).order_by(Turn.conversation_id, Turn.seq, Turn.created_at), since, until)
    yield from session.exec(q.execution_options(yield_per=batch))


# The columns curation reads (feedback/curate.py), and nothing else.
LOG_COLUMNS = (Turn.id, Turn.conversation_id, Turn.seq, Turn.created_at, Turn.request_messages,
               Turn.answer, Turn.raw_answer, Turn.style, Turn.status, Turn.rating, Turn.correction, Turn.key_hash)


def iter_log(db: Engine, *, since: datetime | None = None, until: datetime | None = None,
             batch: int = 2000) -> Iterator[dict[str, Any]]:
    """Turns of the store ordered by (conversation_id, seq), streamed `batch` rows at a time.

    Like `iter_turns`, but only the columns curation reads, as plain dicts rather than ORM
    objects: several times faster on large logs.
    """
    q = _window(sqlalchemy.select(*LOG_COLUMNS).order_by(Turn.conversation_id, Turn.seq, Turn.created_at), since, until)
    names = [c.key for c in LOG_COLUMNS]
    with db.connect() as conn:
        for row in conn.execution_options(yield_per=batch).execute(q):
            yield dict(zip(names, row))


def rated_turns(db: Engine, *, since: datetime | None = None) -> int:
    """How many turns have a rating; with `since`, only those (last) rated after it."""
    q = select(func.count()).select_from(Turn).where(Turn.rating.is_not(None))
    if since is not None:
        q = q.where(Turn.rated_at > as_utc(since))
    with Session(db) as session:
        return session.exec(q).one()


def version_figures(db: Engine, version: str, *, since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
    """Live figures of the turns `version` answered in [since, until): rated turns and thumbs up (one
    vote per turn, its current rating), requests (turns) and errors (status `error`), and the 95th
    percentile of latency in seconds (None without turns). The canary's and probation's arms (learn/live.py)."""
    where = _window(sqlalchemy.select(func.count(), func.count(Turn.rating), func.sum(sqlalchemy.case((Turn.rating == "up", 1), else_=0)),
                                      func.sum(sqlalchemy.case((Turn.status == "error", 1), else_=0)))
                    .where(Turn.adapter_version == version), since, until)
    latencies = _window(sqlalchemy.select(Turn.latency_ms).where(Turn.adapter_version == version, Turn.latency_ms.is_not(None)),
                        since, until)
    with db.connect() as conn:
        requests, ratings, ups, errors = conn.execute(where).one()
        timed = conn.execute(latencies.with_only_columns(func.count())).scalar_one()
        # the database sorts and hands back the one row at the 95th percentile (nearest rank)
        p95 = conn.execute(latencies.order_by(Turn.latency_ms).offset(min(timed - 1, int(0.95 * timed))).limit(1)).scalar() \
            if timed else None
    p95 = p95 / 1000.0 if p95 is not None else None
    return {"ratings": ratings or 0, "ups": int(ups or 0), "requests": requests or 0, "errors": int(errors or 0), "p95_latency_s": p95}


def store_secret(db: Engine, name: str) -> str:
    """The store's secret `name` (64 hex characters), made at random the first time it is asked
    for and the same ever after, in every process that opens this store."""
    with Session(db) as session:
        row = session.get(StoreSecret, name)
        if row is not None:
            return row.value
        session.add(StoreSecret(name=name, value=secrets.token_hex(32)))
        try:
            session.commit()
        except IntegrityError:  # another process made it first: theirs stands
            session.rollback()
        return session.get(StoreSecret, name).value

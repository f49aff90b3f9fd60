"""Small builders of turns for the store's tests.

    write(db, turn("t1", [user("hi")], "hello"), turn("t2", [...], "...", key_hash="a" * 64))
"""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, select

from feedback.conversations import add_turn
from feedback.models import Turn, TurnCreate


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def turn(id: str, messages: list[dict], answer: str | None, **kw) -> TurnCreate:
    """A turn as the gateway hands it to the writer."""
    return TurnCreate(id=id, alias="chat", adapter_version="base", request_messages=messages, answer=answer, **kw)


def write(db, *turns: TurnCreate) -> list[str | None]:
    """Store `turns` in one transaction; their conversation ids (None for a dropped repeat)."""
    with Session(db) as s:
        rows = [add_turn(s, t) for t in turns]
        s.commit()
        return [r.conversation_id if r else None for r in rows]


def count_turns(db) -> int:
    with Session(db) as s:
        return s.exec(select(func.count()).select_from(Turn)).one()

"""Conversation threading: which conversation a new turn belongs to, and its place in it.

    with Session(db) as session:
        turn = add_turn(session, TurnCreate(...))    # threaded, numbered, added (not committed)
        add_turns(session, [TurnCreate(...), ...])   # the same for a batch none of which is stored
        session.commit()

A turn's `thread_hash` is the hash of its request messages plus its answer. A client that
continues a conversation sends those messages again followed by the new question, so the new
request's messages up to its last assistant message hash to the earlier turn's `thread_hash`.
A client may instead name its conversation with the `x-conversation-id` header, which wins.
Both ways stay within the caller's API key: threads are only joined between turns of the same
key, and a conversation id that another key already owns (a foreign id) starts a conversation
of the caller's own under an id derived from its key and the id it sent, so one key can never
write into another key's conversation, by repeating its words or by naming its id. `seq` is the number of turns the conversation already
had; two gateway replicas writing to one conversation at the same instant may give two turns the
same seq, which readers order by created_at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

from sqlalchemy import func, insert
from sqlmodel import Session, select

from feedback.models import Conversation, Turn, TurnCreate

log = logging.getLogger(__name__)


def text_of(content: Any) -> str:
    """Message content as text: OpenAI content parts are joined; None (tool calls) is empty."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def thread_hash(messages: list[dict[str, Any]]) -> str:
    """sha256 hex of the (role, content) list; surrounding whitespace and extra fields don't count."""
    norm = [[str(m.get("role", "")), text_of(m.get("content")).strip()] for m in messages]
    return hashlib.sha256(json.dumps(norm, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _prefix_hash(messages: list[dict[str, Any]]) -> str | None:
    """Hash of the messages up to and including the last assistant message, or None without one."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    return None if last is None else thread_hash(messages[: last + 1])


def client_conversation_id(session: Session, client_id: str, key_hash: str | None) -> str:
    """The stored id of the conversation a client names with `x-conversation-id`: its own id
    (hashed when longer than the column's 64 characters) unless another key owns a conversation
    under it; then an id derived from the caller's key and the id, the same for every later turn."""
    cid = client_id if len(client_id) <= 64 else hashlib.sha256(client_id.encode()).hexdigest()
    for attempt in range(100):  # a derived id someone else took on purpose: derive again
        owner = session.get(Conversation, cid)
        if owner is None or owner.key_hash == key_hash:
            return cid
        if attempt == 0:
            log.info("x-conversation-id %s belongs to another key: the caller's turn starts its own conversation", cid)
        cid = hashlib.sha256(f"{key_hash or ''}\x1f{client_id}\x1f{attempt}".encode()).hexdigest()
    raise RuntimeError(f"no free conversation id derived from {client_id!r}")


def conversation_for(session: Session, turn: TurnCreate) -> str:
    """The id of `turn`'s conversation: the client's, the one its messages continue, or a new one
    (added to `session`)."""
    if turn.conversation_id:
        cid = client_conversation_id(session, turn.conversation_id, turn.key_hash)
        if session.get(Conversation, cid) is None:
            session.add(Conversation(id=cid, created_at=turn.created_at, key_hash=turn.key_hash))
        return cid
    prefix = _prefix_hash(turn.request_messages)
    if prefix is not None:
        same_key = Turn.key_hash == turn.key_hash if turn.key_hash is not None else Turn.key_hash.is_(None)
        q = select(Turn.conversation_id).where(Turn.thread_hash == prefix, same_key)
        found = session.exec(q.order_by(Turn.created_at.desc()).limit(1)).first()
        if found is not None:
            return found
    cid = uuid.uuid4().hex
    session.add(Conversation(id=cid, created_at=turn.created_at, key_hash=turn.key_hash))
    return cid


def add_turn(session: Session, turn: TurnCreate) -> Turn | None:
    """Thread `turn` into its conversation and add it to `session` (flushed, not committed).
    Returns None, adding nothing, when a turn with this id is already stored."""
    if session.get(Turn, turn.id) is not None:
        log.warning("turn %s is already stored; the repeated one is dropped", turn.id)
        return None
    cid = conversation_for(session, turn)
    session.flush()
    seq = session.exec(select(func.count()).select_from(Turn).where(Turn.conversation_id == cid)).one()
    row = _row(turn, cid, seq)
    session.add(row)
    session.flush()
    return row


def add_turns(session: Session, turns: list[TurnCreate]) -> None:
    """`add_turn` for a batch of turns none of which is stored yet (the turn writer's), in fewer
    statements: a turn that starts a conversation (no `x-conversation-id`, no assistant message
    before its question: most chat turns) needs no lookup, so those go in two bulk inserts, their
    conversations and then themselves (Core inserts into the tables, not ORM objects or ORM bulk
    inserts: no per-row ORM bookkeeping), before the others are threaded one by one in order
    (they may continue one of them)."""
    fresh = [t for t in turns if not t.conversation_id and _prefix_hash(t.request_messages) is None]
    if fresh:
        cids = [uuid.uuid4().hex for _ in fresh]
        session.execute(insert(Conversation.__table__), [{"id": cid, "created_at": t.created_at, "key_hash": t.key_hash}
                                                         for cid, t in zip(cids, fresh)])
        session.execute(insert(Turn.__table__), [_values(t, cid, 0) for cid, t in zip(cids, fresh)])
    started = {id(t) for t in fresh}
    for turn in turns:
        if id(turn) not in started:
            add_turn(session, turn)


def _values(turn: TurnCreate, cid: str, seq: int) -> dict[str, Any]:
    """The stored row's columns: the turn as validated on its way in, threaded."""
    answered = [*turn.request_messages, {"role": "assistant", "content": turn.answer}]
    return {**turn.model_dump(), "conversation_id": cid, "seq": seq, "thread_hash": thread_hash(answered)}


def _row(turn: TurnCreate, cid: str, seq: int) -> Turn:
    return Turn.model_validate(_values(turn, cid, seq))

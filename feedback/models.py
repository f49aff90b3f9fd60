"""The turn log's record types: conversations, turns (one per answered request), feedback.

    turn = TurnCreate(id="chatcmpl-1", alias="chat", adapter_version="base",
                      request_messages=[{"role": "user", "content": "hi"}], answer="hello")
    writer.submit(turn)                               # feedback/writer.py stores it as a `Turn` row
    rating = FeedbackCreate.model_validate(body)      # the body of POST /v1/feedback
    FeedbackPublic.of(row)                            # its 201 answer
    Deletion(target="conversation", target_hash=..., turns=3)   # what `data forget` removed (no content)

Each thing has one set of classes, in the FastAPI full-stack template's shape: `...Base` (the
fields a caller provides), `...Create` (what comes in, validated), the table (`table=True`,
adds what the store decides) and `...Public` (what goes out). A turn's id is the completion id
the client saw; feedback points at it. `Turn.rating` and `Turn.correction` are the current rating and
correction (those of the latest feedback; a later rating without a correction withdraws it),
kept on the turn so that curation reads one table; every rating ever given stays in `Feedback`.
Schema changes go through the Alembic migrations in feedback/migrations, never `create_all`;
tests/feedback/test_db.py fails when these classes and the migrated schema disagree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import ConfigDict, field_serializer, field_validator
from sqlalchemy import JSON, Column, Index, Text
from sqlmodel import AutoString, Field, SQLModel

Status = Literal["ok", "incomplete", "error"]  # incomplete: the client left mid-stream
Rating = Literal["up", "down"]


def utcnow() -> datetime:
    """Timestamps are timezone-aware UTC: SQLModel maps `datetime` to its UTCDateTime type
    (timestamptz on Postgres), which refuses naive values and returns aware UTC ones."""
    return datetime.now(timezone.utc)


def as_utc(at: datetime) -> datetime:
    """An aware timestamp; a naive one is taken to be UTC already (what the CLI's --since gives)."""
    return at.replace(tzinfo=timezone.utc) if at.utcoffset() is None else at


class Conversation(SQLModel, table=True):
    """A thread of turns, owned by the API key that started it (None: an open gateway)."""

    id: str = Field(primary_key=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    key_hash: str | None = Field(default=None, max_length=64)


# ---------------------------------------------------------------------------------------- turn


class TurnBase(SQLModel):
    """What the gateway knows about one answered request."""

    alias: str = Field(max_length=200)
    adapter_version: str = Field(max_length=200)
    request_messages: list[dict[str, Any]] = Field(sa_type=JSON, nullable=False)
    answer: str | None = Field(default=None, sa_type=Text)  # what the client got (restyled when a style is on)
    raw_answer: str | None = Field(default=None, sa_type=Text)  # the model's answer before restyling
    style: str | None = Field(default=None, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSON, nullable=False)  # sampling parameters as sent
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    finish_reason: str | None = Field(default=None, max_length=32)
    # sa_type: SQLModel maps no Literal to a column type; the column is the VARCHAR(16) of 0001.
    status: Status = Field(default="ok", sa_type=AutoString(length=16))
    stream: bool = False
    key_hash: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, index=True)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, at: datetime) -> datetime:
        return as_utc(at)


class TurnCreate(TurnBase):
    """A turn as the gateway hands it to the writer; `id` is the completion id."""

    id: str = Field(max_length=64)
    # The client's x-conversation-id header, any length (a longer one is hashed to fit the
    # 64-character key); None: the writer threads the turn by its messages.
    conversation_id: str | None = None


class Turn(TurnBase, table=True):
    """One answered chat request, threaded into its conversation."""

    __table_args__ = (Index("ix_turn_thread_hash", "thread_hash"), Index("ix_turn_conv_seq", "conversation_id", "seq"))

    id: str = Field(primary_key=True, max_length=64)
    conversation_id: str = Field(foreign_key="conversation.id", max_length=64)
    seq: int = 0  # turns the conversation had before this one
    thread_hash: str = Field(max_length=64)  # of the request messages plus the answer
    rating: Rating | None = Field(default=None, sa_type=AutoString(length=8))
    rated_at: datetime | None = Field(default=None, index=True)
    correction: str | None = Field(default=None, sa_type=Text)  # the answer the user wanted (migration 0005)


class TurnPublic(TurnBase):
    """A stored turn as readers outside the store see it."""

    id: str
    conversation_id: str
    seq: int
    thread_hash: str
    rating: Rating | None = None
    rated_at: datetime | None = None
    correction: str | None = None


# ---------------------------------------------------------------------------------------- feedback


class FeedbackBase(SQLModel):
    rating: Rating = Field(sa_type=AutoString(length=8))
    comment: str | None = Field(default=None, max_length=10_000, sa_type=Text)
    # The answer the user wanted, whatever the rating: an SFT target for the turn and the
    # chosen side of a preference pair against the model's answer (feedback/curate.py).
    correction: str | None = Field(default=None, max_length=10_000, sa_type=Text)


class FeedbackCreate(FeedbackBase):
    """The body of `POST /v1/feedback`; unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=64)

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("a correction must not be blank; leave it out to rate without one")
        return text


class Feedback(FeedbackBase, table=True):
    """One rating of a turn, as given; the turn keeps only the latest."""

    id: int | None = Field(default=None, primary_key=True)
    turn_id: str = Field(foreign_key="turn.id", index=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    key_hash: str | None = Field(default=None, max_length=64)


class FeedbackPublic(FeedbackBase):
    """The 201 answer of `POST /v1/feedback`."""

    id: int
    object: Literal["feedback"] = "feedback"
    completion_id: str
    created_at: datetime

    @classmethod
    def of(cls, row: Feedback) -> FeedbackPublic:
        return cls(id=row.id, completion_id=row.turn_id, rating=row.rating, comment=row.comment, correction=row.correction,
                   created_at=row.created_at)

    @field_serializer("created_at")
    def _iso(self, at: datetime) -> str:
        # datetime.isoformat ("+00:00"), as the API answered before these classes; pydantic would write "Z".
        return at.isoformat()


# ---------------------------------------------------------------------------------------- forget


class Deletion(SQLModel, table=True):
    """What one `data forget` removed, kept without the content: which target (by hash), how
    many rows, and which snapshots held it (their data files were removed too)."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)
    target: str = Field(max_length=16)  # "key" | "conversation"
    target_hash: str = Field(max_length=64)  # sha256 hex of the key hash / of the conversation id
    conversations: int = 0
    turns: int = 0
    ratings: int = 0
    corrections: int = 0
    snapshots: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # content hashes
    requested_by: str | None = Field(default=None, max_length=64)  # "cli", or the admin key's hash


class StoreSecret(SQLModel, table=True):
    """A server-side secret, made once per store (the held-out split's salt); never written
    into a snapshot or a report."""

    __tablename__ = "store_secret"
    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=128)

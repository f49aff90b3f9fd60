"""The record types: what a turn and a rating accept coming in and show going out.

    pytest tests/feedback/test_models.py
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from feedback.models import Feedback, FeedbackCreate, FeedbackPublic, Turn, TurnPublic
from tests.feedback.turns import turn, user


def test_turn_create_checks_status_and_makes_times_utc():
    with pytest.raises(ValidationError):
        turn("t1", [user("x")], "y", status="weird")
    assert turn("t1", [user("x")], "y", created_at=datetime(2025, 1, 1)).created_at.tzinfo == timezone.utc
    assert turn("t1", [user("x")], "y").created_at.tzinfo is not None


def test_a_stored_turn_is_built_from_its_create_and_read_as_public():
    create = turn("t1", [user("x")], "y", conversation_id="client-given", style="pirate", raw_answer="raw")
    row = Turn.model_validate(create, update={"conversation_id": "c1", "seq": 2, "thread_hash": "h" * 64})
    assert (row.id, row.conversation_id, row.seq, row.style, row.raw_answer) == ("t1", "c1", 2, "pirate", "raw")
    public = TurnPublic.model_validate(row)
    assert public.model_dump(exclude={"conversation_id", "seq", "thread_hash", "rating", "rated_at", "correction"}) == \
        create.model_dump(exclude={"conversation_id"})


@pytest.mark.parametrize("body", [
    {"completion_id": "c", "rating": "meh"},
    {"rating": "up"},
    {"completion_id": "", "rating": "up"},
    {"completion_id": "c", "rating": "up", "extra": 1},
    {"completion_id": "c", "rating": "up", "comment": "x" * 10_001},
    {"completion_id": "c", "rating": "down", "correction": "   "},
    {"completion_id": "c", "rating": "down", "correction": "x" * 10_001},
])
def test_feedback_create_refuses_what_post_feedback_answers_422(body):
    with pytest.raises(ValidationError):
        FeedbackCreate.model_validate(body)


def test_feedback_public_is_the_201_body():
    at = datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc)
    row = Feedback(id=7, turn_id="chatcmpl-1", rating="down", comment="nice", correction="Paris.", created_at=at)
    assert FeedbackPublic.of(row).model_dump(mode="json") == {
        "id": 7, "object": "feedback", "completion_id": "chatcmpl-1", "rating": "down", "comment": "nice",
        "correction": "Paris.", "created_at": "2025-01-02T03:04:05.600000+00:00"}

"""Conversation threading: follow-ups join their conversation, the client's id wins, keys stay apart.

    pytest tests/feedback/test_conversations.py
"""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, select

from feedback.conversations import add_turns, text_of, thread_hash
from feedback.models import Conversation, Turn
from feedback.queries import conversation_turns
from tests.feedback.turns import bot, turn, user, write


def test_thread_hash_ignores_whitespace_extra_fields_and_content_parts():
    a = [user("What is 2+2?"), bot("4")]
    b = [{"role": "user", "content": [{"type": "text", "text": "What is 2+2? "}]}, {**bot(" 4\n"), "name": "x"}]
    assert thread_hash(a) == thread_hash(b)
    assert thread_hash(a) != thread_hash([user("What is 2+2?"), bot("5")])
    assert thread_hash(a) != thread_hash([bot("What is 2+2?"), user("4")])


def test_text_of_content_parts_and_tool_calls():
    assert text_of([{"type": "text", "text": "a"}, {"type": "image_url"}, "b"]) == "ab"
    assert text_of(None) == "" and text_of("x") == "x"


def test_follow_up_that_repeats_earlier_turns_joins_the_conversation(db):
    q1 = [{"role": "system", "content": "be brief"}, user("Who wrote Hamlet?")]
    q2 = q1 + [bot("Shakespeare."), user("When?")]
    q3 = q2 + [bot("Around 1600."), user("Where?")]
    c1, c2, c3 = write(db, turn("t1", q1, "Shakespeare."), turn("t2", q2, "Around 1600."), turn("t3", q3, "London."))
    assert c1 == c2 == c3
    with Session(db) as s:
        turns = conversation_turns(s, c1)
    assert [(t.id, t.seq) for t in turns] == [("t1", 0), ("t2", 1), ("t3", 2)]
    assert turns[2].request_messages == q3


def test_different_first_prompts_start_new_conversations(db):
    c1, c2, c3 = write(db, turn("t1", [user("hi")], "hello"), turn("t2", [user("bye")], "ciao"), turn("t3", [user("hi")], "hey"))
    assert len({c1, c2, c3}) == 3
    with Session(db) as s:
        assert s.exec(select(func.count()).select_from(Conversation)).one() == 3


def test_follow_up_on_an_answer_never_given_starts_a_new_conversation(db):
    c1, c2 = write(db, turn("t1", [user("hi")], "hello"), turn("t2", [user("hi"), bot("something else"), user("ok")], "ok"))
    assert c1 != c2


def test_conversation_header_wins_over_derived_threading(db):
    (c1,) = write(db, turn("t1", [user("hi")], "hello"))
    follow_up = [user("hi"), bot("hello"), user("and?")]
    (c2,) = write(db, turn("t2", follow_up, "more", conversation_id="client-conv-7"))
    (c3,) = write(db, turn("t3", [user("unrelated")], "x", conversation_id="client-conv-7"))
    assert c1 != c2 and c2 == c3 == "client-conv-7"
    with Session(db) as s:
        assert [t.seq for t in conversation_turns(s, "client-conv-7")] == [0, 1]
        assert s.get(Conversation, "client-conv-7") is not None


def test_a_client_conversation_id_longer_than_the_column_still_threads(db):
    long_id = "c" * 100
    c1, c2 = write(db, turn("t1", [user("a")], "b", conversation_id=long_id), turn("t2", [user("x")], "y", conversation_id=long_id))
    assert c1 == c2 and len(c1) == 64


def test_same_words_under_another_key_do_not_join(db):
    (c1,) = write(db, turn("t1", [user("hi")], "hello", key_hash="a" * 64))
    (c2,) = write(db, turn("t2", [user("hi"), bot("hello"), user("more")], "x", key_hash="b" * 64))
    (c3,) = write(db, turn("t3", [user("hi"), bot("hello"), user("more")], "x", key_hash="a" * 64))
    assert c2 != c1 and c3 == c1


def test_a_foreign_conversation_id_starts_a_new_conversation(db):
    alice, mallory = "a" * 64, "b" * 64
    (c1,) = write(db, turn("t1", [user("my secret plan")], "noted", key_hash=alice, conversation_id="support-1"))
    (c2,) = write(db, turn("t2", [user("inject this")], "ok", key_hash=mallory, conversation_id="support-1"))
    (c3,) = write(db, turn("t3", [user("and this")], "ok", key_hash=mallory, conversation_id="support-1"))
    (c4,) = write(db, turn("t4", [user("go on")], "ok", key_hash=alice, conversation_id="support-1"))
    assert c1 == c4 == "support-1" and c2 == c3 != c1  # mallory threads in a conversation of its own
    with Session(db) as s:
        assert [t.id for t in conversation_turns(s, "support-1")] == ["t1", "t4"]
        assert s.get(Conversation, c2).key_hash == mallory and s.get(Conversation, c1).key_hash == alice
    # taking the id alice's turns would be derived to does not pull her in either
    (c5,) = write(db, turn("t5", [user("x")], "y", key_hash=mallory, conversation_id="support-2"))
    (c6,) = write(db, turn("t6", [user("x")], "y", key_hash=alice, conversation_id="support-2"))
    (c7,) = write(db, turn("t7", [user("x")], "y", key_hash=mallory, conversation_id=c6))
    assert c5 == "support-2" and c6 != c5 and c7 != c6


def test_a_repeated_id_is_dropped(db):
    assert write(db, turn("dup", [user("first")], "kept"))[0] is not None
    assert write(db, turn("dup", [user("second")], "dropped")) == [None]


def test_a_batch_threads_as_turns_one_by_one_do(db):
    """The turn writer's batch path (`add_turns`): turns that start a conversation go in bulk, and
    a follow-up in the same batch still joins the conversation its first turn started."""
    batch = [turn("b1", [user("Hi")], "Hello!"), turn("b2", [user("Other")], "Yes."),
             turn("b3", [user("Hi"), bot("Hello!"), user("And then?")], "Then this."),
             turn("b4", [user("Named")], "Ok.", conversation_id="mine"),
             turn("b5", [user("Named"), bot("Ok."), user("More")], "Sure.", conversation_id="mine")]
    with Session(db) as s:
        add_turns(s, batch)
        s.commit()
    with Session(db) as s:
        rows = {t.id: t for t in s.exec(select(Turn))}
        assert rows["b3"].conversation_id == rows["b1"].conversation_id != rows["b2"].conversation_id
        assert (rows["b1"].seq, rows["b2"].seq, rows["b3"].seq) == (0, 0, 1)
        assert rows["b4"].conversation_id == rows["b5"].conversation_id == "mine" and rows["b5"].seq == 1
        assert s.exec(select(func.count()).select_from(Conversation)).one() == 3

"""Curation steps on hand-made turn rows (no database, no tokenizer).

    pytest tests/feedback/test_curate.py
"""

from __future__ import annotations

from collections import Counter

from feedback.curate import (
    CurationConfig,
    Sinks,
    curate,
    group_conversations,
    is_heldout,
    normalize_text,
    preference_row,
    rebuild_conversation,
    scrub_pii,
    sft_example,
)
from tests.feedback.rows import A, S, U, msg, three_turns, turn


def run(rows, **config) -> tuple[dict, dict]:
    out = {"train": [], "heldout": [], "preference": [], "pair": []}
    sinks = Sinks(**{k: v.append for k, v in out.items()})
    counts = curate(rows, config=CurationConfig(**{"heldout_fraction": 0.0, **config}),
                    count_tokens=lambda batch: [sum(len(m["content"].split()) for m in msgs) for msgs in batch], sinks=sinks)
    return counts, out


def test_only_the_up_rated_middle_answer_is_a_target():
    counts, out = run(three_turns())
    [example] = out["train"]
    messages = example["messages"]
    assert messages[-1] == msg(A, "Paris is the capital.")
    assert [m["role"] for m in messages] == [S, U, A, U, A]
    assert messages[2]["content"] == "I am a bot." and messages[2]["weight"] == 0  # context, not a target
    assert "weight" not in messages[-1]
    assert all("About 2 million." not in m["content"] for m in messages)
    assert (counts.rated_up, counts.unrated, counts.train) == (1, 2, 1)


def test_down_unrated_and_incomplete_turns_are_never_targets():
    rows = three_turns("c1", ("down", None, "down"))
    rows += [turn("c2", 0, [msg(U, "Tell me a joke")], "Why did the", rating="up", status="incomplete")]
    counts, out = run(rows)
    assert out["train"] == []
    assert counts.rated_down == 2 and counts.rated_not_ok == 1 and counts.candidates == 0
    assert sft_example(rows[-1]) is None


def test_group_and_rebuild_conversation():
    rows = three_turns("a") + three_turns("b")
    groups = list(group_conversations(rows))
    assert [len(g) for g in groups] == [3, 3]
    rebuilt = rebuild_conversation(groups[0])
    assert [m["content"] for m in rebuilt if m["role"] == A] == ["I am a bot.", "Paris is the capital.", "About 2 million."]


def test_preference_rows_and_pairs():
    q = [msg(U, "Name a colour")]
    rows = [turn("p1", 0, q, "Blue", "up"), turn("p2", 0, q, "Banana", "down"), turn("p3", 0, [msg(U, "Other")], "No", "down"),
            turn("p4", 0, q, "Red", "up", status="error")]
    counts, out = run(rows)
    assert {(r["completion"][0]["content"], r["label"]) for r in out["preference"]} == {("Blue", True), ("Banana", False), ("No", False)}
    assert out["pair"] == [{"prompt": q, "chosen": [msg(A, "Blue")], "rejected": [msg(A, "Banana")]}]
    assert counts.preference_pairs == 1
    assert preference_row(rows[-1]) is None  # a failed turn's rating is not a preference either


def test_filters_count_what_they_remove():
    q = [msg(U, "What is 2+2?")]
    rows = [
        turn("f1", 0, q, "Four.", "up"),
        turn("f2", 0, q, "Four.", "up"),  # exact duplicate
        turn("f3", 0, [msg(U, "what is 2+2")], "four", "up"),  # normalized duplicate
        turn("f4", 0, q, "   ", "up"),  # whitespace answer
        turn("f5", 0, [msg(U, "Say a lot")], "word " * 50, "up"),  # too long
        turn("f6", 0, [msg(U, "Hi"), msg(U, "Hi again")], "Hello", "up"),  # two user messages in a row
    ]
    counts, out = run(rows, max_tokens=20)
    assert [e["messages"][-1]["content"] for e in out["train"]] == ["Four."]
    assert counts.removed == {"empty_answer": 1, "invalid": 1, "exact_duplicate": 1, "normalized_duplicate": 1, "too_long": 1}


def test_pii_is_scrubbed_and_counted():
    c = Counter()
    text = scrub_pii("Mail jane.doe@example.com or call +1 (555) 123-4567, card 4111 1111 1111 1111, in 2019-2020.", c)
    assert text == "Mail [EMAIL] or call [PHONE], card [CARD], in 2019-2020."
    assert c == {"email": 1, "phone": 1, "card": 1}
    rows = [turn("x", 0, [msg(U, "My mail is bob@mail.org")], "Noted, bob@mail.org.", "up")]
    counts, out = run(rows)
    assert out["train"][0]["messages"] == [msg(U, "My mail is [EMAIL]"), msg(A, "Noted, [EMAIL].")]
    assert counts.pii["email"] == 2
    _, kept = run(rows, pii_scrub=False)
    assert "bob@mail.org" in kept["train"][0]["messages"][-1]["content"]


def test_normalize_text():
    assert normalize_text("  Hello,   WORLD!  ") == normalize_text("hello world")


def test_split_is_deterministic_and_by_conversation():
    rows = [t for i in range(200) for t in three_turns(f"conv-{i}", ("up", "up", "up"))]
    _, out = run(rows, heldout_fraction=0.3)

    def conversations(examples):
        return Counter(e["messages"][1]["content"].split()[-1] for e in examples)

    train, held = conversations(out["train"]), conversations(out["heldout"])
    assert not set(train) & set(held) and len(train) + len(held) == 200
    assert set(train.values()) == set(held.values()) == {3}  # a conversation's examples stay together
    assert 30 < len(held) < 90
    assert {f"conv-{i}." for i in range(200) if is_heldout(f"conv-{i}", 0.3)} == set(held)
    _, again = run(rows, heldout_fraction=0.3)
    assert again == out

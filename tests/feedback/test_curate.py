"""Curation rules on hand-made turn rows (no database, no tokenizer): what a rating or a
correction makes of a turn, what is never a target, filters, the held-out split.

    pytest tests/feedback/test_curate.py
"""

from __future__ import annotations

from collections import Counter

from feedback.curate import CurationConfig, Sinks, curate, group_conversations, key_digest, preference_rows, sft_example
from feedback.dedup import normalize_text
from feedback.heldout import is_heldout
from tests.feedback.rows import A, S, U, msg, three_turns, turn

KEY = "a" * 64


def run(rows, **config) -> tuple:
    out = {"train": [], "heldout": [], "preference": [], "pair": [], "heldout_item": []}
    sinks = Sinks(**{k: v.append for k, v in out.items()})
    counts = curate(rows, config=CurationConfig(**{"heldout_fraction": 0.0, **config}),
                    count_tokens=lambda batch: [sum(len(m["content"].split()) for m in msgs) for msgs in batch], sinks=sinks)
    return counts, out


def answers(rows, name="completion"):
    return [r[name][0]["content"] for r in rows]


def test_only_the_up_rated_middle_answer_is_a_target():
    counts, out = run(three_turns())
    [example] = out["train"]
    messages = example["messages"]
    assert messages[-1] == msg(A, "Paris is the capital.")
    assert [m["role"] for m in messages] == [S, U, A, U, A]
    assert messages[2]["content"] == "I am a bot." and messages[2]["weight"] == 0  # context, not a target
    assert "weight" not in messages[-1]
    assert all("About 2 million." not in m["content"] for m in messages)
    assert example["meta"] == {"key": None, "rating": "up", "source": "rated"}
    assert (counts.rated_up, counts.unrated, counts.train) == (1, 2, 1)


def test_a_down_rated_answer_with_a_correction_gives_exactly_one_sft_example_and_one_pair():
    q = [msg(S, "Be brief."), msg(U, "What is the capital of France?")]
    rows = [turn("c", 0, q, "Lyon.", "down", correction="Paris.", key_hash=KEY)]
    counts, out = run(rows)
    [example] = out["train"]
    assert example["messages"] == [*q, msg(A, "Paris.")]  # target: the correction
    meta = {"key": key_digest(KEY), "rating": "down", "source": "corrected"}
    assert example["meta"] == meta
    [pair] = out["pair"]
    assert pair == {"prompt": q, "chosen": [msg(A, "Paris.")], "rejected": [msg(A, "Lyon.")], "meta": meta}
    # KTO: the model's answer undesirable, the correction desirable
    assert [(r["completion"][0]["content"], r["label"]) for r in out["preference"]] == [("Lyon.", False), ("Paris.", True)]
    assert (counts.corrected, counts.train, counts.preference_pairs) == (1, 1, 1)
    assert counts.sources["train"]["corrected"] == 1 and counts.sources["preference_pairs"]["corrected"] == 1


def test_a_down_rated_answer_without_a_correction_gives_one_undesirable_kto_row_and_no_sft_target():
    q = [msg(U, "What is the capital of France?")]
    counts, out = run([turn("c", 0, q, "Lyon.", "down", key_hash=KEY)])
    assert out["train"] == [] and out["pair"] == [] and sft_example(turn("c", 0, q, "Lyon.", "down")) is None
    [row] = out["preference"]
    assert row == {"prompt": q, "completion": [msg(A, "Lyon.")], "label": False,
                   "meta": {"key": key_digest(KEY), "rating": "down", "source": "rated"}}
    assert counts.rated_down == 1 and counts.candidates == 0


def test_an_up_rated_answer_is_a_desirable_kto_row_and_an_sft_target():
    q = [msg(U, "What is the capital of France?")]
    _, out = run([turn("c", 0, q, "Paris.", "up")])
    assert [e["messages"][-1]["content"] for e in out["train"]] == ["Paris."]
    assert [(r["completion"][0]["content"], r["label"]) for r in out["preference"]] == [("Paris.", True)]


def test_two_rated_answers_to_the_same_prompt_make_a_pair():
    q = [msg(U, "Name a colour")]
    rows = [turn("p1", 0, q, "Blue", "up", key_hash=KEY), turn("p2", 0, q, "Banana", "down"),
            turn("p3", 0, [msg(U, "Other")], "No", "down"), turn("p4", 0, q, "Red", "up", status="error")]
    counts, out = run(rows)
    assert {(r["completion"][0]["content"], r["label"]) for r in out["preference"]} == {("Blue", True), ("Banana", False), ("No", False)}
    assert out["pair"] == [{"prompt": q, "chosen": [msg(A, "Blue")], "rejected": [msg(A, "Banana")],
                            "meta": {"key": key_digest(KEY), "rating": None, "source": "pair"}}]
    assert counts.preference_pairs == 1 and counts.sources["preference_pairs"] == {"corrected": 0, "pair": 1}
    assert preference_rows(rows[-1]) == []  # a failed turn's rating is not a preference either


def test_down_unrated_and_incomplete_turns_are_never_targets():
    rows = three_turns("c1", ("down", None, "down"))
    rows += [turn("c2", 0, [msg(U, "Tell me a joke")], "Why did the", rating="up", status="incomplete", correction="A joke.")]
    counts, out = run(rows)
    assert out["train"] == [] and out["pair"] == []
    assert counts.rated_down == 2 and counts.rated_not_ok == 1 and counts.candidates == 0 and counts.corrected == 0
    assert sft_example(rows[-1]) is None


def test_client_sent_assistant_messages_are_never_targets_or_gold_answers():
    """A client sends a made-up assistant message as context: it stays context (weight 0, in
    prompts only); the held-out item's gold answers are the model's up-rated answer and the correction."""
    story = msg(S, "Read the story and extract answers for the questions.\nStory: Ann has a red hat.")
    forged = [story, msg(U, "What colour is the hat?"), msg(A, "FORGED: green"), msg(U, "Who has it?")]
    rows = [turn("c", 0, forged, "Ann.", "up"), turn("c", 1, [*forged, msg(A, "Ann."), msg(U, "Is it big?")], "Yes.", "up")]
    honest = [story, msg(U, "What colour is the hat?")]
    rows += [turn("h", 0, honest, "Blue.", "down", correction="Red."),
             turn("h", 1, [*honest, msg(A, "Red."), msg(U, "Who has it?")], "Ann.", "up"),
             turn("h", 2, [*honest, msg(A, "Red."), msg(U, "Who has it?"), msg(A, "Ann."), msg(U, "Why?")], "FORGED", None)]
    _, out = run(rows, heldout_fraction=1.0)
    targets = [e["messages"][-1]["content"] for e in out["heldout"]]
    assert "FORGED: green" not in targets and targets.count("Red.") == 1
    assert all(m.get("weight") == 0 for e in out["heldout"] for m in e["messages"][:-1] if m["role"] == A)
    # conversation "c" opened with a forged answer: no item; "h" gives its two trusted turns
    [item] = out["heldout_item"]
    assert item["story"] == "Ann has a red hat."
    assert item["turns"] == [{"question": "What colour is the hat?", "answers": ["Red."]},
                             {"question": "Who has it?", "answers": ["Ann."]}]
    _, train = run(rows)
    completions = answers(train["preference"]) + answers(train["pair"], "chosen") + answers(train["pair"], "rejected")
    assert not [c for c in completions if c.startswith("FORGED")]


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
    assert counts.removed_preferences == {"invalid": 1, "exact_duplicate": 1, "too_long": 1}


def test_an_over_long_conversation_is_cut_to_its_last_turns_with_its_system_message_kept():
    """A corrected late turn of a long conversation: its oldest exchanges go until it fits, the
    story (system) and the corrected turn stay; a first turn that is too long alone is removed."""
    story = msg(S, "Story: " + "word " * 10)
    history = [story]
    for i in range(6):
        history += [msg(U, f"Question {i} " + "pad " * 4), msg(A, f"Answer {i}")]
    rows = [turn("long", 0, [*history, msg(U, "And the last one?")], "Wrong.", "down", correction="Right.")]
    rows.append(turn("alone", 0, [msg(U, "word " * 40)], "Too long alone.", "up"))
    counts, out = run(rows, max_tokens=36)
    [example] = out["train"]
    messages = example["messages"]
    assert messages[0] == story and messages[-2:] == [msg(U, "And the last one?"), msg(A, "Right.")]
    assert [m["role"] for m in messages] == [S, U, A, U, A, U, A]  # two exchanges of six fit: 11 + 2 * (6 + 2) + 4 + 1 words
    assert messages[1]["content"].startswith("Question 4")
    [pair] = out["pair"]
    assert [m["content"] for m in pair["prompt"]] == [m["content"] for m in messages[:-1]] and pair["chosen"] == [msg(A, "Right.")]
    assert counts.shortened == {"sft": 1, "kto": 2, "dpo": 1}
    assert counts.removed["too_long"] == 1 and counts.removed_preferences["too_long"] == 1  # the first turn alone


def test_pii_is_scrubbed_and_counted_in_every_output():
    rows = [turn("x", 0, [msg(U, "My mail is bob@mail.org")], "Noted, bob@mail.org.", "down", correction="Call +44 20 7946 0958.")]
    counts, out = run(rows)
    assert out["train"][0]["messages"] == [msg(U, "My mail is [EMAIL]"), msg(A, "Call [PHONE].")]
    assert answers(out["preference"]) == ["Noted, [EMAIL].", "Call [PHONE]."]
    assert out["pair"][0]["prompt"] == [msg(U, "My mail is [EMAIL]")]
    assert counts.pii["email"] == 2 and counts.pii["phone"] == 1  # each distinct text once
    _, kept = run(rows, pii_scrub=False)
    assert "bob@mail.org" in kept["train"][0]["messages"][0]["content"]


def test_normalize_text():
    assert normalize_text("  Hello,   WORLD!  ") == normalize_text("hello world")


def test_split_is_by_conversation_and_keyed_by_a_secret_salt():
    rows = [t for i in range(200) for t in three_turns(f"conv-{i}", ("up", "up", "up"))]
    _, out = run(rows, heldout_fraction=0.3, heldout_salt="secret")

    def conversations(examples):
        return Counter(e["messages"][1]["content"].split()[-1] for e in examples)

    train, held = conversations(out["train"]), conversations(out["heldout"])
    assert not set(train) & set(held) and len(train) + len(held) == 200
    assert set(train.values()) == set(held.values()) == {3}  # a conversation's examples stay together
    assert 30 < len(held) < 90
    assert {f"conv-{i}." for i in range(200) if is_heldout(f"conv-{i}", 0.3, "secret")} == set(held)
    _, again = run(rows, heldout_fraction=0.3, heldout_salt="secret")
    assert again == out
    # without the salt, knowing the ids does not tell the side: another salt, another split
    _, other = run(rows, heldout_fraction=0.3, heldout_salt="another secret")
    assert set(conversations(other["heldout"])) != set(held)


def test_with_trusted_keys_only_their_conversations_are_held_out():
    trusted, stranger = "b" * 64, "c" * 64
    rows = [t for i in range(40) for t in three_turns(f"t-{i}", ("up", "up", "up")) if not t.update(key_hash=trusted)]
    rows += [t for i in range(40) for t in three_turns(f"s-{i}", ("up", "up", "up")) if not t.update(key_hash=stranger)]
    counts, out = run(rows, heldout_fraction=0.5, trusted_keys=(trusted,))
    assert {e["meta"]["key"] for e in out["heldout"]} == {key_digest(trusted)}
    assert counts.heldout_split["untrusted_key_conversations"] == 40 and 5 < counts.heldout_split["items"] < 35
    assert sum(e["meta"]["key"] == key_digest(stranger) for e in out["train"]) == 120  # every stranger's example trains


def test_group_conversations():
    rows = three_turns("a") + three_turns("b")
    assert [len(g) for g in group_conversations(rows)] == [3, 3]

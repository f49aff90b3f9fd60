"""Curation steps and snapshots on hand-made turn rows (no database, no tokenizer).

    pytest tests/feedback/test_curate.py
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from feedback.check import check_file
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
from feedback.snapshot import build_snapshot, export_jsonl

U, A, S = "user", "assistant", "system"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def turn(cid: str, seq: int, messages: list[dict], answer: str, rating: str | None = None, status: str = "ok", **kw) -> dict:
    return {"id": f"{cid}-{seq}", "conversation_id": cid, "seq": seq, "request_messages": messages, "answer": answer,
            "rating": rating, "status": status, "created_at": f"2025-01-01T00:00:{seq:02d}", **kw}


def three_turns(cid: str = "c1", ratings=(None, "up", None)) -> list[dict]:
    """A conversation of three turns; each request holds the full history the client sent."""
    history = [msg(S, "Be brief."), msg(U, f"Hi, who are you? I am {cid}.")]
    rows = []
    for seq, (answer, rating) in enumerate(zip(["I am a bot.", "Paris is the capital.", "About 2 million."], ratings)):
        rows.append(turn(cid, seq, list(history), answer, rating))
        history += [msg(A, answer), msg(U, ["What is the capital of France?", "How many people live there?", "x"][seq])]
    return rows


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


def test_snapshot_is_immutable_and_hash_is_stable(tmp_path):
    rows = [t for i in range(30) for t in three_turns(f"conv-{i}", ("up", "down", "up"))]
    config = CurationConfig(max_tokens=None, heldout_fraction=0.2)
    first = build_snapshot(rows, root=tmp_path, config=config)
    second = build_snapshot(rows, root=tmp_path, config=config)
    assert first.manifest["hash"] == second.manifest["hash"] and first.path == second.path
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.version]  # no temp folder left behind
    m = first.manifest
    assert m["counts"]["train"] + m["counts"]["heldout"] == 60 and m["counts"]["heldout"] > 0
    assert m["counts"]["removed"]["exact_duplicate"] == 0 and m["window"]["first_turn_at"] == "2025-01-01T00:00:00"
    for name in ("train.jsonl", "heldout.jsonl"):
        assert check_file(first.path / name).ok
    heldout_eval = [json.loads(line) for line in (first.path / "heldout_eval.jsonl").read_text().splitlines()]
    # one item per held-out conversation: its longest example (turn 3 of 3), the story from the system prompt
    assert len(heldout_eval) == m["counts"]["heldout"] // 2 == m["counts"]["heldout_eval_items"]
    assert heldout_eval[0]["story"] == "Be brief."
    assert [t["answers"] for t in heldout_eval[0]["turns"]] == [["I am a bot."], ["Paris is the capital."], ["About 2 million."]]
    third = build_snapshot(rows[:-3], root=tmp_path, config=config)
    assert third.manifest["hash"] != first.manifest["hash"]


def test_empty_log_gives_an_empty_snapshot_with_a_message(tmp_path):
    snap = build_snapshot([], root=tmp_path, config=CurationConfig())
    assert snap.manifest["counts"]["train"] == 0 and "no up-rated" in snap.manifest["message"]
    assert (snap.path / "train.jsonl").read_text() == ""


def test_seed_files_are_added_to_train_and_recorded(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"messages": [msg(U, "q"), msg(A, "a")]}) + "\nnot json\n")
    snap = build_snapshot(three_turns(), root=tmp_path / "snaps", config=CurationConfig(heldout_fraction=0.0), seed_files=[seed])
    train = (snap.path / "train.jsonl").read_text().splitlines()
    assert len(train) == 2 and json.loads(train[-1])["messages"][-1]["content"] == "a"
    [entry] = snap.manifest["seed_files"]
    assert entry["examples"] == 1 and entry["skipped"] == 1 and entry["problems"][0].startswith("line 2")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_snapshot([], root=tmp_path / "snaps", config=CurationConfig(), seed_files=[tmp_path / "missing.jsonl"])


def test_export_writes_every_up_rated_answer(tmp_path):
    rows = three_turns("a") + three_turns("b", ("up", "down", "up"))
    out = tmp_path / "export.jsonl"
    counts = export_jsonl(rows, out, config=CurationConfig(max_tokens=None, heldout_fraction=0.5))
    targets = [json.loads(line)["messages"][-1]["content"] for line in out.read_text().splitlines()]
    assert sorted(targets) == ["About 2 million.", "I am a bot.", "Paris is the capital."] and counts.train == 3
    assert check_file(out).ok


# ---------------------------------------------------------------------------------------- from a real SQLite store


@pytest.fixture
def store_config(tmp_path):
    """A config file whose SQLite store holds a 3-turn conversation (middle rated up) and an
    incomplete turn rated up."""
    from sqlmodel import Session

    from feedback.store import TurnRecord, add_turn, make_db, record_feedback

    data_dir = tmp_path / "data"
    config = tmp_path / "tunewheel.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    db = make_db(f"sqlite:///{data_dir / 'tunewheel.db'}")
    with Session(db) as session:
        for row in three_turns("conv-db", (None, "up", "down")) + [turn("conv-x", 0, [msg(U, "Hi")], "Hel", "up", status="incomplete")]:
            add_turn(session, TurnRecord(id=row["id"], alias="chat", adapter_version="base", request_messages=row["request_messages"],
                                         answer=row["answer"], status=row["status"], conversation_id=row["conversation_id"]))
            session.commit()
            if row["rating"]:
                record_feedback(session, turn_id=row["id"], rating=row["rating"], comment=None, key_hash=None, admin=False)
    db.dispose()
    return config


def test_cli_curate_and_export_read_the_store(store_config, tmp_path):
    from typer.testing import CliRunner

    from serve.cli import app as tunewheel_app

    runner = CliRunner()
    result = runner.invoke(tunewheel_app, ["data", "curate", "--max-tokens", "0", "--config", str(store_config)])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["counts"]["turns"] == 4 and manifest["counts"]["rated_not_ok"] == 1
    assert manifest["counts"]["train"] + manifest["counts"]["heldout"] == 1
    out = tmp_path / "export.jsonl"
    result = runner.invoke(tunewheel_app, ["data", "export", "--out", str(out), "--max-tokens", "0", "--config", str(store_config)])
    assert result.exit_code == 0, result.output
    [line] = out.read_text().splitlines()
    assert json.loads(line)["messages"][-1] == msg(A, "Paris is the capital.")


def test_cli_curate_of_an_empty_log_says_so(tmp_path):
    from typer.testing import CliRunner

    from serve.cli import app as tunewheel_app

    config = tmp_path / "tunewheel.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = CliRunner().invoke(tunewheel_app, ["data", "curate", "--max-tokens", "0", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "no up-rated" in result.output
    assert list((tmp_path / "data" / "datasets" / "snapshots").glob("snap-*/train.jsonl"))


def test_coqa_seed_file(tmp_path):
    from feedback.synth import synth_coqa

    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(synth_coqa(stories=3, seed=0)))
    snap = build_snapshot([], root=tmp_path / "snaps", config=CurationConfig(), seed_files=[seed])
    assert snap.manifest["seed_files"][0]["format"] == "coqa" and snap.manifest["counts"]["train_total"] == 3
    assert check_file(snap.path / "train.jsonl").ok

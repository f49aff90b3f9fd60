"""Snapshots: immutable, content-hashed folders of curated data plus the operator's seed files,
whose train.jsonl always passes the validator; `data curate` and `data export` on a real store.

    pytest tests/feedback/test_snapshot.py
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from feedback.check import check_file
from feedback.conversations import add_turn
from feedback.curate import CurationConfig, key_digest
from feedback.db import make_db
from feedback.models import TurnCreate
from feedback.queries import record_feedback
from feedback.snapshot import build_snapshot, create_snapshot, export_jsonl, latest_snapshot
from feedback.synth import synth_coqa
from serve.cli import app as tunewheel_app
from tests.feedback.rows import A, U, msg, three_turns, turn


def words(batch: list[list[dict]]) -> list[int]:
    """A stand-in token counter: words of every message."""
    return [sum(len(m["content"].split()) for m in msgs) for msgs in batch]


def fill_store(db, rows: list[dict]) -> None:
    """Store hand-made rows as the gateway would, then their ratings as POST /v1/feedback would."""
    with Session(db) as session:
        for row in rows:
            add_turn(session, TurnCreate(id=row["id"], alias="chat", adapter_version="base", request_messages=row["request_messages"],
                                         answer=row["answer"], status=row["status"], conversation_id=row["conversation_id"]))
            session.commit()
            if row["rating"]:
                record_feedback(session, turn_id=row["id"], rating=row["rating"], comment=None, key_hash=None, admin=False)


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
    for name, fmt in (("preferences.jsonl", "kto"), ("preference_pairs.jsonl", "dpo")):
        assert check_file(first.path / name, fmt=fmt).ok
    heldout_eval = [json.loads(line) for line in (first.path / "heldout_eval.jsonl").read_text().splitlines()]
    # one item per held-out conversation, the story from the system prompt, its turns up to the
    # first without a trusted gold answer (turn 2 was rated down)
    assert len(heldout_eval) == m["counts"]["heldout"] // 2 == m["counts"]["heldout_eval_items"]
    assert heldout_eval[0]["story"] == "Be brief."
    assert [t["answers"] for t in heldout_eval[0]["turns"]] == [["I am a bot."]]
    assert m["heldout"]["trusted"] is False and "learn.trusted_keys" in m["heldout"]["why"]
    third = build_snapshot(rows[:-3], root=tmp_path, config=config)
    assert third.manifest["hash"] != first.manifest["hash"]


def test_empty_log_gives_an_empty_snapshot_with_a_message(tmp_path):
    snap = build_snapshot([], root=tmp_path, config=CurationConfig())
    assert snap.manifest["counts"]["train"] == 0 and "no rated or corrected" in snap.manifest["message"]
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
    data_dir = tmp_path / "data"
    config = tmp_path / "tunewheel.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    db = make_db(f"sqlite:///{data_dir / 'tunewheel.db'}")
    fill_store(db, three_turns("conv-db", (None, "up", "down")) + [turn("conv-x", 0, [msg(U, "Hi")], "Hel", "up", status="incomplete")])
    db.dispose()
    return config


def test_cli_curate_and_export_read_the_store(store_config, tmp_path):
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


def test_cli_time_windows_are_utc(store_config, tmp_path):
    runner = CliRunner()
    out = tmp_path / "window.jsonl"
    window = ["--since", "2020-01-01", "--until", "2100-01-01T00:00:00", "--max-tokens", "0", "--config", str(store_config)]
    result = runner.invoke(tunewheel_app, ["data", "export", "--out", str(out), *window])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 1
    result = runner.invoke(tunewheel_app, ["data", "curate", *window])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["window"]["since"] == "2020-01-01T00:00:00+00:00"
    result = runner.invoke(tunewheel_app, ["data", "export", "--out", str(out), "--since", "2100-01-01", "--max-tokens", "0",
                                           "--config", str(store_config)])
    assert result.exit_code == 0 and out.read_text() == ""


def test_cli_curate_of_an_empty_log_says_so(tmp_path):
    config = tmp_path / "tunewheel.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = CliRunner().invoke(tunewheel_app, ["data", "curate", "--max-tokens", "0", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "no rated or corrected" in result.output
    assert list((tmp_path / "data" / "datasets" / "snapshots").glob("snap-*/train.jsonl"))


def test_coqa_seed_file(tmp_path):
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(synth_coqa(stories=3, seed=0)))
    snap = build_snapshot([], root=tmp_path / "snaps", config=CurationConfig(), seed_files=[seed])
    assert snap.manifest["seed_files"][0]["format"] == "coqa" and snap.manifest["counts"]["train_total"] == 3
    assert check_file(snap.path / "train.jsonl").ok



def test_seed_examples_pass_the_validator_and_the_token_limit(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join([
        json.dumps({"messages": [msg(U, "short question"), msg(A, "short answer")]}),
        json.dumps({"messages": [msg(U, "long " * 40), msg(A, "answer")]}),
        json.dumps({"messages": [msg(U, "no answer")]}),
    ]) + "\n")
    config = CurationConfig(max_tokens=30, heldout_fraction=0.0)
    snap = build_snapshot(three_turns(), root=tmp_path / "snaps", config=config, count_tokens=words, seed_files=[seed])
    [entry] = snap.manifest["seed_files"]
    assert (entry["examples"], entry["skipped"], entry["too_long"]) == (1, 1, 1)
    assert entry["problems"] == ["line 3: the last message must be from the assistant",
                                 "line 2: 41 tokens, more than the limit of 30"]
    counts = snap.manifest["counts"]
    assert (counts["seed_examples"], counts["seed_too_long"], counts["train_total"]) == (1, 1, 2)
    assert check_file(snap.path / "train.jsonl", max_tokens=30, count_tokens=words).ok


def test_too_long_coqa_seed_stories_are_dropped_and_counted(tmp_path):
    seed = tmp_path / "seed.json"
    doc = synth_coqa(stories=4, seed=0)
    doc["data"][1]["story"] = "A very long story. " * 100
    seed.write_text(json.dumps(doc))
    snap = build_snapshot([], root=tmp_path / "snaps", config=CurationConfig(max_tokens=300), count_tokens=words, seed_files=[seed])
    [entry] = snap.manifest["seed_files"]
    assert (entry["examples"], entry["too_long"]) == (3, 1)
    assert entry["problems"][0].startswith(f"record 1 (id {doc['data'][1]['id']}): ") and "limit of 300" in entry["problems"][0]
    assert check_file(snap.path / "train.jsonl", max_tokens=300, count_tokens=words).ok


def test_a_token_limit_needs_a_counter(tmp_path, db):
    with pytest.raises(ValueError, match="token counter"):
        build_snapshot([], root=tmp_path, config=CurationConfig(max_tokens=10))
    with pytest.raises(ValueError, match="tokenizer"):
        create_snapshot(db, root=tmp_path, config=CurationConfig(max_tokens=10))


def test_create_snapshot_reads_the_store_and_latest_snapshot_finds_it(tmp_path, db):
    root = tmp_path / "snapshots"
    assert latest_snapshot(root) is None
    fill_store(db, three_turns("conv-db", (None, "up", "down")))
    snap = create_snapshot(db, root=root, config=CurationConfig(max_tokens=100, heldout_fraction=0.0), count_tokens=words,
                           tokenizer="my-model")
    assert snap.manifest["counts"]["train"] == 1 and snap.manifest["config"]["tokenizer"] == "my-model"
    assert latest_snapshot(root).path == snap.path


# ---------------------------------------------------------------------------------------- trust, sources, share cap


def test_every_row_records_its_key_and_rating_and_every_file_passes_the_validator(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"messages": [msg(U, "q"), msg(A, "a")]}) + "\n")
    rows = [turn("k", 0, [msg(U, "Capital of France?")], "Lyon.", "down", correction="Paris.", key_hash="a" * 64),
            turn("k", 1, [msg(U, "Capital of France?"), msg(A, "Lyon."), msg(U, "Of Italy?")], "Rome.", "up", key_hash="a" * 64),
            turn("n", 0, [msg(U, "Capital of France?")], "Paris, of course.", "up"),
            turn("d", 0, [msg(U, "Capital of France?")], "Paris.", "up")]
    snap = build_snapshot(rows, root=tmp_path / "snaps", config=CurationConfig(heldout_fraction=0.0), seed_files=[seed])
    lines = {name: [json.loads(x) for x in (snap.path / name).read_text().splitlines()]
             for name in ("train.jsonl", "preferences.jsonl", "preference_pairs.jsonl")}
    key = hashlib.sha256(("a" * 64).encode()).hexdigest()
    # conversation d's example repeats k's corrected one word for word: a duplicate
    assert [r["meta"] for r in lines["train.jsonl"]] == [
        {"key": key, "rating": "down", "source": "corrected"}, {"key": key, "rating": "up", "source": "rated"},
        {"key": None, "rating": "up", "source": "rated"}, {"key": None, "rating": None, "source": "seed"}]
    # corrected: Paris. over Lyon. (k); pair: Paris, of course. over Lyon. (d's Paris. over Lyon. repeats k's pair)
    assert sorted(r["meta"]["source"] for r in lines["preference_pairs.jsonl"]) == ["corrected", "pair"]
    for name, fmt in (("train.jsonl", "chat"), ("preferences.jsonl", "kto"), ("preference_pairs.jsonl", "dpo")):
        assert check_file(snap.path / name, fmt=fmt).ok, check_file(snap.path / name, fmt=fmt).problem_lines()
    counts = snap.manifest["counts"]
    assert counts["sources"]["train"] == {"rated": 2, "corrected": 1, "seed": 1} and counts["corrected"] == 1
    assert counts["removed"]["exact_duplicate"] == 1 and counts["removed_pairs"]["exact_duplicate"] == 1
    sources = [json.loads(x) for x in (snap.path / "sources.jsonl").read_text().splitlines()]
    assert {(s["kind"], s["sha256"]) for s in sources} == {
        ("key", key), *(("conversation", hashlib.sha256(c).hexdigest()) for c in (b"k", b"n"))}  # d's rows all repeat k's


def test_the_manifest_says_whether_an_operator_controls_the_heldout_set(tmp_path):
    trusted = "b" * 64
    rows = [t for i in range(20) for t in three_turns(f"c{i}", ("up", "up", "up")) if not t.update(key_hash=trusted)]
    config = CurationConfig(heldout_fraction=0.5, heldout_salt="s")
    assert build_snapshot(rows, root=tmp_path / "a", config=config).manifest["heldout"]["trusted"] is False
    operator = replace(config, operator_heldout="ops/heldout.json")
    assert build_snapshot(rows, root=tmp_path / "b", config=operator).manifest["heldout"]["trusted"] is True
    m = build_snapshot(rows, root=tmp_path / "c", config=replace(config, trusted_keys=(trusted,))).manifest
    assert m["heldout"]["trusted"] is True and m["heldout"]["items"] == m["counts"]["heldout_eval_items"] > 0
    m = build_snapshot(rows, root=tmp_path / "d", config=replace(config, trusted_keys=("c" * 64,))).manifest
    assert m["heldout"]["trusted"] is False and m["counts"]["heldout_split"]["untrusted_key_conversations"] == 20


def test_max_share_per_key_holds(tmp_path):
    """One key answers most of the log: capped at 25% of each training file; keyless rows never capped."""
    big, small = "d" * 64, "e" * 64
    rows = []
    for i, key in enumerate([big] * 30 + [small] * 5 + [None] * 10):
        q = [msg(U, f"Question {i}?")]
        rows += [turn(f"c{i:03d}", 0, q, f"Answer {i}.", "down" if i % 3 == 0 else "up", key_hash=key,
                      correction=f"Better {i}." if i % 3 == 0 else None)]
    config = CurationConfig(heldout_fraction=0.0, max_share_per_key=0.25)
    snap = build_snapshot(rows, root=tmp_path / "capped", config=config)
    uncapped = build_snapshot(rows, root=tmp_path / "uncapped", config=replace(config, max_share_per_key=None))

    def keys(folder, name):
        return Counter(json.loads(x)["meta"]["key"] for x in (folder / name).read_text().splitlines())

    for name in ("train.jsonl", "preferences.jsonl", "preference_pairs.jsonl"):
        capped, before = keys(snap.path, name), keys(uncapped.path, name)
        total = sum(capped.values())
        assert all(n <= 0.25 * total for k, n in capped.items() if k is not None), (name, capped)
        assert capped[None] == before[None] > 0 and capped[key_digest(big)] < before[key_digest(big)]
    counts = snap.manifest["counts"]
    assert counts["removed_by_share_cap"]["train"] > 0 and counts["train"] == len((snap.path / "train.jsonl").read_text().splitlines())
    assert sum(counts["sources"]["train"].values()) == counts["train"]

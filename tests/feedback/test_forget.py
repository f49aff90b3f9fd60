"""`tunewheel data forget`: a conversation or a key leaves the store, the snapshots that held it
lose their data, and the adapter versions trained on them are marked.

    pytest tests/feedback/test_forget.py
"""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from feedback.db import make_db
from feedback.forget import forget, forgotten_snapshots
from feedback.models import Conversation, Deletion, Feedback, Turn
from feedback.queries import record_feedback
from learn.registry import Registry
from serve.cli import app as tunewheel_app
from tests.feedback.turns import bot, turn, user, write

ALICE, BOB, ADMIN = "a" * 64, "b" * 64, "c" * 64
SECRET = "my card is 4111 1111 1111 1111 and I live at 5 Elm Street"


def rate(db, turn_id, rating, key_hash=None, admin=False, correction=None):
    with Session(db) as s:
        record_feedback(s, turn_id=turn_id, rating=rating, comment=None, key_hash=key_hash, admin=admin, correction=correction)


def fill(db) -> None:
    """Alice's conversation c-forget (secret words, a correction), Bob's c-keep; the admin rated Bob's turn too."""
    q = [user(SECRET)]
    write(db, turn("f1", q, "Noted.", key_hash=ALICE, conversation_id="c-forget"),
          turn("f2", [*q, bot("Noted."), user("Where do I live?")], "Elm Street.", key_hash=ALICE, conversation_id="c-forget"),
          turn("k1", [user("What is 2+2?")], "Four.", key_hash=BOB, conversation_id="c-keep"))
    rate(db, "f1", "up", ALICE)
    rate(db, "f2", "down", ALICE, correction="At 5 Elm Street.")
    rate(db, "k1", "up", BOB)


@pytest.fixture
def setup(tmp_path):
    data_dir = tmp_path / "data"
    config = tmp_path / "tunewheel.toml"
    config.write_text(f'data_dir = "{data_dir}"\n\n[learn]\nheldout_fraction = 0.0\npii_scrub = false\n')
    db = make_db(f"sqlite:///{data_dir / 'tunewheel.db'}")
    fill(db)
    yield db, config, data_dir / "datasets" / "snapshots"
    db.dispose()


def cli(*args):
    result = CliRunner().invoke(tunewheel_app, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def snapshot_text(folder) -> str:
    return "".join(p.read_text() for p in folder.iterdir() if p.is_file())


def test_forget_a_conversation_removes_it_from_the_store_and_the_next_snapshot_and_flags_its_adapters(setup, tmp_path):
    db, config, snapshots = setup
    first = json.loads(cli("data", "curate", "--max-tokens", "0", "--config", config).stdout)
    assert "Elm Street" in snapshot_text(snapshots / first["version"])
    registry = Registry(db)
    trained, unrelated = registry.new_version_name("chat"), registry.new_version_name("chat")
    for name, snapshot_hash in ((trained, first["hash"]), (unrelated, "0" * 64)):
        (tmp_path / name).mkdir()
        registry.register(name, kind="chat", path=tmp_path / name, snapshot_hash=snapshot_hash)

    dry = cli("data", "forget", "--conversation", "c-forget", "--dry-run", "--config", config)
    assert "would delete 2 turn(s), 2 rating(s) (1 with a correction), 1 conversation(s)" in dry.stdout
    with Session(db) as s:
        assert s.get(Turn, "f1") is not None and not s.exec(select(Deletion)).all()

    out = cli("data", "forget", "--conversation", "c-forget", "--config", config)
    assert first["version"] in out.stdout and "adapters list" in out.stderr
    with Session(db) as s:
        assert s.get(Conversation, "c-forget") is None and s.get(Turn, "f1") is None and s.get(Turn, "f2") is None
        assert [f.turn_id for f in s.exec(select(Feedback))] == ["k1"]
        [deletion] = s.exec(select(Deletion)).all()
        assert deletion.target == "conversation" and deletion.target_hash == hashlib.sha256(b"c-forget").hexdigest()
        assert (deletion.turns, deletion.ratings, deletion.corrections, deletion.snapshots) == (2, 2, 1, [first["hash"]])
        assert "Elm" not in deletion.model_dump_json()  # the record keeps no content
    old = snapshots / first["version"]
    assert not (old / "train.jsonl").exists() and json.loads((old / "forgotten.json").read_text())["deletions"] == [deletion.id]
    assert "Elm Street" not in snapshot_text(old)

    second = json.loads(cli("data", "curate", "--max-tokens", "0", "--config", config).stdout)
    text = snapshot_text(snapshots / second["version"])
    assert "Elm Street" not in text and "4111" not in text and "Four." in text
    assert second["counts"]["turns"] == 1

    listing = cli("adapters", "list", "--config", config).stdout
    [flagged] = [line for line in listing.splitlines() if trained in line]
    assert "forgotten" in flagged and "forgotten" not in next(line for line in listing.splitlines() if unrelated in line)
    assert forgotten_snapshots(db) == {first["hash"]: [deletion.id]}


def test_forget_a_key_takes_its_turns_and_its_ratings_of_other_turns(tmp_path, db):
    fill(db)
    rate(db, "k1", "down", ADMIN, admin=True, correction="4")  # the admin's rating is now k1's current one
    result = forget(db, key_hash=ADMIN, snapshots=tmp_path / "none", requested_by="cli")
    assert (result.deletion.turns, result.deletion.ratings, result.deletion.corrections) == (0, 1, 1)
    with Session(db) as s:
        k1 = s.get(Turn, "k1")
        assert (k1.rating, k1.correction) == ("up", None)  # back to Bob's own rating
    forget(db, key_hash=ALICE, snapshots=tmp_path / "none")
    with Session(db) as s:
        assert [t.id for t in s.exec(select(Turn))] == ["k1"] and s.get(Conversation, "c-forget") is None


def test_forget_needs_exactly_one_target(tmp_path, db):
    with pytest.raises(ValueError, match="exactly one"):
        forget(db, snapshots=tmp_path)
    result = CliRunner().invoke(tunewheel_app, ["data", "forget", "--key", "alice"])
    assert result.exit_code == 1 and "sha256 hex" in result.output


@pytest.mark.postgres
def test_postgres_forgets_and_keeps_its_secret(pg_fresh_url, tmp_path):
    from feedback.queries import store_secret

    db = make_db(pg_fresh_url)
    fill(db)
    assert store_secret(db, "heldout_salt") == store_secret(db, "heldout_salt")
    result = forget(db, conversation_id="c-forget", snapshots=tmp_path)
    assert (result.deletion.turns, result.deletion.ratings, result.deletion.corrections) == (2, 2, 1)
    forget(db, key_hash=BOB, snapshots=tmp_path)
    with Session(db) as s:
        assert s.exec(select(Turn)).all() == [] and len(s.exec(select(Deletion)).all()) == 2
    db.dispose()

"""`tunewheel data forget`: delete what one API key or one conversation left in the store, and
everything curated from it.

    tunewheel data forget --key <sha256 hex, as in serve.api_keys> [--dry-run]
    tunewheel data forget --conversation <id> [--dry-run]
    POST /admin/forget {"key": "<sha256 hex>"} | {"conversation": "<id>"}     (serve/gateway/routes_forget.py)

    result = forget(db, conversation_id="c-1", snapshots=datasets / "snapshots", requested_by="cli")
    forgotten_snapshots(db)      # {snapshot content hash: [deletion ids]}: `adapters list` flags their versions

What goes: the turns (request messages, answers), every rating and correction given on them
(and, for a key, every rating or correction that key gave on other turns, whose current rating
then falls back to the one before), and the conversations left without a turn. A snapshot
that drew on the target (its `sources.jsonl` names the conversation or key digest) loses its
data files; its manifest and sources stay, with `forgotten.json` saying which deletion emptied
it, so later snapshots, the learner's replay and the trainer never see the content again. The
adapter versions trained on such a snapshot keep serving until the operator retrains and
promotes a new one: `tunewheel adapters list` marks them. What is kept is one `Deletion` row
per call: the target's kind and sha256 digest, the counts and the snapshots, never the content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, delete, func, select, update
from sqlmodel import Session

from feedback.curate import conversation_digest, key_digest
from feedback.models import Conversation, Deletion, Feedback, Turn, utcnow
from feedback.snapshot import DATA_FILES, FORGOTTEN_FILE, SOURCES_FILE, Snapshot, iter_snapshots


@dataclass
class ForgetResult:
    deletion: Deletion  # not stored on a dry run (id None)
    snapshots: list[Snapshot] = field(default_factory=list)  # those that held the target
    dry_run: bool = False

    def to_dict(self) -> dict:
        d = self.deletion.model_dump(mode="json")
        return {"deletion": d, "snapshots": [{"version": s.version, "hash": s.manifest["hash"]} for s in self.snapshots],
                "dry_run": self.dry_run}

    def describe(self) -> str:
        d = self.deletion
        verb = "would delete" if self.dry_run else "deleted"
        what = f"{verb} {d.turns} turn(s), {d.ratings} rating(s) ({d.corrections} with a correction), {d.conversations} conversation(s)"
        held = ", ".join(s.version for s in self.snapshots) or "none"
        record = "" if self.dry_run else f"; deletion record {d.id} keeps the counts, not the content"
        return f"{what}{record}. Snapshots that held it{' (data files removed)' if not self.dry_run else ''}: {held}"


def forget(db: Engine, *, key_hash: str | None = None, conversation_id: str | None = None, snapshots: str | Path,
           requested_by: str | None = None, dry_run: bool = False) -> ForgetResult:
    """Delete a key's (`key_hash`, sha256 hex as in serve.api_keys) or a conversation's data;
    exactly one of the two. Snapshots under `snapshots` that drew on it lose their data files."""
    if (key_hash is None) == (conversation_id is None):
        raise ValueError("forget needs exactly one of a key hash or a conversation id")
    target, digest = ("key", key_digest(key_hash)) if key_hash is not None else ("conversation", conversation_digest(conversation_id))
    with Session(db) as session:
        turns, convs, ratings = _selection(key_hash, conversation_id)
        deletion = Deletion(target=target, target_hash=digest, requested_by=requested_by,
                            turns=session.scalar(select(func.count()).select_from(turns.subquery())),
                            conversations=session.scalar(select(func.count()).select_from(convs.subquery())),
                            ratings=session.scalar(select(func.count()).where(ratings)),
                            corrections=session.scalar(select(func.count()).where(ratings, Feedback.correction.is_not(None))))
        held = [s for s in iter_snapshots(snapshots, forgotten=True) if _holds(s, target, digest)]
        deletion.snapshots = [s.manifest["hash"] for s in held]
        if dry_run:
            return ForgetResult(deletion, held, dry_run=True)
        rerate = list(session.scalars(select(Feedback.turn_id).where(ratings, Feedback.turn_id.not_in(turns)).distinct()))
        convs_ids = list(session.scalars(convs))
        session.execute(delete(Feedback).where(ratings))
        session.execute(delete(Turn).where(Turn.id.in_(turns)))
        _rerate(session, rerate)
        for cid in convs_ids:
            if session.scalar(select(func.count()).where(Turn.conversation_id == cid)) == 0:
                session.execute(delete(Conversation).where(Conversation.id == cid))
            else:  # other keys' turns stay (threads older than key scoping); the owner is forgotten
                session.execute(update(Conversation).where(Conversation.id == cid).values(key_hash=None))
        session.add(deletion)
        session.commit()
        session.refresh(deletion)
    for snap in held:
        _empty(snap, deletion.id)
    return ForgetResult(deletion, held)


def _selection(key_hash: str | None, conversation_id: str | None):
    """(turn ids, conversation ids) as subqueries, and the condition on the ratings to delete."""
    if key_hash is not None:
        turns = select(Turn.id).where(Turn.key_hash == key_hash)
        convs = select(Conversation.id).where(Conversation.key_hash == key_hash)
        return turns, convs, (Feedback.turn_id.in_(turns)) | (Feedback.key_hash == key_hash)
    turns = select(Turn.id).where(Turn.conversation_id == conversation_id)
    convs = select(Conversation.id).where(Conversation.id == conversation_id)
    return turns, convs, Feedback.turn_id.in_(turns)


def _rerate(session: Session, turn_ids: list[str]) -> None:
    """Turns that lost some of their ratings take the latest one left (or none) as their current one."""
    for turn_id in turn_ids:
        latest = session.scalars(select(Feedback).where(Feedback.turn_id == turn_id).order_by(Feedback.id.desc()).limit(1)).first()
        values = ({"rating": latest.rating, "correction": latest.correction, "rated_at": latest.created_at} if latest
                  else {"rating": None, "correction": None, "rated_at": None})
        session.execute(update(Turn).where(Turn.id == turn_id).values(**values))


def _holds(snap: Snapshot, kind: str, digest: str) -> bool:
    path = snap.path / SOURCES_FILE
    if not path.is_file():  # a snapshot from before sources were recorded: it may hold anything
        return True
    with open(path, encoding="utf-8") as f:
        return any((s := json.loads(line))["kind"] == kind and s["sha256"] == digest for line in f if line.strip())


def _empty(snap: Snapshot, deletion_id: int) -> None:
    """Remove a snapshot's data files; `forgotten.json` lists the deletions that did."""
    note_path = snap.path / FORGOTTEN_FILE
    note = json.loads(note_path.read_text()) if note_path.is_file() else {"deletions": [], "removed": list(DATA_FILES)}
    note["deletions"].append(deletion_id)
    note["at"] = utcnow().isoformat(timespec="seconds")
    for name in DATA_FILES:
        (snap.path / name).unlink(missing_ok=True)
    note_path.write_text(json.dumps(note, indent=2) + "\n")


def forgotten_snapshots(db: Engine) -> dict[str, list[int]]:
    """{content hash of a snapshot emptied by `forget`: the ids of the deletions that emptied it}."""
    out: dict[str, list[int]] = {}
    with Session(db) as session:
        for deletion in session.scalars(select(Deletion).order_by(Deletion.id)):
            for h in deletion.snapshots:
                out.setdefault(h, []).append(deletion.id)
    return out

"""What a curation run remembers across conversations, on disk, and per conversation, in memory.

    db = sqlite3.connect("")                        # a private temporary file, gone on close
    seen = DiskSet(db, "exact"); seen.add(exact_key(messages))   # False: a duplicate
    pairs = PairIndex(db); pairs.add(prompt, answer, label=True, origin=...); pairs.pairs()
    memo = Memo(pii_counts, scrub=True); memo.scrub(messages)

Global state (duplicate keys, rated answers by prompt, the conversations and keys a snapshot
drew on) lives in a private on-disk SQLite file, so memory stays bounded whatever the size of
the log; `Memo` holds one conversation's scrubbed and normalized texts.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from feedback.pii import scrub_text

_PUNCT = re.compile(r"[^\w\s]|_")
_MAYBE_PII = re.compile(r"[\d@]")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: what normalized duplicates share."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def digest(pairs: Iterable[tuple[str, str]]) -> bytes:
    """A 16-byte digest of (role, content) pairs."""
    joined = "\x1e".join(f"{role}\x1f{content}" for role, content in pairs)
    return hashlib.blake2b(joined.encode(), digest_size=16).digest()


def exact_key(messages: list[dict]) -> bytes:
    return digest((m["role"], m["content"]) for m in messages)


def row_key(kind: str, row: dict) -> bytes:
    """The exact-duplicate key of a preference row (prompt, answers and label)."""
    answers = [(name, m["content"]) for name in ("completion", "chosen", "rejected") for m in row.get(name, [])]
    return digest([("kind", kind), *((m["role"], m["content"]) for m in row["prompt"]), *answers, ("label", str(row.get("label")))])


class DiskSet:
    """A set of keys in a table of the run's SQLite file: membership without memory growth."""

    def __init__(self, db: sqlite3.Connection, name: str):
        self.db, self.name = db, name
        db.execute(f"CREATE TABLE {name} (k BLOB PRIMARY KEY) WITHOUT ROWID")

    def add(self, key: bytes | str) -> bool:
        """True when the key is new."""
        return self.db.execute(f"INSERT OR IGNORE INTO {self.name} VALUES (?)", (key,)).rowcount == 1

    def __iter__(self) -> Iterator:
        """Every key, sorted."""
        return (k for (k,) in self.db.execute(f"SELECT k FROM {self.name} ORDER BY k"))


@dataclass(frozen=True)
class Origin:
    """Where a row came from: digests of its conversation id and API key hash (None: no key)."""

    conversation: str
    key: str | None


class PairIndex:
    """The model's rated answers by prompt; `pairs()` gives a chosen/rejected row wherever a
    prompt got both an up- and a down-rated answer (with the origins of both sides).

    Only a digest of each prompt is kept; a prompt's text is stored once it has both ratings,
    so the (long) prompts of unpaired answers are never serialized."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        db.execute("CREATE TABLE pref (n INTEGER PRIMARY KEY, k BLOB, label INTEGER, completion TEXT, conv TEXT, key TEXT)")
        db.execute("CREATE INDEX pref_k ON pref (k, label)")
        db.execute("CREATE TABLE prompt (k BLOB PRIMARY KEY, messages TEXT) WITHOUT ROWID")

    def add(self, prompt: list[dict], answer: str, *, label: bool, origin: Origin) -> None:
        key = exact_key(prompt)
        self.db.execute("INSERT INTO pref (k, label, completion, conv, key) VALUES (?, ?, ?, ?, ?)",
                        (key, int(label), answer, origin.conversation, origin.key))
        if self.db.execute("SELECT 1 FROM pref WHERE k = ? AND label = ? LIMIT 1", (key, 1 - int(label))).fetchone():
            self.db.execute("INSERT OR IGNORE INTO prompt VALUES (?, ?)", (key, json.dumps(prompt, ensure_ascii=False)))

    def pairs(self) -> Iterator[tuple[dict, tuple[Origin, Origin]]]:
        """(row, (chosen's origin, rejected's origin)); `meta.key` is the chosen answer's key."""
        q = """SELECT p.messages, u.completion, d.completion, u.conv, u.key, d.conv, d.key FROM prompt p
               JOIN pref u ON u.k = p.k AND u.label = 1 JOIN pref d ON d.k = p.k AND d.label = 0
               WHERE u.completion != d.completion ORDER BY u.n, d.n"""
        for prompt, chosen, rejected, uc, uk, dc, dk in self.db.execute(q):
            row = {"prompt": json.loads(prompt), "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}],
                   "meta": {"key": uk, "rating": None, "source": "pair"}}
            yield row, (Origin(uc, uk), Origin(dc, dk))


class Memo:
    """One conversation's scrubbed and normalized texts: turn k's request repeats the messages
    of turns < k, so each text is processed once per conversation, not once per turn. PII finds
    are counted into `pii` the first time a text is scrubbed."""

    def __init__(self, pii: Counter, scrub: bool):
        self.pii, self.scrub_on = pii, scrub
        self.scrubbed: dict[str, str] = {}
        self.normalized: dict[str, str] = {}

    def text(self, text: str) -> str:
        """`text` scrubbed (when scrubbing is on); the very same object when nothing was found."""
        if not self.scrub_on:
            return text
        hit = self.scrubbed.get(text)
        if hit is None:
            hit = self.scrubbed[text] = scrub_text(text, self.pii) if _MAYBE_PII.search(text) else text
        return text if hit == text else hit

    def scrub(self, messages: list[dict]) -> list[dict]:
        """Messages with their contents scrubbed (other fields kept); the same list when nothing changed."""
        out = None
        for i, m in enumerate(messages):
            text = self.text(m["content"])
            if text is not m["content"]:
                out = out if out is not None else list(messages)
                out[i] = {**m, "content": text}
        return messages if out is None else out

    def normalized_key(self, messages: list[dict]) -> bytes:
        out = []
        for m in messages:
            norm = self.normalized.get(m["content"])
            if norm is None:
                norm = self.normalized[m["content"]] = normalize_text(m["content"])
            out.append((m["role"], norm))
        return digest(out)

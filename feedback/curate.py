"""Curation: the turn log and its ratings -> SFT examples and preference rows, filtered and split.

    counts = curate(iter_turns(session), config=CurationConfig(max_tokens=384), count_tokens=counter, sinks=sinks)

Pure steps over rows (a `Turn` or a dict with the same fields), composed by `curate`:
  group_conversations  consecutive turns of one conversation (the input is ordered by
                       conversation_id, seq, so memory holds one conversation at a time)
  sft_example          an up-rated, completed turn -> its request messages (earlier turns as
                       context, assistant context marked `"weight": 0`) + its answer as target.
                       Down-rated, unrated and incomplete/failed turns are never targets.
                       The target is what the chat model said: `raw_answer` when a restyler
                       rewrote the answer the client saw.
  preference_row       up/down-rated turns -> TRL's unpaired `{prompt, completion, label}`;
                       `PairIndex` pairs prompts that got both into `{prompt, chosen, rejected}`
  scrub_pii            e-mails, phone and card-like numbers -> [EMAIL] [PHONE] [CARD]
  filters              empty answers, invalid format, exact and normalized duplicates, too
                       many tokens (the base model's tokenizer, batched) — each with a count
  is_heldout           deterministic split by a hash of the conversation id
Global state (duplicate keys, preference pairs) lives in a private on-disk SQLite file, so
memory stays bounded whatever the size of the log.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from feedback.check import TokenCounter, validate_messages, within_limit
from feedback.conversations import text_of

FILTERS = ("empty_answer", "invalid", "exact_duplicate", "normalized_duplicate", "too_long")


def get(row: Any, name: str, default: Any = None) -> Any:
    """A field of a Turn or of a plain dict row."""
    return row.get(name, default) if isinstance(row, dict) else getattr(row, name, default)


# ---------------------------------------------------------------------------------------- rows -> examples


def group_conversations(rows: Iterable[Any]) -> Iterator[list[Any]]:
    """Consecutive rows with the same conversation_id, in input order."""
    group: list[Any] = []
    for row in rows:
        if group and get(row, "conversation_id") != get(group[0], "conversation_id"):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def target_answer(turn: Any) -> str:
    """What the chat model said: the raw answer when a restyler rewrote it, else the answer."""
    raw = get(turn, "raw_answer")
    return text_of(raw if get(turn, "style") and raw else get(turn, "answer"))


def clean_messages(messages: list[dict]) -> list[dict]:
    """Only role and (text) content; assistant messages of the context get weight 0."""
    out = []
    for m in messages:
        msg = {"role": m.get("role"), "content": text_of(m.get("content"))}
        if msg["role"] == "assistant":
            msg["weight"] = 0
        out.append(msg)
    return out


def rebuild_conversation(turns: list[Any]) -> list[dict]:
    """The conversation as its client last saw it: the latest turn's messages and its answer."""
    last = max(turns, key=lambda t: get(t, "seq", 0))
    return [*clean_messages(get(last, "request_messages") or []), {"role": "assistant", "content": target_answer(last)}]


def is_target(turn: Any) -> bool:
    return get(turn, "rating") == "up" and get(turn, "status", "ok") == "ok"


def sft_example(turn: Any) -> list[dict] | None:
    """The messages of an up-rated completed turn with its answer as the only target, else None."""
    if not is_target(turn):
        return None
    return [*clean_messages(get(turn, "request_messages") or []), {"role": "assistant", "content": target_answer(turn)}]


def preference_row(turn: Any) -> dict | None:
    """TRL's unpaired preference format for an up/down-rated completed turn with an answer."""
    rating = get(turn, "rating")
    if rating not in ("up", "down") or get(turn, "status", "ok") != "ok" or not target_answer(turn).strip():
        return None
    prompt = [{k: v for k, v in m.items() if k != "weight"} for m in clean_messages(get(turn, "request_messages") or [])]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": target_answer(turn)}], "label": rating == "up"}


# ---------------------------------------------------------------------------------------- PII

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A run of digits with single separators; what it is depends on its digit count and shape.
NUMBER_RUN = re.compile(r"(?<![\w+])(?:\+\s?)?\(?\d[\d()]*(?:[ .-]\(?\d[\d()]*)*(?![\w])")
LOCAL_PHONE = re.compile(r"\d{3}[ .-]\d{4}")
_MAYBE_PII = re.compile(r"@|\d")
DATE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")


def _number_placeholder(match: re.Match, counts: Counter) -> str:
    s = match.group(0)
    digits = sum(c.isdigit() for c in s)
    plain = not any(c in s for c in "+()")
    if 13 <= digits <= 19 and plain and "." not in s:
        counts["card"] += 1
        return "[CARD]"
    if DATE.fullmatch(s) or re.fullmatch(r"\d+\.\d+", s):
        return s
    if 10 <= digits <= 15 or (7 <= digits <= 9 and (not plain or LOCAL_PHONE.fullmatch(s))):
        counts["phone"] += 1
        return "[PHONE]"
    return s


def scrub_pii(text: str, counts: Counter | None = None) -> str:
    """Replace e-mail addresses, phone numbers and card-like numbers with placeholders."""
    counts = counts if counts is not None else Counter()

    def email(m: re.Match) -> str:
        counts["email"] += 1
        return "[EMAIL]"

    text = EMAIL.sub(email, text)
    return NUMBER_RUN.sub(lambda m: _number_placeholder(m, counts), text)


def scrub_messages(messages: list[dict], counts: Counter) -> list[dict]:
    return [{**m, "content": scrub_pii(m["content"], counts)} for m in messages]


# ---------------------------------------------------------------------------------------- keys, split

_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: what normalized duplicates share."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def _digest(pairs: Iterable[tuple[str, str]]) -> bytes:
    joined = "\x1e".join(f"{role}\x1f{content}" for role, content in pairs)
    return hashlib.blake2b(joined.encode(), digest_size=16).digest()


def exact_key(messages: list[dict]) -> bytes:
    return _digest((m["role"], m["content"]) for m in messages)


def normalized_key(messages: list[dict]) -> bytes:
    return _digest((m["role"], normalize_text(m["content"])) for m in messages)


def is_heldout(conversation_id: str, fraction: float) -> bool:
    """Deterministic: the same conversation always lands on the same side."""
    h = int.from_bytes(hashlib.sha256(str(conversation_id).encode()).digest()[:8], "big")
    return h / 2**64 < fraction


class DiskSet:
    """A set of keys in a private temporary SQLite file: membership without memory growth."""

    def __init__(self, db: sqlite3.Connection, name: str):
        self.db, self.name = db, name
        db.execute(f"CREATE TABLE {name} (k BLOB PRIMARY KEY) WITHOUT ROWID")

    def add(self, key: bytes) -> bool:
        """True when the key is new."""
        return self.db.execute(f"INSERT OR IGNORE INTO {self.name} VALUES (?)", (key,)).rowcount == 1


class PairIndex:
    """Rated answers by prompt; `pairs()` gives chosen/rejected pairs where a prompt got both.

    Only a digest of each prompt is kept; a prompt's text is stored once it has both an up and
    a down rating, so the (long) prompts of unpaired rows are never serialized."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        db.execute("CREATE TABLE pref (n INTEGER PRIMARY KEY, k BLOB, label INTEGER, completion TEXT)")
        db.execute("CREATE INDEX pref_k ON pref (k, label)")
        db.execute("CREATE TABLE prompt (k BLOB PRIMARY KEY, messages TEXT) WITHOUT ROWID")

    def add(self, row: dict) -> None:
        key, label = exact_key(row["prompt"]), int(row["label"])
        self.db.execute("INSERT INTO pref (k, label, completion) VALUES (?, ?, ?)", (key, label, row["completion"][0]["content"]))
        if self.db.execute("SELECT 1 FROM pref WHERE k = ? AND label = ? LIMIT 1", (key, 1 - label)).fetchone():
            self.db.execute("INSERT OR IGNORE INTO prompt VALUES (?, ?)", (key, json.dumps(row["prompt"], ensure_ascii=False)))

    def pairs(self) -> Iterator[dict]:
        q = """SELECT p.messages, u.completion, d.completion FROM prompt p
               JOIN pref u ON u.k = p.k AND u.label = 1 JOIN pref d ON d.k = p.k AND d.label = 0
               WHERE u.completion != d.completion ORDER BY u.n, d.n"""
        for prompt, chosen, rejected in self.db.execute(q):
            yield {"prompt": json.loads(prompt), "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}


# ---------------------------------------------------------------------------------------- the run


@dataclass
class CurationConfig:
    max_tokens: int | None = None  # examples longer than this (chat template included) are dropped
    pii_scrub: bool = True
    heldout_fraction: float = 0.1
    token_batch: int = 1000  # examples tokenized together (bounded memory, fast batch encoding)


@dataclass
class Sinks:
    """Where curated rows go; each is called once per row, in a deterministic order."""

    train: Callable[[dict], None]
    heldout: Callable[[dict], None]
    preference: Callable[[dict], None] = lambda row: None
    pair: Callable[[dict], None] = lambda row: None


@dataclass
class CurationCounts:
    turns: int = 0
    conversations: int = 0
    rated_up: int = 0
    rated_down: int = 0
    unrated: int = 0
    rated_not_ok: int = 0  # rated, but the turn did not complete: never a target
    candidates: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    pii: dict[str, int] = field(default_factory=lambda: {"email": 0, "phone": 0, "card": 0})
    train: int = 0
    heldout: int = 0
    preferences: int = 0
    preference_pairs: int = 0
    first_turn_at: str | None = None
    last_turn_at: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _count_turn(turn: Any, counts: CurationCounts, window: list) -> None:
    counts.turns += 1
    rating, status = get(turn, "rating"), get(turn, "status", "ok")
    if rating is None:
        counts.unrated += 1
    elif status != "ok":
        counts.rated_not_ok += 1
    elif rating == "up":
        counts.rated_up += 1
    elif rating == "down":
        counts.rated_down += 1
    at = get(turn, "created_at")
    if at is not None:
        window[0] = at if window[0] is None or at < window[0] else window[0]
        window[1] = at if window[1] is None or at > window[1] else window[1]


class _Memo:
    """Per-conversation memo of scrubbed and normalized texts: turn k's request repeats the
    messages of turns < k, so each text is processed once per conversation, not once per turn."""

    def __init__(self, pii: Counter, scrub: bool):
        self.pii, self.scrub = pii, scrub
        self.scrubbed: dict[str, tuple[str, Counter | None]] = {}
        self.normalized: dict[str, str] = {}

    def scrub_messages(self, messages: list[dict], count: bool = True) -> list[dict]:
        if not self.scrub:
            return messages
        out = []
        for m in messages:
            text = m["content"]
            hit = self.scrubbed.get(text)
            if hit is None:
                found: Counter = Counter()
                hit = self.scrubbed[text] = (scrub_pii(text, found) if _MAYBE_PII.search(text) else text, found or None)
            if count and hit[1]:
                self.pii.update(hit[1])
            out.append({**m, "content": hit[0]})
        return out

    def normalize(self, text: str) -> str:
        norm = self.normalized.get(text)
        if norm is None:
            norm = self.normalized[text] = normalize_text(text)
        return norm

    def normalized_key(self, messages: list[dict]) -> bytes:
        return _digest((m["role"], self.normalize(m["content"])) for m in messages)


class _Candidates:
    """Turns -> (held out?, messages) of each SFT example that passes every filter but the token
    limit (which needs batches); preference rows go to their sinks on the way."""

    def __init__(self, db: sqlite3.Connection, config: CurationConfig, counts: CurationCounts, sinks: Sinks):
        self.config, self.counts, self.sinks = config, counts, sinks
        self.exact, self.normalized, self.prefs = DiskSet(db, "exact"), DiskSet(db, "normalized"), PairIndex(db)
        self.pii: Counter = Counter()
        self.window: list = [None, None]

    def __call__(self, rows: Iterable[Any]) -> Iterator[tuple[bool, list[dict]]]:
        for turns in group_conversations(rows):
            self.counts.conversations += 1
            held = is_heldout(get(turns[0], "conversation_id"), self.config.heldout_fraction)
            memo = _Memo(self.pii, self.config.pii_scrub)
            for turn in turns:
                _count_turn(turn, self.counts, self.window)
                if not held:
                    self._preference(turn, memo)
                msgs = self._example(turn, memo)
                if msgs is not None:
                    yield held, msgs

    def _preference(self, turn: Any, memo: _Memo) -> None:
        row = preference_row(turn)
        if row is None:
            return
        row["prompt"] = memo.scrub_messages(row["prompt"], count=False)  # counted once, on the SFT examples
        row["completion"] = memo.scrub_messages(row["completion"], count=False)
        self.counts.preferences += 1
        self.sinks.preference(row)
        self.prefs.add(row)

    def _example(self, turn: Any, memo: _Memo) -> list[dict] | None:
        msgs = sft_example(turn)
        if msgs is None:
            return None
        removed = self.counts.removed
        self.counts.candidates += 1
        if not msgs[-1]["content"].strip():
            removed["empty_answer"] += 1
            return None
        msgs = memo.scrub_messages(msgs)
        if validate_messages(msgs):
            removed["invalid"] += 1
        elif not self.exact.add(exact_key(msgs)):
            removed["exact_duplicate"] += 1
        elif not self.normalized.add(memo.normalized_key(msgs)):
            removed["normalized_duplicate"] += 1
        else:
            return msgs
        return None


def curate(rows: Iterable[Any], *, config: CurationConfig, count_tokens: TokenCounter | None, sinks: Sinks) -> CurationCounts:
    """Stream turns (ordered by conversation_id, seq) through every curation step into `sinks`."""
    counts = CurationCounts()
    db = sqlite3.connect("")  # private temporary on-disk database, removed on close
    db.execute("PRAGMA journal_mode=OFF")
    try:
        candidates = _Candidates(db, config, counts, sinks)

        def too_long(_held: bool, _tokens: int) -> None:
            counts.removed["too_long"] += 1

        # The token limit of the validator (feedback/check.py), so curated data passes `data check`.
        for held, msgs, _ in within_limit(candidates(rows), max_tokens=config.max_tokens, count_tokens=count_tokens,
                                          on_too_long=too_long, batch=config.token_batch):
            if held:
                counts.heldout += 1
                sinks.heldout({"messages": msgs})
            else:
                counts.train += 1
                sinks.train({"messages": msgs})
        for pair in candidates.prefs.pairs():
            counts.preference_pairs += 1
            sinks.pair(pair)
    finally:
        db.close()
    counts.pii.update(candidates.pii)
    window = candidates.window
    counts.first_turn_at, counts.last_turn_at = (at.isoformat() if isinstance(at, datetime) else at for at in window)
    return counts

"""Curation: the turn log, its ratings and corrections -> SFT examples, preference rows and
held-out items, filtered and split.

    counts = curate(iter_log(db), config=CurationConfig(max_tokens=384), count_tokens=counter, sinks=sinks)

What one completed turn gives. The model's own rated answers and explicit corrections are the
only answers ever written; assistant messages a client sent as context are marked
`"weight": 0` in SFT examples (context, not a target) and only ever appear inside a prompt:

    rating  correction  SFT target       KTO rows (preferences)                    DPO pair
    up      -           its answer       answer desirable                           -
    down    -           -                answer undesirable                         -
    any     yes         the correction   answer (by its rating), correction desirable  correction over answer
    none / incomplete / failed turn: nothing

Two rated answers (one up, one down) to the same prompt make a pair too (source "pair").
Every row carries `meta`: {"key": sha256 of the API key hash or null, "rating", "source"}
(source rated | corrected | pair; feedback/check.py validates it). The target is what the
chat model said: `raw_answer` when a restyler rewrote the answer the client saw.

Steps, each counted in `CurationCounts`:
  split    held-out conversations (feedback/heldout.py): their SFT examples go to the held-out
           sink and their evaluation item (trusted gold answers only) to `heldout_item`; they
           give no preference rows
  scrub    PII placeholders (feedback/pii.py), each distinct text of a conversation once
  filters  empty answers, invalid format, exact and normalized duplicates (SFT); invalid rows
           and exact duplicates (preference rows); too many tokens (base model's tokenizer, batched)
  shorten  a row over the token limit loses its oldest exchanges (feedback/shorten.py) until it
           fits (`shortened`); only a row that does not fit even then is removed as too_long
At the end `sinks.source` hears every conversation and key (as digests) that a written row came
from: the snapshot keeps them so that `data forget` finds the snapshots that held its target.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from feedback.check import TokenCounter, token_sequences, validate_messages, validate_prompt, validate_row
from feedback.shorten import fitting
from feedback.conversations import text_of
from feedback.dedup import DiskSet, Memo, Origin, PairIndex, exact_key, normalize_text, row_key
from feedback.heldout import Split, correction_of, get, gold_answer, heldout_item, item_messages, target_answer
from feedback.pii import COUNTER_NAMES

FILTERS = ("empty_answer", "invalid", "exact_duplicate", "normalized_duplicate", "too_long")
ROW_FILTERS = ("invalid", "exact_duplicate", "too_long")
_MIXED = "\x00mixed"  # the key of a conversation whose turns came from several keys


def key_digest(key_hash: str | None) -> str | None:
    """How a snapshot names an API key: sha256 hex of the key's hash (None without a key)."""
    return hashlib.sha256(key_hash.encode()).hexdigest() if key_hash else None


def conversation_digest(conversation_id: str) -> str:
    """How a snapshot names a conversation: sha256 hex of its id."""
    return hashlib.sha256(str(conversation_id).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- one turn


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


def clean_messages(messages: list[dict]) -> list[dict]:
    """Only role and (text) content; assistant messages of the context get weight 0."""
    out = []
    for m in messages:
        msg = {"role": m.get("role"), "content": text_of(m.get("content"))}
        if msg["role"] == "assistant":
            msg["weight"] = 0
        out.append(msg)
    return out


def prompt_of(turn: Any) -> list[dict]:
    """The turn's request messages as a preference row's prompt (role and text only)."""
    return [{"role": m.get("role"), "content": text_of(m.get("content"))} for m in get(turn, "request_messages") or []]


def meta_of(turn: Any, source: str) -> dict:
    return {"key": key_digest(get(turn, "key_hash")), "rating": get(turn, "rating"), "source": source}


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_example(turn: Any) -> dict | None:
    """The turn's SFT example (its request as context, then its correction or its up-rated
    answer as the one target), or None when the turn has no target."""
    if get(turn, "status", "ok") != "ok" or (correction_of(turn) is None and get(turn, "rating") != "up"):
        return None
    target = gold_answer(turn) or ""  # an up-rated empty answer: kept here, counted by the filters
    source = "corrected" if correction_of(turn) is not None else "rated"
    return {"messages": [*clean_messages(get(turn, "request_messages") or []), *_answer(target)], "meta": meta_of(turn, source)}


def preference_rows(turn: Any) -> list[dict]:
    """TRL's unpaired (KTO) rows of a rated, completed turn: its answer labelled by the rating,
    and its correction as a desirable answer."""
    rating = get(turn, "rating")
    if rating not in ("up", "down") or get(turn, "status", "ok") != "ok":
        return []
    prompt, answer, correction = prompt_of(turn), target_answer(turn), correction_of(turn)
    rows = []
    if answer.strip():
        rows.append({"prompt": prompt, "completion": _answer(answer), "label": rating == "up",
                     "meta": meta_of(turn, "corrected" if correction else "rated")})
    if correction:
        rows.append({"prompt": prompt, "completion": _answer(correction), "label": True, "meta": meta_of(turn, "corrected")})
    return rows


def correction_pair(turn: Any) -> dict | None:
    """A DPO row with the turn's correction chosen over the model's answer, or None (no
    correction, no answer, or a correction that only restates the answer)."""
    correction, answer = correction_of(turn), target_answer(turn)
    if correction is None or get(turn, "status", "ok") != "ok" or normalize_text(correction) == normalize_text(answer):
        return None
    return {"prompt": prompt_of(turn), "chosen": _answer(correction), "rejected": _answer(answer), "meta": meta_of(turn, "corrected")}


# ---------------------------------------------------------------------------------------- the run


@dataclass
class CurationConfig:
    """How curation turns the log into data (learn/settings.py builds it from `[learn]`)."""

    max_tokens: int | None = None  # rows longer than this (chat template included) are dropped
    pii_scrub: bool = True
    heldout_fraction: float = 0.1
    heldout_salt: str = ""  # the split's secret; create_snapshot takes the store's
    trusted_keys: tuple[str, ...] = ()  # key hashes whose conversations may be held out; () = any
    max_share_per_key: float | None = None  # applied to the snapshot's files (feedback/share.py)
    operator_heldout: str | None = None  # learn.heldout_file, for the manifest's verdict
    token_batch: int = 1000  # rows tokenized together (bounded memory, fast batch encoding)


def _noop(*_: Any) -> None:
    return None


@dataclass
class Sinks:
    """Where curated rows go; each is called once per row, in a deterministic order."""

    train: Callable[[dict], None]
    heldout: Callable[[dict], None]
    preference: Callable[[dict], None] = _noop
    pair: Callable[[dict], None] = _noop
    heldout_item: Callable[[dict], None] = _noop
    source: Callable[[str, str], None] = _noop  # ("conversation" | "key", digest), sorted, at the end


def _zeros(names: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(names, 0)


@dataclass
class CurationCounts:
    turns: int = 0
    conversations: int = 0
    rated_up: int = 0
    rated_down: int = 0  # without a correction: a KTO row, never an SFT target
    unrated: int = 0
    corrected: int = 0  # completed turns with a correction (any rating)
    rated_not_ok: int = 0  # rated, but the turn did not complete: never a target
    candidates: int = 0
    removed: dict[str, int] = field(default_factory=lambda: _zeros(FILTERS))
    removed_preferences: dict[str, int] = field(default_factory=lambda: _zeros(ROW_FILTERS))
    removed_pairs: dict[str, int] = field(default_factory=lambda: _zeros(("correction_same_as_answer", *ROW_FILTERS)))
    pii: dict[str, int] = field(default_factory=lambda: _zeros(COUNTER_NAMES))
    shortened: dict[str, int] = field(default_factory=lambda: _zeros(("sft", "kto", "dpo")))  # cut to their last turns
    train: int = 0
    heldout: int = 0
    preferences: int = 0
    preference_pairs: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "train": _zeros(("rated", "corrected")), "preferences": _zeros(("rated", "corrected")),
        "preference_pairs": _zeros(("corrected", "pair"))})
    heldout_split: dict[str, int] = field(default_factory=lambda: _zeros(
        ("conversations", "items", "turns_without_gold", "items_too_long", "untrusted_key_conversations")))
    first_turn_at: str | None = None
    last_turn_at: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def count_turn(self, turn: Any, window: list) -> None:
        self.turns += 1
        rating, status = get(turn, "rating"), get(turn, "status", "ok")
        if rating is None:
            self.unrated += 1
        elif status != "ok":
            self.rated_not_ok += 1
        elif rating == "up":
            self.rated_up += 1
        elif rating == "down":
            self.rated_down += 1
        self.corrected += status == "ok" and correction_of(turn) is not None
        at = get(turn, "created_at")
        if at is not None:
            window[0] = at if window[0] is None or at < window[0] else window[0]
            window[1] = at if window[1] is None or at > window[1] else window[1]


def _sequences(row: dict) -> list[list[dict]]:
    """The message lists whose longest token count is a row's length, whatever its kind."""
    if "turns" in row:
        return [item_messages(row)]
    return token_sequences(row, "chat" if "messages" in row else "kto" if "completion" in row else "dpo")


class _Run:
    """One curation run: turns -> ((kind, held, origins), row) of every row that passed every
    filter but the token limit (which needs batches); `emit` sends what passed that too."""

    def __init__(self, db: sqlite3.Connection, config: CurationConfig, counts: CurationCounts, sinks: Sinks):
        self.config, self.counts, self.sinks = config, counts, sinks
        self.split = Split(config.heldout_fraction, config.heldout_salt, frozenset(config.trusted_keys))
        self.seen = {name: DiskSet(db, name) for name in ("exact", "normalized", "kto", "dpo")}
        self.sources = DiskSet(db, "sources")
        self.recent_sources: set[str] = set()  # spares the database the same conversation's rows again and again
        self.pairs = PairIndex(db)
        self.pii: Counter = Counter()
        self.window: list = [None, None]

    def __call__(self, rows: Iterable[Any]) -> Iterator[tuple[tuple, dict]]:
        for turns in group_conversations(rows):
            self.counts.conversations += 1
            cid = get(turns[0], "conversation_id")
            keys = {get(t, "key_hash") for t in turns}
            key = next(iter(keys)) if len(keys) == 1 else _MIXED
            held = self.split.held(cid, key)
            if self.split.trusted_keys and key not in self.split.trusted_keys:
                self.counts.heldout_split["untrusted_key_conversations"] += 1
            memo = Memo(self.pii, self.config.pii_scrub)
            for turn in turns:
                self.counts.count_turn(turn, self.window)
                origin = (Origin(conversation_digest(cid), key_digest(get(turn, "key_hash"))),)
                example = self._example(turn, memo)
                if example is not None:
                    yield ("sft", held, origin), example
                if not held:
                    yield from (((kind, False, origin), row) for kind, row in self._preferences(turn, memo))
            if held:
                origins = tuple(Origin(conversation_digest(cid), key_digest(k)) for k in sorted(keys, key=str))
                yield from self._item(turns, memo, origins)

    def _example(self, turn: Any, memo: Memo) -> dict | None:
        example = sft_example(turn)
        if example is None:
            return None
        removed = self.counts.removed
        self.counts.candidates += 1
        if not example["messages"][-1]["content"].strip():
            removed["empty_answer"] += 1
            return None
        msgs = memo.scrub(example["messages"])
        if validate_messages(msgs):
            removed["invalid"] += 1
        elif not self.seen["exact"].add(exact_key(msgs)):
            removed["exact_duplicate"] += 1
        elif not self.seen["normalized"].add(memo.normalized_key(msgs)):
            removed["normalized_duplicate"] += 1
        else:
            return {"messages": msgs, "meta": example["meta"]}
        return None

    def _preferences(self, turn: Any, memo: Memo) -> Iterator[tuple[str, dict]]:
        """The turn's KTO rows and correction pair that pass the filters; its answer is indexed for pairs."""
        rows = preference_rows(turn)
        prompt_ok = not rows or not validate_prompt(rows[0]["prompt"])  # one prompt for all of them
        for row in rows:
            if self.keep("kto", row, memo, prompt_ok):
                yield "kto", row
        pair = correction_pair(turn)
        if pair is None and correction_of(turn) is not None and get(turn, "status", "ok") == "ok":
            self.counts.removed_pairs["correction_same_as_answer"] += 1
        if pair is not None and self.keep("dpo", pair, memo, prompt_ok and bool(rows)):
            yield "dpo", pair
        answer = target_answer(turn)
        if get(turn, "rating") in ("up", "down") and get(turn, "status", "ok") == "ok" and answer.strip():
            origin = Origin(conversation_digest(get(turn, "conversation_id")), key_digest(get(turn, "key_hash")))
            self.pairs.add(memo.scrub(prompt_of(turn)), memo.text(answer), label=get(turn, "rating") == "up", origin=origin)

    def keep(self, kind: str, row: dict, memo: Memo | None, prompt_ok: bool = False) -> bool:
        """Scrub a preference row in place (with `memo`); False, counted, when a filter drops it
        (`prompt_ok`: its prompt is known to be valid)."""
        if memo is not None:
            for name in ("prompt", "completion", "chosen", "rejected"):
                if name in row:
                    row[name] = memo.scrub(row[name])
        removed = self.counts.removed_preferences if kind == "kto" else self.counts.removed_pairs
        if validate_row(row, kind, prompt_checked=prompt_ok):
            removed["invalid"] += 1
        elif not self.seen[kind].add(row_key(kind, row)):
            removed["exact_duplicate"] += 1
        else:
            return True
        return False

    def _item(self, turns: list[Any], memo: Memo, origins: tuple[Origin, ...]) -> Iterator[tuple[tuple, dict]]:
        split = self.counts.heldout_split
        split["conversations"] += 1
        item, dropped = heldout_item(turns, scrub=memo.text)
        split["turns_without_gold"] += dropped
        if item is not None:
            yield ("item", True, origins), item

    def shortened(self, key: tuple) -> None:
        self.counts.shortened[key[0]] += 1

    def too_long(self, key: tuple, _tokens: int) -> None:
        kind = key[0]
        target = {"sft": self.counts.removed, "kto": self.counts.removed_preferences, "dpo": self.counts.removed_pairs}.get(kind)
        if target is None:
            self.counts.heldout_split["items_too_long"] += 1
        else:
            target["too_long"] += 1

    def emit(self, key: tuple, row: dict) -> None:
        kind, held, origins = key
        c = self.counts
        if kind == "item":
            row = {"id": f"heldout-{c.heldout_split['items']:06d}", **row}
            c.heldout_split["items"] += 1
            self.sinks.heldout_item(row)
        elif kind == "sft" and held:
            c.heldout += 1
            self.sinks.heldout(row)
        else:
            name = {"sft": "train", "kto": "preferences", "dpo": "preference_pairs"}[kind]
            setattr(c, name, getattr(c, name) + 1)
            c.sources[name][row["meta"]["source"]] += 1
            {"sft": self.sinks.train, "kto": self.sinks.preference, "dpo": self.sinks.pair}[kind](row)
        for origin in origins:
            for entry in (f"conversation:{origin.conversation}", f"key:{origin.key}" if origin.key else None):
                if entry and entry not in self.recent_sources:
                    if len(self.recent_sources) > 10_000:
                        self.recent_sources.clear()
                    self.recent_sources.add(entry)
                    self.sources.add(entry)

    def pair_rows(self) -> Iterator[tuple[tuple, dict]]:
        """Pairs of rated answers to one prompt that pass the filters (after every turn is read)."""
        for row, origins in self.pairs.pairs():
            if self.keep("dpo", row, None):
                yield ("dpo", False, origins), row


def curate(rows: Iterable[Any], *, config: CurationConfig, count_tokens: TokenCounter | None, sinks: Sinks) -> CurationCounts:
    """Stream turns (ordered by conversation_id, seq) through every curation step into `sinks`."""
    counts = CurationCounts()
    db = sqlite3.connect("")  # private temporary on-disk database, removed on close
    db.execute("PRAGMA journal_mode=OFF")
    try:
        run = _Run(db, config, counts, sinks)
        # The token limit of the validator (feedback/check.py), so curated data passes `data check`;
        # a row over it is cut to its last turns first (feedback/shorten.py), held-out items never.
        limit = dict(max_tokens=config.max_tokens, count_tokens=count_tokens, batch=config.token_batch, sequences=_sequences,
                     on_too_long=run.too_long, on_shortened=run.shortened, keep_whole=lambda key: key[0] == "item")
        for key, row in fitting(run(rows), **limit):
            run.emit(key, row)
        for key, row in fitting(run.pair_rows(), **limit):
            run.emit(key, row)
        for entry in run.sources:
            kind, _, digest = entry.partition(":")
            sinks.source(kind, digest)
    finally:
        db.close()
    counts.pii.update(run.pii)
    counts.first_turn_at, counts.last_turn_at = (at.isoformat() if isinstance(at, datetime) else at for at in run.window)
    return counts

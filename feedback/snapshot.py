"""Curation runs -> immutable, versioned dataset snapshots (and the plain `data export`).

    tunewheel data curate [--since 2025-01-01] [--config FILE]
    snap = create_snapshot(db, root=datasets_dir / "snapshots", config=CurationConfig(max_tokens=384),
                           seed_files=["seed.json"], tokenizer=model_dir)
    snap.path / "train.jsonl", snap.manifest["hash"]
    latest_snapshot(datasets_dir / "snapshots")

A snapshot is a folder `<root>/<version>` holding
  train.jsonl              curated SFT examples (chat JSONL) + the operator's seed files
  heldout.jsonl            curated examples of the held-out conversations (chat JSONL)
  heldout_eval.jsonl       the held-out conversations with a system prompt (the story) in the
                           learner's format: the longest curated example of each, its earlier
                           (context) answers standing as the gold answers of the earlier turns
  preferences.jsonl        unpaired {prompt, completion, label} rows (train conversations)
  preference_pairs.jsonl   {prompt, chosen, rejected} where one prompt got both ratings
  manifest.json            counts per step and filter, time window, seed files, config, hash
Seed examples pass the same validator and token limit as curated ones (feedback/check.py), so
train.jsonl always passes `data check` with the snapshot's limit; what a seed file lost is
counted in the manifest. The version is `snap-<first 12 hex of the content hash>`: the hash
covers the data files, so identical input gives an identical hash and the same folder, which is
never rewritten. The folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from feedback import check
from feedback.check import TokenCounter, iter_valid_examples, validate_messages, within_limit
from feedback.coqa import SYSTEM_PROMPT, RecordProblem, is_coqa_file, load_coqa, parse_record, to_chat
from feedback.curate import CurationConfig, CurationCounts, Sinks, curate
from feedback.models import as_utc
from feedback.queries import iter_log

DATA_FILES = ("train.jsonl", "heldout.jsonl", "heldout_eval.jsonl", "preferences.jsonl", "preference_pairs.jsonl")
STORY_PREFIX = SYSTEM_PROMPT.split("{story}")[0]
_encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder for every line: no per-row setup
EMPTY_MESSAGE = "no up-rated, completed turns in this window: the snapshot has no curated examples"
SEED_PROBLEMS_KEPT = 50  # per seed file, in the manifest


@dataclass
class Snapshot:
    path: Path
    manifest: dict

    @property
    def version(self) -> str:
        return self.manifest["version"]


def create_snapshot(db, *, root: str | Path, config: CurationConfig, seed_files: Iterable[str | Path] = (),
                    count_tokens: TokenCounter | None = None, tokenizer: str | Path | None = None,
                    since: datetime | None = None, until: datetime | None = None) -> Snapshot:
    """Curate the turn log in `db` (turns created in [since, until)) into a snapshot under `root`.

    `tokenizer` (a model folder or Hugging Face id) is recorded in the manifest and, when
    `config.max_tokens` is set and no `count_tokens` is given, counts the tokens."""
    since, until = (None if at is None else as_utc(at) for at in (since, until))  # the manifest says which UTC window
    if config.max_tokens and count_tokens is None:
        if tokenizer is None:
            raise ValueError("a token limit needs a tokenizer: pass tokenizer= or count_tokens=, or set max_tokens None")
        count_tokens = check.load_token_counter(tokenizer)
    return build_snapshot(iter_log(db, since=since, until=until), root=root, config=config, count_tokens=count_tokens,
                          seed_files=seed_files, since=since, until=until, tokenizer=None if tokenizer is None else str(tokenizer))


def build_snapshot(rows: Iterable[Any], *, root: str | Path, config: CurationConfig, count_tokens: TokenCounter | None = None,
                   seed_files: Iterable[str | Path] = (), since: datetime | None = None, until: datetime | None = None,
                   tokenizer: str | None = None) -> Snapshot:
    """Curate `rows` (turns ordered by conversation_id, seq) and the seed files into a snapshot under `root`."""
    seed_files = [Path(p) for p in seed_files]
    missing = [str(p) for p in seed_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"seed file(s) not found: {', '.join(missing)} (learn.seed_files)")
    if config.max_tokens and count_tokens is None:
        raise ValueError("config.max_tokens is set but no token counter was given (count_tokens)")
    root = Path(root)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        counts, seeds, eval_items = _write_data(tmp, rows, config, count_tokens, seed_files)
        digest = hashlib.sha256()
        for name in DATA_FILES:
            digest.update(f"{name}\0{_sha256(tmp / name)}\n".encode())
        content_hash = digest.hexdigest()
        version = f"snap-{content_hash[:12]}"
        manifest = _manifest(version, content_hash, counts, seeds, config, since, until, tokenizer, tmp)
        manifest["counts"]["heldout_eval_items"] = eval_items
        final = root / version
        if final.exists():  # same content as an earlier run: that snapshot stands, unchanged
            shutil.rmtree(tmp)
            return Snapshot(final, json.loads((final / "manifest.json").read_text()))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.rename(tmp, final)
        return Snapshot(final, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_data(folder: Path, rows: Iterable[Any], config: CurationConfig, count_tokens: TokenCounter | None,
                seed_files: list[Path]) -> tuple[CurationCounts, list[dict], int]:
    """Every data file of the snapshot; returns the curation counts, the seed files' entries and
    the number of held-out evaluation items."""
    files = {name: open(folder / name, "w", encoding="utf-8") for name in DATA_FILES}
    try:
        write = {name: _line_writer(f) for name, f in files.items()}
        heldout = HeldoutEval(write["heldout.jsonl"], write["heldout_eval.jsonl"])
        sinks = Sinks(train=write["train.jsonl"], heldout=heldout.add,
                      preference=write["preferences.jsonl"], pair=write["preference_pairs.jsonl"])
        counts = curate(rows, config=config, count_tokens=count_tokens, sinks=sinks)
        eval_items = heldout.finish()
        seeds = [add_seed_file(path, write["train.jsonl"], max_tokens=config.max_tokens, count_tokens=count_tokens)
                 for path in seed_files]
    finally:
        for f in files.values():
            f.close()
    return counts, seeds, eval_items


def _line_writer(f) -> Callable[[dict], None]:
    return lambda row: f.write(_encode(row) + "\n")


# ---------------------------------------------------------------------------------------- held-out items


def chat_to_heldout(messages: list[dict], item_id: str, source: str = "log") -> dict | None:
    """A chat example in the learner's held-out format, or None without a system message (the
    learner prompts every item with a story). The story is the system prompt's text, without
    the CoQA instruction when the chat used it."""
    if not messages or messages[0]["role"] != "system":
        return None
    story = messages[0]["content"].removeprefix(STORY_PREFIX)
    body = messages[1:]
    turns = [{"question": u["content"], "answers": [a["content"]]} for u, a in zip(body[::2], body[1::2])]
    return {"id": item_id, "source": source, "story": story, "turns": turns}


def _pairs(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


class HeldoutEval:
    """Held-out examples -> heldout.jsonl, and one learner-format item per conversation.

    Up-rated turns of one conversation give nested examples (each repeats the ones before it),
    which curation emits in order: only the longest, the last of a run that extends its
    predecessor, becomes an evaluation item."""

    def __init__(self, write_example: Callable[[dict], None], write_item: Callable[[dict], None]):
        self.write_example, self.write_item = write_example, write_item
        self.items = 0
        self.last: list[dict] | None = None

    def add(self, row: dict) -> None:
        self.write_example(row)
        messages = row["messages"]
        if self.last is None or _pairs(messages[:len(self.last)]) != _pairs(self.last):
            self._emit()
        self.last = messages

    def finish(self) -> int:
        """Write the pending item; the number of items written."""
        self._emit()
        self.last = None
        return self.items

    def _emit(self) -> None:
        item = chat_to_heldout(self.last, f"heldout-{self.items:06d}") if self.last else None
        if item is not None:
            self.write_item(item)
            self.items += 1


# ---------------------------------------------------------------------------------------- seed files


def iter_seed_examples(path: str | Path, problems: list[str]) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) of every example of a seed file (CoQA JSON or chat JSONL) that passes the
    chat-JSONL validator; the others' problems are appended to `problems`."""
    if not is_coqa_file(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, messages in iter_valid_examples(f, lambda p: problems.append(str(p))):
                yield f"line {lineno}", messages
        return
    for index, raw in enumerate(load_coqa(path)):
        rid = raw.get("id") if isinstance(raw, dict) else None
        try:
            messages = to_chat(parse_record(raw))["messages"]
        except ValueError as exc:
            problems.append(str(RecordProblem(index, rid, str(exc))))
            continue
        invalid = validate_messages(messages)
        if invalid:
            problems.append(str(RecordProblem(index, rid, "; ".join(invalid))))
        else:
            yield f"record {index} (id {rid})", messages


def add_seed_file(path: Path, write: Callable[[dict], None], *, max_tokens: int | None,
                  count_tokens: TokenCounter | None) -> dict:
    """Write the valid examples of one seed file within the token limit; its manifest entry."""
    problems: list[str] = []
    long: list[str] = []
    examples = iter_seed_examples(path, problems)
    kept = 0
    for _, messages, _ in within_limit(examples, max_tokens=max_tokens, count_tokens=count_tokens,
                                       on_too_long=lambda where, n: long.append(f"{where}: {check.too_long(n, max_tokens)}")):
        write({"messages": messages})
        kept += 1
    return {"path": str(path), "sha256": _sha256(path), "format": "coqa" if is_coqa_file(path) else "chat",
            "examples": kept, "skipped": len(problems), "too_long": len(long),
            "problems": (problems + long)[:SEED_PROBLEMS_KEPT]}


# ---------------------------------------------------------------------------------------- manifest, export, lookup


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _manifest(version, content_hash, counts: CurationCounts, seeds, config, since, until, tokenizer, folder: Path) -> dict:
    seed_examples = sum(s["examples"] for s in seeds)
    manifest = {
        "version": version,
        "hash": content_hash,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "window": {"since": _iso(since), "until": _iso(until),
                   "first_turn_at": counts.first_turn_at, "last_turn_at": counts.last_turn_at},
        "counts": {**counts.to_dict(), "seed_examples": seed_examples, "seed_too_long": sum(s["too_long"] for s in seeds),
                   "train_total": counts.train + seed_examples},
        "seed_files": seeds,
        "config": {"max_tokens": config.max_tokens, "pii_scrub": config.pii_scrub,
                   "heldout_fraction": config.heldout_fraction, "tokenizer": tokenizer},
        "files": {name: _sha256(folder / name) for name in DATA_FILES},
    }
    for key in ("first_turn_at", "last_turn_at"):
        manifest["counts"].pop(key)
    if counts.train + counts.heldout == 0:
        manifest["message"] = EMPTY_MESSAGE
    return manifest


def export_jsonl(rows: Iterable[Any], out: str | Path, *, config: CurationConfig,
                 count_tokens: TokenCounter | None = None) -> CurationCounts:
    """Every curated SFT example (no held-out split, no seeds) into one chat JSONL file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    config = CurationConfig(max_tokens=config.max_tokens, pii_scrub=config.pii_scrub, heldout_fraction=0.0,
                            token_batch=config.token_batch)
    with open(tmp, "w", encoding="utf-8") as f:
        write = _line_writer(f)
        counts = curate(rows, config=config, count_tokens=count_tokens, sinks=Sinks(train=write, heldout=write))
    os.replace(tmp, out)
    return counts


def latest_snapshot(root: str | Path) -> Snapshot | None:
    """The most recently created snapshot under `root` (the snapshots folder), or None."""
    root = Path(root)
    best = None
    for manifest_path in root.glob("snap-*/manifest.json") if root.is_dir() else []:
        manifest = json.loads(manifest_path.read_text())
        if best is None or manifest["created_at"] > best.manifest["created_at"]:
            best = Snapshot(manifest_path.parent, manifest)
    return best

"""Curation runs -> immutable, versioned dataset snapshots (and the plain `data export`).

    tunewheel data curate [--since 2025-01-01] [--config FILE]
    snap = create_snapshot(db, root=datasets_dir / "snapshots", config=CurationConfig(max_tokens=384),
                           seed_files=["seed.json"], tokenizer=model_dir)
    snap.path / "train.jsonl", snap.manifest["hash"], snap.manifest["heldout"]["trusted"]
    latest_snapshot(datasets_dir / "snapshots"); iter_snapshots(datasets_dir / "snapshots")

A snapshot is a folder `<root>/<version>` holding (one JSON object per line, each row with its
`meta` {"key", "rating", "source"}, see feedback/curate.py):
  train.jsonl              SFT examples, chat JSONL: curated (source rated | corrected) + the
                           operator's seed files (source seed)
  preferences.jsonl        KTO rows {prompt, completion, label} of the train conversations
  preference_pairs.jsonl   DPO rows {prompt, chosen, rejected}: corrections over answers, and
                           up- over down-rated answers to one prompt
  heldout.jsonl            SFT examples of the held-out conversations (chat JSONL)
  heldout_eval.jsonl       one learner-format item per held-out conversation ({id, source,
                           story, turns}), gold answers from up-rated model answers and
                           corrections only (feedback/heldout.py)
  sources.jsonl            {"kind": "conversation"|"key", "sha256": ...} of every conversation
                           and key a row came from (before the share cap): what `data forget` reads
  manifest.json            counts per rule and filter (what each removed), the held-out verdict
                           {"trusted": bool, "why": str}, time window, seed files, config, hash
Seed examples pass the same validator and token limit as curated ones (feedback/check.py), so
every file passes `data check` with the snapshot's limit; what a seed file lost is counted in
the manifest. `learn.max_share_per_key` is applied to the three training files last
(feedback/share.py). The version is `snap-<first 12 hex of the content hash>`: the hash covers
the data files and sources, so identical input gives an identical hash and the same folder,
which is never rewritten, except by `data forget`, which removes the data files of a
snapshot that held what it forgets and leaves `forgotten.json` (feedback/forget.py). The folder
is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from feedback import check
from feedback.check import TokenCounter, iter_valid_examples, validate_messages, within_limit
from feedback.coqa import RecordProblem, is_coqa_file, load_coqa, parse_record, to_chat
from feedback.curate import CurationConfig, CurationCounts, Sinks, curate
from feedback.heldout import trust
from feedback.models import as_utc
from feedback.queries import iter_log, store_secret
from feedback.share import cap_file

DATA_FILES = ("train.jsonl", "heldout.jsonl", "heldout_eval.jsonl", "preferences.jsonl", "preference_pairs.jsonl")
SOURCES_FILE = "sources.jsonl"
HASHED_FILES = (*DATA_FILES, SOURCES_FILE)
CAPPED_FILES = {"train": "train.jsonl", "preferences": "preferences.jsonl", "preference_pairs": "preference_pairs.jsonl"}
FORGOTTEN_FILE = "forgotten.json"
SEED_META = {"key": None, "rating": None, "source": "seed"}
_encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder for every line: no per-row setup
EMPTY_MESSAGE = "no rated or corrected, completed turns in this window: the snapshot has no curated examples"
SEED_PROBLEMS_KEPT = 50  # per seed file, in the manifest


@dataclass
class Snapshot:
    path: Path
    manifest: dict

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def forgotten(self) -> bool:
        """True when `data forget` removed this snapshot's data files (they held what it forgot)."""
        return (self.path / FORGOTTEN_FILE).exists()


def create_snapshot(db, *, root: str | Path, config: CurationConfig, seed_files: Iterable[str | Path] = (),
                    count_tokens: TokenCounter | None = None, tokenizer: str | Path | None = None,
                    since: datetime | None = None, until: datetime | None = None) -> Snapshot:
    """Curate the turn log in `db` (turns created in [since, until)) into a snapshot under `root`.

    `tokenizer` (a model folder or Hugging Face id) is recorded in the manifest and, when
    `config.max_tokens` is set and no `count_tokens` is given, counts the tokens. The held-out
    split is keyed with the store's secret salt unless `config.heldout_salt` is set."""
    since, until = (None if at is None else as_utc(at) for at in (since, until))  # the manifest says which UTC window
    if config.max_tokens and count_tokens is None:
        if tokenizer is None:
            raise ValueError("a token limit needs a tokenizer: pass tokenizer= or count_tokens=, or set max_tokens None")
        count_tokens = check.load_token_counter(tokenizer)
    if not config.heldout_salt:
        config = replace(config, heldout_salt=store_secret(db, "heldout_salt"))
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
        counts, seeds = _write_data(tmp, rows, config, count_tokens, seed_files)
        capped = {name: cap_file(tmp / file, max_share=config.max_share_per_key) if config.max_share_per_key else 0
                  for name, file in CAPPED_FILES.items()}
        digest = hashlib.sha256()
        for name in HASHED_FILES:
            digest.update(f"{name}\0{_sha256(tmp / name)}\n".encode())
        content_hash = digest.hexdigest()
        version = f"snap-{content_hash[:12]}"
        manifest = _manifest(version, content_hash, counts, seeds, capped, config, (since, until), tokenizer, tmp)
        final = root / version
        if final.exists() and not (final / FORGOTTEN_FILE).exists():  # same content as before: that snapshot stands
            shutil.rmtree(tmp)
            return Snapshot(final, json.loads((final / "manifest.json").read_text()))
        shutil.rmtree(final, ignore_errors=True)  # a forgotten folder of the same content: written anew
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.rename(tmp, final)
        return Snapshot(final, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_data(folder: Path, rows: Iterable[Any], config: CurationConfig, count_tokens: TokenCounter | None,
                seed_files: list[Path]) -> tuple[CurationCounts, list[dict]]:
    """Every data file of the snapshot; returns the curation counts and the seed files' entries."""
    files = {name: open(folder / name, "w", encoding="utf-8") for name in HASHED_FILES}
    try:
        write = {name: _line_writer(f) for name, f in files.items()}
        sinks = Sinks(train=write["train.jsonl"], heldout=write["heldout.jsonl"], heldout_item=write["heldout_eval.jsonl"],
                      preference=write["preferences.jsonl"], pair=write["preference_pairs.jsonl"],
                      source=lambda kind, digest: write[SOURCES_FILE]({"kind": kind, "sha256": digest}))
        counts = curate(rows, config=config, count_tokens=count_tokens, sinks=sinks)
        seeds = [add_seed_file(path, write["train.jsonl"], max_tokens=config.max_tokens, count_tokens=count_tokens)
                 for path in seed_files]
    finally:
        for f in files.values():
            f.close()
    return counts, seeds


def _line_writer(f) -> Callable[[dict], None]:
    return lambda row: f.write(_encode(row) + "\n")


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
        write({"messages": messages, "meta": SEED_META})
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


def _manifest(version, content_hash, counts: CurationCounts, seeds, capped: dict[str, int], config: CurationConfig,
              window: tuple, tokenizer, folder: Path) -> dict:
    seed_examples = sum(s["examples"] for s in seeds)
    c = counts.to_dict()
    c["sources"]["train"]["seed"] = seed_examples
    items = c["heldout_split"]["items"]
    c.update(seed_examples=seed_examples, seed_too_long=sum(s["too_long"] for s in seeds), heldout_eval_items=items,
             removed_by_share_cap=capped)
    if any(capped.values()):  # what the files hold after the share cap
        for name, file in CAPPED_FILES.items():
            by_source = _source_counts(folder / file)
            c["sources"][name] = by_source
            c[name] = sum(n for source, n in by_source.items() if source != "seed")
    c["train_total"] = c["train"] + seed_examples
    manifest = {
        "version": version,
        "hash": content_hash,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "window": {"since": _iso(window[0]), "until": _iso(window[1]),
                   "first_turn_at": c.pop("first_turn_at"), "last_turn_at": c.pop("last_turn_at")},
        "counts": c,
        "heldout": {**trust(operator_file=config.operator_heldout, trusted_keys=config.trusted_keys, items=items),
                    "items": items, "split": "keyed hash of the conversation id with the store's secret salt"},
        "seed_files": seeds,
        "config": {"max_tokens": config.max_tokens, "pii_scrub": config.pii_scrub, "heldout_fraction": config.heldout_fraction,
                   "trusted_keys": len(config.trusted_keys), "max_share_per_key": config.max_share_per_key,
                   "tokenizer": tokenizer},
        "files": {name: _sha256(folder / name) for name in HASHED_FILES},
    }
    if counts.train + counts.heldout + counts.preferences + counts.preference_pairs == 0:
        manifest["message"] = EMPTY_MESSAGE
    return manifest


def _source_counts(path: Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return dict(Counter(json.loads(line)["meta"]["source"] for line in f if line.strip()))


def export_jsonl(rows: Iterable[Any], out: str | Path, *, config: CurationConfig,
                 count_tokens: TokenCounter | None = None) -> CurationCounts:
    """Every curated SFT example (no held-out split, no seeds) into one chat JSONL file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    config = replace(config, heldout_fraction=0.0)
    with open(tmp, "w", encoding="utf-8") as f:
        write = _line_writer(f)
        counts = curate(rows, config=config, count_tokens=count_tokens, sinks=Sinks(train=write, heldout=write))
    os.replace(tmp, out)
    return counts


def iter_snapshots(root: str | Path, *, forgotten: bool = False) -> Iterator[Snapshot]:
    """The snapshots under `root` (the snapshots folder), newest first; those `data forget`
    emptied only with `forgotten=True` (the learner's replay must skip them)."""
    root = Path(root)
    found = [Snapshot(p.parent, json.loads(p.read_text())) for p in root.glob("snap-*/manifest.json")] if root.is_dir() else []
    for snap in sorted(found, key=lambda s: s.manifest["created_at"], reverse=True):
        if forgotten or not snap.forgotten:
            yield snap


def latest_snapshot(root: str | Path) -> Snapshot | None:
    """The most recently created snapshot under `root` that still holds its data, or None."""
    return next(iter_snapshots(root), None)

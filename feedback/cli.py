"""`tunewheel data ...`: curated training data out of the turn log, dataset checks, CoQA.

    tunewheel data export --out curated.jsonl          # up-rated answers and corrections as chat JSONL
    tunewheel data check curated.jsonl [--max-tokens 384] [--format auto|chat|kto|dpo]
    tunewheel data curate [--since 2025-01-01]         # a versioned snapshot; prints its manifest
    tunewheel data forget --key <sha256 hex> | --conversation <id> [--dry-run]
    tunewheel data import-coqa coqa-dev-v1.0.json [--out-dir DIR] [--on-error skip|fail]
    tunewheel data synth-coqa --stories 100 --seed 0 [--variant A|B] [--out train.json]

`check` exits 1 when any line is bad, listing every problem as `FILE:LINE: message` (the lines
the trainer refuses a file with). The token limit defaults to learn.train.max_length, counted
with the base model's tokenizer and chat template; `--max-tokens 0` turns it off.

From the composed settings these commands read only `store_url`, `datasets_dir`, `seed_files`,
`curation(max_tokens)` (the curation config, token limit included) and `base_model_path()`
(whose tokenizer counts tokens).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from feedback.cli_common import ConfigOption, fail, load

app = typer.Typer(help="Training data: export, check, curate snapshots, CoQA import and synthesis.", no_args_is_help=True)

SinceOpt = Annotated[Optional[datetime], typer.Option("--since", help="Only turns created at or after this time (UTC).")]
UntilOpt = Annotated[Optional[datetime], typer.Option("--until", help="Only turns created before this time (UTC).")]


def _token_counter(model: str, max_tokens: int | None):
    """The token counter of `model`, or None when the limit is off."""
    if not max_tokens:
        return None
    from feedback.check import load_token_counter

    return load_token_counter(model)


@app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Chat JSONL file to write.")],
    since: SinceOpt = None,
    until: UntilOpt = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Drop longer examples; default learn.train.max_length; 0: no limit.")] = None,
    config: ConfigOption = None,
) -> None:
    """Curated chat JSONL of the store: each up-rated answer or correction as the target after its conversation.

    Only the last assistant message of an example is trained on; the earlier assistant turns are
    context and carry `"weight": 0` (the OpenAI fine-tuning format's "do not train on this").
    """
    from feedback.db import make_db
    from feedback.queries import iter_log
    from feedback.snapshot import export_jsonl

    settings = load(ctx, config)
    cfg = settings.curation(max_tokens)
    try:
        counter = _token_counter(settings.base_model_path(), cfg.max_tokens)
    except FileNotFoundError as exc:
        fail(str(exc))
    counts = export_jsonl(iter_log(make_db(settings.store_url), since=since, until=until), out, config=cfg, count_tokens=counter)
    removed = ", ".join(f"{k} {v}" for k, v in counts.removed.items() if v) or "none"
    # every turn is unrated, rated but unfinished, up or down; corrections may come with any rating
    typer.echo(f"{out}: {counts.train} example(s) from {counts.turns} turns ({counts.rated_up} rated up, "
               f"{counts.rated_down} rated down, {counts.rated_not_ok} rated but incomplete or failed, "
               f"{counts.unrated} unrated, {counts.corrected} corrected); removed: {removed}")
    if counts.train == 0:
        typer.echo("no up-rated or corrected, completed turns in the log: the file is empty", err=True)


@app.command("check")
def check(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Chat JSONL file.")],
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Token limit per example; default learn.train.max_length; 0: off.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="chat (SFT), kto (preference rows), dpo (preference pairs), "
                                     "or auto: told by the first line's keys.")] = "auto",
    config: ConfigOption = None,
) -> None:
    """Validate a chat JSONL, KTO or DPO file as fine-tuning APIs do; exit 1 when any line is bad."""
    from feedback.check import FORMATS, check_file, detect_format

    settings = load(ctx, config)
    if not file.is_file():
        fail(f"{file} does not exist")
    if fmt not in ("auto", *FORMATS):
        fail(f"--format must be auto or one of {', '.join(FORMATS)}")
    limit = settings.curation(max_tokens).max_tokens
    try:
        counter = _token_counter(settings.base_model_path(), limit)
    except FileNotFoundError as exc:
        typer.echo(f"warning: token limit not checked: {exc}", err=True)
        counter = None
    report = check_file(file, max_tokens=limit, count_tokens=counter, fmt=detect_format(file) if fmt == "auto" else fmt)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.problem_lines():
            typer.echo(line)
        typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command("curate")
def curate_command(
    ctx: typer.Context,
    since: SinceOpt = None,
    until: UntilOpt = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Drop longer examples; default learn.train.max_length; 0: no limit.")] = None,
    config: ConfigOption = None,
) -> None:
    """Curate the turn log into a new immutable snapshot and print its manifest."""
    from feedback.db import make_db
    from feedback.snapshot import create_snapshot

    settings = load(ctx, config)
    try:
        snap = create_snapshot(make_db(settings.store_url), root=settings.datasets_dir / "snapshots",
                               config=settings.curation(max_tokens), seed_files=settings.seed_files,
                               tokenizer=settings.base_model_path(), since=since, until=until)
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(json.dumps(snap.manifest, indent=2, ensure_ascii=False))
    typer.echo(f"snapshot {snap.version} at {snap.path}", err=True)
    if "message" in snap.manifest:
        typer.echo(snap.manifest["message"], err=True)


@app.command("forget")
def forget_command(
    ctx: typer.Context,
    key: Annotated[Optional[str], typer.Option("--key", help="An API key's sha256 hex, as in serve.api_keys: everything it left.")] = None,
    conversation: Annotated[Optional[str], typer.Option("--conversation", help="A conversation id: its turns, ratings, corrections.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete the turns, ratings and corrections of one key or conversation, and the data of the
    snapshots that held them; a deletion record (counts and hashes, no content) is kept."""
    from feedback.db import make_db
    from feedback.forget import forget

    settings = load(ctx, config)
    if (key is None) == (conversation is None):
        fail("give exactly one of --key <sha256 hex> or --conversation <id>")
    if key is not None and (len(key) != 64 or any(c not in "0123456789abcdef" for c in key)):
        fail("--key takes the key's sha256 hex, as in serve.api_keys "
             "(python -c 'from serve.settings import hash_key; print(hash_key(\"KEY\"))')")
    result = forget(make_db(settings.store_url), key_hash=key, conversation_id=conversation, dry_run=dry_run,
                    snapshots=settings.datasets_dir / "snapshots", requested_by="cli")
    typer.echo(result.describe())
    if result.snapshots and not dry_run:
        typer.echo("adapter versions trained on those snapshots still serve what they learnt: `tunewheel adapters list` "
                   "marks them; retrain (`tunewheel learn run`) and promote a new version", err=True)


@app.command("import-coqa")
def import_coqa_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Official CoQA JSON file.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Where to write; default <data dir>/datasets/coqa.")] = None,
    on_error: Annotated[str, typer.Option("--on-error", help="skip: report malformed records and go on; fail: write nothing.")] = "skip",
    config: ConfigOption = None,
) -> None:
    """CoQA JSON -> chat JSONL (training) and the learner's held-out format."""
    from feedback.coqa import CoqaError, import_coqa

    settings = load(ctx, config)
    if on_error not in ("skip", "fail"):
        fail("--on-error must be skip or fail")
    if not file.is_file():
        fail(f"{file} does not exist")
    out_dir = out_dir or settings.datasets_dir / "coqa"
    try:
        result = import_coqa(file, out_dir, on_error=on_error)
    except CoqaError as exc:
        fail(str(exc))
    for problem in result.problems:
        typer.echo(f"skipped {problem}", err=True)
    typer.echo(f"{result.records} stories, {result.turns} turns -> {result.chat_path} (chat) and {result.heldout_path} (held-out)")


@app.command("synth-coqa")
def synth_coqa_command(
    ctx: typer.Context,
    stories: Annotated[int, typer.Option("--stories", min=0, help="How many stories.")],
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same file.")] = 0,
    variant: Annotated[str, typer.Option("--variant", "--generator", help="A (village tales) or B (station reports): "
                                         "a different generator with the same question phenomena, for held-out data.")] = "A",
    out: Annotated[Optional[Path], typer.Option("--out", help="CoQA JSON file; default: standard output.")] = None,
    config: ConfigOption = None,
) -> None:
    """Generate CoQA-format data (official CoQA JSON), deterministic for a seed."""
    from feedback.synth import synth_coqa

    load(ctx, config)  # nothing here depends on it, but a bad --config fails as in every command

    try:
        doc = synth_coqa(stories=stories, seed=seed, variant=variant)
    except ValueError as exc:
        fail(str(exc))
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    turns = sum(len(r["questions"]) for r in doc["data"])
    typer.echo(f"{out}: {stories} stories, {turns} questions (variant {variant.upper()}, seed {seed})")

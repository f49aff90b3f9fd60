"""`tunewheel eval` (EM/F1 of a served model) and `tunewheel adapters list|promote|rollback`.

    tunewheel eval --model chat --data heldout.jsonl [--url http://127.0.0.1:8000] [--predictions-out p.jsonl]
    tunewheel adapters list [--kind chat]
    tunewheel adapters promote chat-v0003
    tunewheel adapters rollback [--kind restyler --style pirate]

`eval` first checks in seconds that the data parses and that the gateway answers, takes the key
(`--api-key` or TUNEWHEEL_API_KEY) and serves the model (learn/preflight.py); then it prints EM
and F1 overall and per source and writes the report JSON (default under <data dir>/runs/). The
adapters commands work on the registry in the store database. `promote`
takes the one promotion path (learn/promotion.py): it records the request, a running gateway's
reconciler loads and warms the version and then moves prod (only if prod is still what it was,
or `--expect`), and the command waits for that outcome; a version the engine will not load, or
whose LoRA rank is beyond the engine's capacity, leaves production as it was. No gateway within
`--wait` seconds: the request is called off. `rollback` moves prod back at once; the gateways
converge on it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from feedback.cli_common import ApiKeyOption, ConfigOption, fail, load

KindOpt = Annotated[str, typer.Option("--kind", help="chat or restyler.")]
StyleOpt = Annotated[Optional[str], typer.Option("--style", help="The restyler's style (with --kind restyler).")]

console = Console()
adapters_app = typer.Typer(help="The adapter registry: versions, the prod pointer, rollback.", no_args_is_help=True)


def eval_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="Served name: chat, base, or chat@<version>.")],
    data: Annotated[Path, typer.Option("--data", help="Held-out JSONL (learner format) or an official CoQA JSON file.")],
    url: Annotated[Optional[str], typer.Option("--url", help="Gateway URL; default: the configured gateway.")] = None,
    predictions_out: Annotated[Optional[Path], typer.Option("--predictions-out", help="Write one JSON line per turn here.")] = None,
    report_out: Annotated[Optional[Path], typer.Option("--report-out", help="Report JSON; default <data dir>/runs/eval-<model>-<time>.json.")] = None,
    api_key: ApiKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Score a served model with the official CoQA EM and F1 (0-1), overall and per source."""
    from learn import preflight
    from learn.evaluate import EvalError, HeldoutError, evaluate

    settings = load(ctx, config)
    target = url or settings.gateway_url
    try:
        preflight.heldout(data, what="--data")
        check = preflight.Preflight(target, api_key)
        check.serves(check.gateway(), model)
    except preflight.PreflightError as exc:
        fail(str(exc))
    try:
        report = evaluate(data, model=model, url=target, max_tokens=settings.learn.eval_max_tokens,
                          concurrency=settings.learn.eval_concurrency, api_key=api_key, timeout=settings.serve.request_timeout_s,
                          predictions_out=predictions_out)
    except (HeldoutError, EvalError) as exc:
        fail(str(exc))

    table = Table(title=escape(model), caption=escape(f"{data}: {report.n_turns} turns in {report.duration:.1f} s"))
    for col in ("source", "turns", "EM", "F1"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for source, s in report.per_source.items():
        table.add_row(source, str(s["n"]), f"{s['em']:.3f}", f"{s['f1']:.3f}")
    table.add_row("[bold]overall[/bold]", str(report.n_turns), f"[bold]{report.em:.3f}[/bold]", f"[bold]{report.f1:.3f}[/bold]")
    console.print(table)

    if report_out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        report_out = settings.runs_dir / f"eval-{re.sub(r'[^A-Za-z0-9_.-]+', '_', model)}-{stamp}.json"
    report_out.parent.mkdir(parents=True, exist_ok=True)
    report_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    console.print(f"report: {report_out}" + (f"\npredictions: {predictions_out}" if predictions_out else ""), markup=False, highlight=False)


def _registry(ctx: typer.Context, config: Path | None):
    return _registry_of(load(ctx, config))


def _registry_of(settings):
    from feedback.db import make_db
    from learn.registry import Registry

    return Registry(make_db(settings.store_url))


def _pointers(reg):
    from learn.live import pointers

    return pointers(reg.db)


@adapters_app.command("list")
def list_command(
    ctx: typer.Context,
    kind: Annotated[Optional[str], typer.Option("--kind", help="Only this kind (chat or restyler).")] = None,
    style: StyleOpt = None,
    config: ConfigOption = None,
) -> None:
    """Every version, newest first; the prod one of each (kind, style) is marked with *, a running canary
    has the state "canary", and one trained on a snapshot that `data forget` emptied is marked
    "forgotten" (retrain to drop it). Then the live canary and probation, with their last check."""
    from feedback.forget import forgotten_snapshots

    reg = _registry(ctx, config)
    versions = reg.list(kind=kind, style=style)
    forgotten = forgotten_snapshots(reg.db)
    # At most one version per (kind, style) is promoted: the one its prod pointer names.
    prod_names = {p.name for k, s in {(v.kind, v.style) for v in versions} if (p := reg.prod(k, s)) is not None}
    table = Table(title="adapter versions")
    for col in ("", "version", "state", "parent", "EM", "F1", "created", "data"):  # the name tells kind and style
        table.add_column(col, no_wrap=col in ("version", "state", "EM", "F1"))
    canaries = {p.canary for p in _pointers(reg)}
    for v in versions:
        # the learner stores held-out scores under metrics.heldout.candidate (see learn/cycle.py)
        m = ((v.metrics or {}).get("heldout") or {}).get("candidate") or v.metrics or {}
        em, f1 = (f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "" for k in ("em", "f1"))
        table.add_row(
            "*" if v.name in prod_names else "", v.name, "canary" if v.name in canaries else v.state, v.parent or "", em, f1, v.created_at.strftime("%Y-%m-%d %H:%M"),
            "forgotten" if v.snapshot_hash in forgotten else "",
        )
    if any(v.snapshot_hash in forgotten for v in versions):
        table.caption = "forgotten: trained on a snapshot that held data deleted by `tunewheel data forget`; retrain to drop it"
    console.print(table if versions else "no adapter versions yet: `tunewheel learn run` trains the first")
    from learn.live import describe

    for pointer in _pointers(reg):  # the live canary and probation, as the learner's last check saw them
        for line in describe(pointer):
            console.print(f"{pointer.key}: {line}", markup=False, highlight=False)


@adapters_app.command("promote")
def promote_command(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Version name, e.g. chat-v0003.")],
    expect: Annotated[Optional[str], typer.Option("--expect", help="The prod version this replaces (`base`: the base "
                                                  "model); refused if prod is elsewhere. Default: prod as it is now.")] = None,
    wait: Annotated[Optional[float], typer.Option("--wait", help="Seconds to wait for a gateway to load it "
                                                  "(default learn.promotion_wait_s); then it is called off.")] = None,
    config: ConfigOption = None,
) -> None:
    """Make VERSION the prod version of its kind, through the running gateways: one of them loads and
    warms it first, then prod moves (the current version is retired). If the engine will not load it,
    production stays where it is and this says why."""
    from learn.promotion import promote, served_rank
    from learn.registry import UNCHECKED, RegistryError

    settings = load(ctx, config)
    reg = _registry_of(settings)
    wait_s = settings.learn.promotion_wait_s if wait is None else wait
    v = reg.get(version)
    if v is not None and v.kind == "chat":
        typer.echo(f"asking the gateways to load {version} (waiting up to {wait_s:g} s) ...", err=True)  # progress: stderr
    try:
        change = promote(reg, version, requested_by="cli", max_rank=settings.lora_capacity_for(served_rank(reg)), wait_s=wait_s,
                         expected=UNCHECKED if expect is None else (None if expect == "base" else expect))
    except RegistryError as exc:
        fail(str(exc))
    console.print(f"promoted {change.describe()}", markup=False, highlight=False)


@adapters_app.command("rollback")
def rollback_command(ctx: typer.Context, kind: KindOpt = "chat", style: StyleOpt = None, config: ConfigOption = None) -> None:
    """Move prod back to the version promoted before the current one (or to the base model)."""
    from learn.registry import RegistryError

    try:
        change = _registry(ctx, config).rollback(kind, style)
    except RegistryError as exc:
        fail(str(exc))
    console.print(f"rolled back {change.describe()} ({change.previous} is retired)", markup=False, highlight=False)

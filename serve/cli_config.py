"""`tunewheel config show|table` and `tunewheel keys hash|new`: setting tunewheel up.

    tunewheel config show [--config FILE] [--json]   # every key's effective value and its source
    tunewheel config table [--write README.md]       # the README's table of every key
    tunewheel keys new                               # a fresh random key and the hash for the config
    tunewheel keys hash KEY                          # sha256 hex, what serve.api_keys/admin_keys hold
    printf %s "$KEY" | tunewheel keys hash -         # ... without the key in the shell's history

The keys and their documentation come from the settings classes (serve/config_doc.py).
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from feedback.cli_common import ConfigOption, fail, load

config_app = typer.Typer(help="The configuration: every key, its value and where it came from.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: make one, hash one for serve.api_keys / serve.admin_keys.", no_args_is_help=True)


@config_app.command("show")
def show(
    ctx: typer.Context,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {key, value, source}.")] = False,
) -> None:
    """Print every key's effective value and its source: default, the config file, or a TUNEWHEEL_* variable."""
    from serve.config_doc import effective, show_lines

    settings = load(ctx, config)
    rows = effective(settings, config_file=config)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str, ensure_ascii=False))
        return
    typer.echo("\n".join(show_lines(rows)))


@config_app.command("table")
def table_command(
    ctx: typer.Context,
    write: Annotated[Optional[Path], typer.Option("--write", help="Replace the table between the markers in this file "
                                                  "(the README) instead of printing it.")] = None,
    config: ConfigOption = None,
) -> None:
    """Print the Markdown table of every config key (type, default, description), as the README has it."""
    from serve.config_doc import replace_table, table

    load(ctx, config)  # the table is the code's, not the config's; a bad --config fails as everywhere
    if write is None:
        typer.echo(table())
        return
    if not write.is_file():
        fail(f"{write} does not exist")
    try:
        write.write_text(replace_table(write.read_text()))
    except ValueError as exc:
        fail(f"{write}: {exc}")
    typer.echo(f"{write}: config table updated")


@keys_app.command("hash")
def hash_command(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The bearer key; `-` reads it from standard input.")],
    config: ConfigOption = None,
) -> None:
    """Print the sha256 hex of KEY: what goes into serve.api_keys or serve.admin_keys."""
    from serve.settings import hash_key

    load(ctx, config)
    if key == "-":
        key = sys.stdin.read().strip()
    if not key.strip():
        fail("the key is empty: pass the bearer key clients will send (or - to read it from standard input)")
    typer.echo(hash_key(key.strip()))


@keys_app.command("new")
def new_command(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Print a new random key (give it to the client) and its hash (put it in the config)."""
    from serve.settings import hash_key

    load(ctx, config)
    key = "tw-" + secrets.token_urlsafe(24)
    typer.echo(f"key:  {key}\nhash: {hash_key(key)}")
    typer.echo('add the hash to serve.api_keys (or serve.admin_keys), e.g. api_keys = ["<hash>"]', err=True)

"""Every `tunewheel` command, walked from the app itself, for the tests of this folder."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from serve.cli import app

WIDE = {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}  # help on one line per option, no colour codes


def root():
    """The click command of the `tunewheel` app (built as the console script builds it)."""
    return typer.main.get_command(app)


def leaves(group=None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """('data', 'export') -> its click command, for every command that runs."""
    group = group or root()
    out = {}
    for name, command in group.commands.items():
        path = (*prefix, name)
        out |= leaves(command, path) if hasattr(command, "commands") else {path: command}
    return out


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None):
    """Run `tunewheel ARGS` in-process; the result has .exit_code, .output (stdout+stderr), .stderr."""
    return CliRunner().invoke(app, list(args), env={**WIDE, **(env or {})}, input=input)

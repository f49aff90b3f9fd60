"""What every `tunewheel` command shares: the one `--config` option, the settings, one way to fail.

    @app.command("export")
    def export(ctx: typer.Context, config: ConfigOption = None) -> None:
        settings = load(ctx, config)      # the composed settings; a bad config file: one line, exit 2
        ...
        fail("what went wrong, and what to do about it")      # one line on stderr, exit 1

The commands of each package (feedback/cli.py, learn/cli*.py, serve/cli*.py) are mounted by
the `tunewheel` app (serve/cli.py), which hands them its settings loader as the click
context object. This module lives in the lowest package so that every package can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

CONFIG_ERROR_EXIT = 2  # a missing or invalid config file, in every command
FAILURE_EXIT = 1  # the command ran and failed

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML config file; TUNEWHEEL_* environment variables override it.", show_default=False),
]


class ConfigError(ValueError):
    """The config file is missing or invalid; the message is one line that says what to fix."""


def fail(message: str, code: int = FAILURE_EXIT) -> NoReturn:
    """End the command with `error: <message>` on stderr (no traceback) and exit `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load(ctx: typer.Context, config: Path | None) -> Any:
    """The composed settings for this command, from `config` and the environment."""
    loader: Callable[[Path | None], Any] | None = ctx.find_root().obj
    if loader is None:
        raise RuntimeError("tunewheel commands run under the tunewheel app (serve.cli:app), which loads their settings")
    try:
        return loader(config)
    except ConfigError as exc:
        fail(str(exc), CONFIG_ERROR_EXIT)

"""What every `tunewheel` command shares: the one `--config` option, the settings, one way to fail.

    @app.command("export")
    def export(ctx: typer.Context, config: ConfigOption = None) -> None:
        settings = load(ctx, config)      # the composed settings; a bad config file: one line, exit 2
        ...
        fail("what went wrong, and what to do about it")      # one line on stderr, exit 1

The commands of each package (feedback/cli.py, learn/cli*.py, serve/cli*.py) are mounted by
the `tunewheel` app (serve/cli.py), which hands them its settings loader as the click
context object. Its root group is `TunewheelGroup`, which does two things for every command:
- help shows flags as they are typed: `--json`, not `--json <bool>` (typer's rich help gives
  every on/off flag a type), and positionals as `FILE` in the usage line, not `{file}`;
- no traceback for a failure: an exception that escapes a command is one `error:` line on
  stderr and exit 1; the usual ones (store unreachable, gateway unreachable, a file that
  cannot be read) say what to fix. `TUNEWHEEL_DEBUG=1` re-raises, traceback and all.
`setup_logging` does the same for logged exceptions that are `expected` (tunewheel's own errors,
files, network, the store): one line each; a bug's traceback stays in the log.
This module lives in the lowest package so that every package can use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

CONFIG_ERROR_EXIT = 2  # a missing or invalid config file, in every command
FAILURE_EXIT = 1  # the command ran and failed
DEBUG_ENV = "TUNEWHEEL_DEBUG"  # set to 1: tracebacks instead of one-line errors

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML config file; TUNEWHEEL_* environment variables override it.", show_default=False),
]
ApiKeyOption = Annotated[
    Optional[str],
    typer.Option("--api-key", envvar="TUNEWHEEL_API_KEY", show_default=False,
                 help="Bearer key for the gateway, when it has serve.api_keys (an admin key to score unpromoted versions)."),
]


class ConfigError(ValueError):
    """The config file is missing or invalid; the message is one line that says what to fix."""


def fail(message: str, code: int = FAILURE_EXIT) -> NoReturn:
    """End the command with `error: <message>` on stderr, on one line (no traceback), and exit `code`."""
    typer.echo("error: " + " ".join(str(message).split()), err=True)
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


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------ one line per failure


def mask_url(url: Any) -> str:
    """A database or HTTP URL with its password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:
        return str(url)


def explain(exc: BaseException) -> str:
    """One line saying what went wrong and, for the usual failures, what to do about it."""
    import httpx
    from sqlalchemy.exc import ArgumentError, DBAPIError

    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, DBAPIError):
        orig = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        return (f"the store database cannot be used: {orig}; check store.url (TUNEWHEEL_STORE__URL) "
                "and that the database is running")
    if isinstance(exc, ArgumentError):
        return f"store.url is not a database URL ({first}): use sqlite:///PATH or postgresql+psycopg://user@host/db"
    if isinstance(exc, httpx.TransportError):
        url = exc.request.url if exc._request is not None else "the gateway"
        return f"cannot reach {url} ({type(exc).__name__}): is the gateway running (`tunewheel serve`)? else pass --url"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or first}: {exc.filename}"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def expected(exc: BaseException) -> bool:
    """A failure the user can fix from its message: tunewheel's own errors, files and network, the store.
    Anything else is a bug, whose traceback a log keeps."""
    import httpx
    from sqlalchemy.exc import DBAPIError

    ours = type(exc).__module__.split(".")[0] in ("feedback", "learn", "serve")
    return ours or isinstance(exc, (OSError, httpx.HTTPError, DBAPIError))


class _NoTracebacks(logging.Formatter):
    """A log record of an expected failure prints its message and the exception's one line."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and expected(exc) and not debugging():
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            record.msg, record.args = f"{record.getMessage()}: {explain(exc)}", None
        return super().format(record)


def setup_logging(level: int = logging.WARNING) -> None:
    """Log to stderr at `level`; an expected failure in a log record is one line (unless TUNEWHEEL_DEBUG=1)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_NoTracebacks("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "alembic"):  # not one line per request, per migration plugin
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------ help as it is typed


class _Flag(TyperOption):
    """An on/off flag: the help shows `--json`, as it is typed (typer's rich help says `--json <bool>`)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _Positional(TyperArgument):
    """A positional argument: the usage line shows `FILE`, or `[FILE]` when optional (typer's says `{file}`)."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


def _as_typed(params: list) -> None:
    for param in params:
        if type(param) is TyperArgument:
            param.metavar = param.metavar or param.name.upper()
            param.__class__ = _Positional
        elif type(param) is TyperOption and param.is_flag:
            param.__class__ = _Flag


def _retype_tree(command: Any) -> None:
    """Every command under `command`: its parameters and its --help shown as they are typed."""
    help_option = command.get_help_option(command.context_class(command))  # created once, then cached
    _as_typed([*command.params, *([help_option] if help_option is not None else [])])
    for sub in getattr(command, "commands", {}).values():
        _retype_tree(sub)


class TunewheelGroup(TyperGroup):
    """The root group of the `tunewheel` app: help as typed, one line per failure (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _retype_tree(self)

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # typer adds the completion flags after __init__
        _as_typed(params)
        return params

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            # click's and typer's own exceptions (usage errors, exits) are theirs to print
            if type(exc).__module__.startswith(("click", "typer")) or debugging():
                raise
            fail(f"{explain(exc)} (run with {DEBUG_ENV}=1 for the traceback)")

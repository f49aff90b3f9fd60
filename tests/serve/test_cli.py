"""Every `tunewheel` command takes --config and fails the same way on a missing or invalid file."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from serve.cli import app

# The arguments each command needs before it reads its config (required options and arguments).
REQUIRED = {
    "serve": [],
    "model prepare": [],
    "data export": ["--out", "x.jsonl"],
    "data check": ["x.jsonl"],
    "data curate": [],
    "data import-coqa": ["x.json"],
    "data synth-coqa": ["--stories", "1"],
    "learn run": [],
    "learn schedule": [],
    "eval": ["--model", "chat", "--data", "x.jsonl"],
    "adapters list": [],
    "adapters promote": ["chat-v0001"],
    "adapters rollback": [],
    "restyle synth": ["--out", "x.jsonl"],
    "restyle build": ["--style", "pirate", "--texts", "x.jsonl"],
    "restyle train": ["--style", "pirate"],
}


def leaf_commands(group, prefix: str = "") -> list[str]:
    """'data export', 'eval', ...: every command that runs (typer ships its own click, so no isinstance)."""
    out = []
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        out += leaf_commands(command, path + " ") if hasattr(command, "commands") else [path]
    return out


def test_the_table_names_every_command():
    assert sorted(leaf_commands(typer.main.get_command(app))) == sorted(REQUIRED)


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_a_missing_config_file_is_one_line_and_exit_2(command, tmp_path):
    missing = tmp_path / "nope.toml"
    result = CliRunner().invoke(app, [*command.split(), *REQUIRED[command], "--config", str(missing)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: config file {missing} does not exist"


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_an_invalid_config_file_is_one_line_and_exit_2(command, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve]\nport = 'eighty'\n")
    result = CliRunner().invoke(app, [*command.split(), *REQUIRED[command], "--config", str(bad)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: config file {bad}: serve.port"), result.output


def test_a_config_file_that_is_not_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve\n")
    result = CliRunner().invoke(app, ["adapters", "list", "--config", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"error: config file {bad} is not valid TOML")
    assert len(result.output.strip().splitlines()) == 1

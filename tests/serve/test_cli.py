"""The `tunewheel` command line: every command takes --config and fails the same way on a
missing or invalid file; `tunewheel serve` answers and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import typer
from sqlmodel import Session
from typer.testing import CliRunner

from feedback.models import Turn
from feedback.db import make_db
from serve.cli import app
from serve.engine_child import free_port

# The arguments each command needs before it reads its config (required options and arguments).
REQUIRED = {
    "serve": [],
    "model prepare": [],
    "data export": ["--out", "x.jsonl"],
    "data check": ["x.jsonl"],
    "data curate": [],
    "data forget": ["--conversation", "x"],
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
    "config show": [],
    "config table": [],
    "keys hash": ["KEY"],
    "keys new": [],
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


def test_serve_command_answers_then_stops_cleanly_on_sigterm(fake_engine_url, tmp_path):
    port = free_port()
    env = {**os.environ, "TUNEWHEEL_ENGINE__URL": fake_engine_url, "TUNEWHEEL_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "A canned answer."
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    with Session(make_db(f"sqlite:///{tmp_path / 'tunewheel.db'}")) as s:
        assert s.get(Turn, r.json()["id"]).answer == "A canned answer."
